"""``pretrain_gpt.py``'s command line, under Megatron-LM's flag names and meanings.

Launch scripts written for Megatron-LM (the ReMoE authors' included) run unchanged; the ReMoE
fork's ``--moe-relu-routing*`` and ``--moe-granularity`` are added, as are our ``--config``,
``--max-skipped-steps`` and ``--demo-corpus``.

- A flag is declared once, on the config field it sets (``flag_fields.flag_field``); flags that
  set no field are declared alike on ``RecipeFlags``, ``UnbuiltFlags``, ``OtherFlags`` and
  ``TopKRouterFlags``. The parser is one loop over Megatron-LM's groups (``GROUPS``).
- ``--config FILE.yaml``: a flat mapping of flag names with underscores to values, read as
  defaults that the command line overrides (a given flag also drops the YAML's value of its
  mutually exclusive partner). Every on/off flag has its opposite (``--X``/``--no-X``), so the
  command line can undo the YAML; one switched back to its default does not count as given.
- Errors are one line and exit code 2. No prefixes. A Megatron-LM flag not built here
  (``megatron_lm_flags.txt``: core_v0.16.1's) is named as such; another unknown flag or key
  names the flag it misspells. Nothing is silently ignored: a flag is honoured, refused, or
  noted as without effect (``argument_notes``).
- ``parse_command_line`` parses, completes and checks the flags (``argument_checks``) and maps
  them once onto the ``RunConfig`` (``argument_mapping``).

Deliberate differences from Megatron-LM: ``--ffn-hidden-size`` defaults to 4 * hidden even
with ``--swiglu`` (the paper's FFN); ``--fp16`` is refused (use ``--bf16``) and ``--optimizer
sgd`` is not offered; the model sizes, ``--micro-batch-size``, ``--lr`` and one of
``--train-iters``/``--train-samples`` are required at parse time; ``--moe-router-dtype``
defaults to fp32 from 32 experts (E x G), where megatron-core warns.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import yaml

from remoe_patches.cli.argument_checks import complete_and_validate
from remoe_patches.cli.argument_mapping import run_config_from_args
from remoe_patches.config.model_config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RecipeFlags,
    UnbuiltFlags,
)
from remoe_patches.config.flag_fields import add_declared_flags
from remoe_patches.config.router_registry import ROUTERS, TopKRouterFlags
from remoe_patches.config.run_config import (
    CheckpointConfig,
    DataConfig,
    LayerOptions,
    LoggingConfig,
    OtherFlags,
    RunConfig,
    TrainingConfig,
)

DECLARED_PARTS = (ParallelConfig, TrainingConfig, DataConfig, CheckpointConfig, LoggingConfig)
"""The RunConfig parts whose flags map straight onto their fields (``values_from_args``)."""

FLAG_PARTS = (
    *DECLARED_PARTS,
    ModelConfig,
    LayerOptions,
    RecipeFlags,
    UnbuiltFlags,
    OtherFlags,
    TopKRouterFlags,
    *dict.fromkeys(kind.options for kind in ROUTERS.values()),
)
"""Every dataclass whose fields declare flags, in the order ``--help`` lists them."""

GROUPS = (
    "model architecture",
    "mixture of experts",
    "parallelism",
    "data",
    "tokenizer",
    "training",
    "learning rate",
    "mixed precision",
    "regularization",
    "activation recomputation",
    "fused kernels (speed only)",
    "logging",
    "checkpointing",
    "validation",
    "profiling",
    "distributed",
)
"""Megatron-LM's argument groups, in its order."""

# Flags that Megatron-LM treats as alternatives; a command-line one drops the YAML's other one.
MUTUALLY_EXCLUSIVE = (("lr_warmup_fraction", "lr_warmup_iters"), ("train_iters", "train_samples"))


class MegatronArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the usage text of ~120 flags would bury the message."""

    error_context = ""
    """Put before every message, e.g. the YAML file whose values are being parsed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.switch_defaults = {}
        """dest -> an on/off flag's value when it is not switched on (``_add_opposites``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {self.error_context}{message}\n")


def build_parser() -> MegatronArgumentParser:
    """Megatron-LM's pretrain_gpt.py flags, in Megatron-LM's groups, plus ReMoE's and ours."""
    parser = MegatronArgumentParser(
        prog="pretrain_gpt.py",
        description="Pretrain a dense, TopK-MoE or ReMoE GPT with Megatron-LM's flags.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML mapping of flag names with underscores to values, used as defaults; the "
        "command line overrides them (--no-X switches off an on/off flag --X that it sets).",
    )
    for title in GROUPS:
        add_declared_flags(parser.add_argument_group(title), title, FLAG_PARTS)
    _add_opposites(parser)
    return parser


def _add_opposites(parser) -> None:
    """``--no-X`` for every on/off flag ``--X``, ``--X`` for Megatron-LM's ``--no-X`` flags: the
    same destination set back to its default (the opposites take no room in ``--help``)."""
    switches = (argparse._StoreTrueAction, argparse._StoreFalseAction)
    for action in [action for action in parser._actions if isinstance(action, switches)]:
        for flag in action.option_strings:
            opposite = (
                "--" + flag[len("--no-") :] if flag.startswith("--no-") else "--no-" + flag[2:]
            )
            # --disable-bias-linear has no name for its opposite, and is left so
            if (
                flag.startswith("--no-") or isinstance(action, argparse._StoreTrueAction)
            ) and opposite not in parser._option_string_actions:
                parser.add_argument(
                    opposite,
                    dest=action.dest,
                    action="store_const",
                    const=not action.const,
                    help=argparse.SUPPRESS,
                )
                parser.switch_defaults[action.dest] = not action.const


# ---------------------------------------------------------------------------------------------
# Parsing


class CommandLine(NamedTuple):
    """A parsed command line: the run it describes, and the flags as given (for the notes on
    flags without effect, ``ineffective_flags``)."""

    config: RunConfig
    args: argparse.Namespace


def parse_command_line(argv: Optional[Sequence[str]] = None) -> CommandLine:
    """Parse ``argv`` (default ``sys.argv[1:]``) over ``--config`` YAML defaults, validate, and
    build the ``RunConfig`` (once).

    Every error exits with code 2 and one line on stderr. ``args`` also carries ``given``
    (destinations set explicitly), ``recompute_modules`` and the Megatron-LM derived defaults
    (FFN width, max positions, split, tokenizer type).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cli_given = _dests_given(argv)
    yaml_given = set()
    config_path = _config_path(argv)
    if config_path is not None:
        yaml_parser = build_parser()
        yaml_parser.error_context = f"{config_path}: "
        yaml_tokens = _yaml_tokens(config_path, yaml_parser)
        yaml_args = _parse_strictly(yaml_parser, yaml_tokens)
        yaml_given = _dests_given(yaml_tokens)
        for pair in map(set, MUTUALLY_EXCLUSIVE):
            if pair & cli_given:
                yaml_given -= pair - cli_given
        parser.set_defaults(**{dest: getattr(yaml_args, dest) for dest in yaml_given})
    args = _parse_strictly(parser, argv)
    # an on/off flag switched back (--no-demo-corpus over a YAML's true) is as if not given
    args.given = frozenset(
        dest
        for dest in yaml_given | cli_given
        if not (
            dest in parser.switch_defaults
            and bool(getattr(args, dest)) == bool(parser.switch_defaults[dest])
        )
    )
    saved_model = _take_checkpoint_args(args, parser) if args.use_checkpoint_args else None
    complete_and_validate(args, parser)
    try:
        config = run_config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))
    if saved_model is not None:  # a checkpoint of this project: its model as it was trained
        config = dataclasses.replace(config, model=saved_model)
    return CommandLine(config, args)


def _take_checkpoint_args(args, parser):
    """--use-checkpoint-args: the model's flags from the newest checkpoint under --load, as
    Megatron-LM's ``load_args_from_checkpoint`` (``megatron_lm_checkpoints``). A Megatron-LM
    checkpoint sets ``args``' architecture flags; for one of this project, its saved
    ``ModelConfig`` is returned (and fills the required model flags the command line left out)."""
    from megatron.core import dist_checkpointing

    from remoe_patches.train import megatron_lm_checkpoints
    from remoe_patches.train.checkpointing import read_run_config, resolve_checkpoint_dir

    if not args.load:
        parser.error("--use-checkpoint-args takes the model from --load: give --load DIR")
    try:
        directory = resolve_checkpoint_dir(args.load)
        common = dist_checkpointing.load_common_state_dict(directory)
    except Exception as error:  # noqa: BLE001 (any unreadable checkpoint: one line)
        parser.error(
            f"--use-checkpoint-args: no checkpoint to take the model from under "
            f"--load {args.load} ({error})"
        )
    if megatron_lm_checkpoints.is_megatron_lm_state(common):
        megatron_lm_checkpoints.take_architecture_args(args, common["args"])
        return None
    model = read_run_config(args.load).model
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(args, dest) is None:
            setattr(args, dest, getattr(model, dest))
    return model


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags of ``parse_command_line`` alone (Megatron-LM's ``parse_args``)."""
    return parse_command_line(argv).args


def parse_run_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """The ``RunConfig`` of ``parse_command_line`` alone."""
    return parse_command_line(argv).config


def _config_path(argv) -> Optional[str]:
    pre_parser = MegatronArgumentParser(prog="pretrain_gpt.py", add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--config")
    return pre_parser.parse_known_args(argv)[0].config


def _parse_strictly(parser, tokens) -> argparse.Namespace:
    """Parse ``tokens``; an unknown flag is an error naming the closest known flag."""
    args, extras = parser.parse_known_args(tokens)
    if extras:
        flag = next((token for token in extras if token.startswith("-")), None)
        if flag is None and extras[0].lower() in ("true", "false"):
            parser.error(
                f"unexpected value {extras[0]!r}: an on/off flag takes no value "
                "(--X switches it on, --no-X off)"
            )
        if flag is None:
            parser.error(f"unexpected value {extras[0]!r} (no flag takes it)")
        known = [known for known in parser._option_string_actions if known.startswith("--")]
        parser.error(unknown_flag_message(flag.split("=", 1)[0], known))
    return args


MEGATRON_LM_FLAGS_FILE = Path(__file__).with_name("megatron_lm_flags.txt")
"""Megatron-LM core_v0.16.1's flags (``tools/list_megatron_lm_flags.py`` wrote it)."""

SIMILAR_FLAG_CUTOFF = 0.8
"""difflib similarity from which an unknown flag is taken for a misspelling of a known one."""

# Why some Megatron-LM features are absent, by flag prefix.
NOT_SUPPORTED_BECAUSE = {
    "--fp8": "FP8 training is not built here (use --bf16)",
    "--fp4": "FP4 training is not built here (use --bf16)",
    "--fp16": "use --bf16",
    "--use-torch-fsdp2": "FSDP is not built here (use --use-distributed-optimizer)",
    "--use-megatron-fsdp": "FSDP is not built here (use --use-distributed-optimizer)",
    "--num-virtual-stages-per-pipeline-rank": "the interleaved pipeline schedule is not built",
    "--multi-latent-attention": "the builder implements the paper's LLaMA recipe",
}


@functools.lru_cache(maxsize=1)
def megatron_lm_flags() -> frozenset:
    """Megatron-LM's own flag names (``MEGATRON_LM_FLAGS_FILE``)."""
    lines = MEGATRON_LM_FLAGS_FILE.read_text().splitlines()
    return frozenset(line for line in lines if line.startswith("--"))


def unknown_flag_message(flag: str, known_flags) -> str:
    """What to say about ``flag``, which this parser does not know: a Megatron-LM flag not
    implemented here is named as such (with why, where there is a reason); otherwise the known
    flag it misspells, when one is close."""
    if flag in megatron_lm_flags():
        reason = next(
            (why for prefix, why in NOT_SUPPORTED_BECAUSE.items() if flag.startswith(prefix)), None
        )
        return f"Megatron-LM's {flag} is not supported here" + (
            f": {reason}" if reason else "; pretrain_gpt.py --help lists what is"
        )
    closest = difflib.get_close_matches(flag, known_flags, n=1, cutoff=SIMILAR_FLAG_CUTOFF)
    hint = f"; did you mean {closest[0]}?" if closest else " (see --help)"
    return f"unknown flag {flag}{hint}"


def unknown_key_message(key, known_keys) -> str:
    """What to say about a YAML or sweep key (a flag name with underscores) that names no flag:
    as ``unknown_flag_message``."""
    as_flag = "--" + str(key).replace("_", "-")
    if as_flag in megatron_lm_flags():
        return f"{key}: " + unknown_flag_message(as_flag, [])
    closest = difflib.get_close_matches(str(key), known_keys, n=1, cutoff=SIMILAR_FLAG_CUTOFF)
    hint = f"; did you mean {closest[0]}?" if closest else ""
    return f"{key} is not a pretrain_gpt.py flag{hint}"


def _dests_given(tokens) -> set:
    """The destinations that ``tokens`` set (errors other than unknown flags exit as usual)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(tokens)[0]))


def _yaml_tokens(path: str, parser) -> list:
    """The YAML file's mapping as command-line tokens, so values go through the same types."""
    try:
        with open(path, encoding="utf-8") as file:
            mapping = yaml.safe_load(file)
    except OSError as error:
        parser.error(f"cannot read --config: {error.strerror}")
    except yaml.YAMLError as error:
        parser.error("not valid YAML: " + " ".join(str(error).split()))
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        parser.error("must be a mapping of flag names (with underscores) to values")
    actions = {  # argparse's private table of flags, stable for as long as argparse
        flag[2:].replace("-", "_"): (flag, action)
        for flag, action in parser._option_string_actions.items()
        if flag.startswith("--") and flag not in ("--help", "--config")
    }
    tokens = []
    for key, value in mapping.items():
        if key not in actions:
            parser.error("key " + unknown_key_message(key, actions))
        flag, action = actions[key]
        if value is None:
            continue
        if action.nargs == 0:
            if not isinstance(value, bool):
                parser.error(f"{key} takes true or false, not {value!r}")
            tokens += [flag] if value else []
        elif isinstance(value, list):
            if action.nargs not in ("*", "+") and not isinstance(action.nargs, int):
                parser.error(f"{key} takes one value, not a list")
            tokens += [flag, *map(str, value)]
        else:
            # flag=value keeps a value that starts with '-' from reading as a flag.
            tokens.append(f"{flag}={value}")
    return tokens
