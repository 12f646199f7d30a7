"""Config-driven sweeps: a base config plus a grid of flag values expands into named runs.

A sweep file (``configs/sweeps/<name>.yaml``)::

    name: experts                     # default: the file's stem
    output_dir: runs/sweeps/experts   # default: runs/sweeps/<name>; run R lives in <output_dir>/R
    base:                             # what every run shares
      size: 182m                      # size + router pick configs/<size>_<router>.yaml, or
      config: configs/182m_remoe.yaml #   name a config file (pretrain_gpt.py --config)
      data_path: ${DATA_PATH}         # any pretrain_gpt.py flag, with underscores; ${VAR} is
      vocab_file: ${VOCAB_FILE}       #   read from the environment when the sweep expands
    grid:                             # flag -> values; the runs are the product, in this order
      router: [moe, remoe]            # dense | moe | remoe | hash | ec | sparsemixer | lory
      num_experts: [4, 8, 16]
    exclude:                          # optional: combinations left out
      - {router: moe, num_experts: 4}
    launch:                           # optional: how one run starts
      nproc_per_node: 8               # 1 runs python pretrain_gpt.py, more run torchrun
      nnodes: 1
      slurm: {time: "72:00:00", partition: gpu}   # extra #SBATCH options; max_parallel: N
    table:                            # optional: the collected table's shape
      rows: [num_experts]             # default: the grid keys but the column and replicate keys
      columns: router                 # default: router when it is a grid key; null: none
      values: [val_lm_loss]           # default: val_lm_loss (+ zero_shot_avg when present)
      replicates: seed                # optional: a grid key whose runs are repeats; a cell
                                      #   shows their mean +- half their range (n runs), and
                                      #   results.md adds each row's 95% t-interval over them
      reference: remoe                # with replicates: the row the others are compared with,
                                      #   paired by seed (a row's name, e.g. remoe_scale-none,
                                      #   a grid value, a row's label, or {grid key: value});
                                      #   default: the ReMoE row when there is exactly one
    paper:                            # optional: the paper's value of the table's first value,
      moe_e-4: 1.971                  #   by run name, shown in parentheses

Special keys (base or grid):

- ``config``: the config file the run starts from.
- ``size`` (``182m``, ``469m``, ``978m``): with ``router``, the config file
  ``configs/<size>_<router>.yaml`` (the paper's presets).
- ``router`` (``dense``, ``moe``, ``remoe``, or a Table 2 baseline ``hash``, ``ec``,
  ``sparsemixer``, ``lory``): without ``size``, switches the router of whatever the config file
  and flags describe: ``moe`` sets the Switch aux loss (0.01, pre-softmax), ``remoe`` sets
  ``--moe-relu-routing``, a baseline ``--moe-router-type`` (SparseMixer-v2 with the Switch aux
  loss), all default to E=8, k=1; ``dense`` drops every MoE
  flag (``num_experts``, ``moe_*``).

Any other key is a ``pretrain_gpt.py`` flag. A run's settings are the config file, then the
router switch, then ``base``, then its grid values; they are written to ``<run dir>/config.yaml``
and the run is ``pretrain_gpt.py --config <run dir>/config.yaml --save/--load <run dir>``.
Every run is validated with pretrain_gpt.py's own parser when the sweep expands.

Run names come from the grid values in grid order: ``size``, ``router`` and ``config`` (its
file stem) by value, other keys as ``<short name>-<value>`` (``e-16``, ``g-4``, ``alpha-1.2``,
``lambda0-1e-08``, ``lb-none``, ...), joined by ``_``.

A run is finished when ``<run dir>/DONE`` exists (written after a run that reached its
``train_iters``) or its latest checkpoint is at ``train_iters``; finished runs are skipped when
the sweep is launched again. ``collect`` gathers each run's last validation loss, its settling
iteration (ReMoE: when the sparsity entered and stayed within 0.02 of the target) and the
zero-shot average of ``<run dir>/zero_shot.json`` (lm-eval's results JSON, as written by
``tools/evaluate.py --output``, or ``{"avg": x}``) into ``results.md``, ``results.csv`` (the
paper's table shape) and ``runs.csv`` (one line per run), and draws every row's validation
curve into ``val_curves.png`` beside them (linked from results.md).

With ``table.replicates`` (a row = the runs that differ only in that key, e.g. the seeds),
results.md also has, for the final validation loss (and test loss where logged), each row's
mean over its replicates with the 95% t-interval mean ± t_{0.975,n-1} sd/sqrt(n) and n (a
one-seed row says so, with no interval), and each row's difference from the reference row
paired by seed (the same seed: the same data order): the mean of the per-seed differences, its
95% t-interval, whether that excludes 0, the number of pairs and the seeds left out unpaired.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from remoe_patches.runs import run_directory
from remoe_patches.runs.csv_table import write_csv
from remoe_patches.config.router_registry import ROUTERS as ROUTER_KINDS
from remoe_patches.config.router_registry import SWEEP_NAMES, sweep_router_title
from remoe_patches.runs.run_metrics import read_metrics, settle_iteration, target_from_flags

REPO = Path(__file__).resolve().parent.parent.parent

SPECIAL_KEYS = ("config", "size", "router")
ROUTERS = tuple(SWEEP_NAMES)
# Flags that say which router a config uses; replaced when ``router`` switches it.
ROUTER_IDENTITY = (
    "moe_relu_routing",
    "moe_router_type",
    "moe_router_pre_softmax",
    "moe_aux_loss_coeff",
    "moe_router_load_balancing_type",
    "moe_router_topk_scaling_factor",
)
# What each router switch sets: the registry entry's sweep_flags (configs/<size>_<router>.yaml's
# settings; TopK is the project's dMoE baseline, README "A fair TopK baseline").
ROUTER_SWITCHES = {name: kind.sweep_flags for name, kind in SWEEP_NAMES.items()}
MOE_DEFAULTS = dict(num_experts=8, moe_router_topk=1, moe_token_dispatcher_type="alltoall")
SHORT_NAMES = {
    "num_experts": "e",
    "moe_router_topk": "k",
    "moe_granularity": "g",
    "moe_relu_l1_reg_coeff_multiplier": "alpha",
    "moe_relu_l1_reg_coeff_init": "lambda0",
    "moe_router_load_balancing_type": "lb",
    "moe_aux_loss_coeff": "aux",
    "moe_router_topk_scaling_factor": "scale",
    "train_iters": "iters",
}
LABELS = {
    "num_experts": "E",
    "moe_router_topk": "k",
    "moe_granularity": "G",
    "moe_relu_l1_reg_coeff_multiplier": "alpha",
    "moe_relu_l1_reg_coeff_init": "lambda_0",
    "moe_router_load_balancing_type": "load balancing",
    "moe_router_topk_scaling_factor": "gate scale",
    "size": "size",
    "router": "router",
}
VALUE_TITLES = {
    "val_lm_loss": "validation loss",
    "test_lm_loss": "test loss",
    "zero_shot_avg": "zero-shot average (%)",
    "settle_iteration": "settling iteration",
}
# Flags that take several values (a blend); a string value is split at whitespace.
LIST_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


class SweepError(ValueError):
    """A sweep file or run that cannot work; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Sweep files and runs


@dataclass
class Run:
    """One run of a sweep: its name, directory, grid values and resolved pretrain_gpt.py flags."""

    name: str
    directory: Path
    values: dict
    """The grid values that define it (grid order)."""
    flags: dict
    """Everything its config.yaml holds (flag names with underscores)."""
    paper: Optional[float] = None

    @property
    def config_path(self) -> Path:
        return Path(run_directory.config_path(self.directory))

    @property
    def router(self) -> str:
        if not self.flags.get("num_experts"):
            return "dense"
        kind = (
            "relu"
            if self.flags.get("moe_relu_routing")
            else (self.flags.get("moe_router_type") or "topk")
        )
        return ROUTER_KINDS[kind].sweep_name

    def config_text(self, omit=()) -> str:
        header = (
            f"# sweep run {self.name}: written by tools/sweep.py; the grid values: "
            f"{json.dumps(self.values)}\n"
        )
        if omit:
            header += f"# left out, passed on the command line: {', '.join(omit)}\n"
        flags = {key: value for key, value in self.flags.items() if key not in omit}
        return header + yaml.safe_dump(flags, sort_keys=False)

    def placeholder_flags(self) -> dict:
        """Its flags whose values still hold an unset ``${VAR}`` (a listing without them)."""
        return {key: value for key, value in self.flags.items() if "${" in str(value)}

    def config_digest(self) -> str:
        return hashlib.sha256(yaml.safe_dump(self.flags, sort_keys=True).encode()).hexdigest()


@dataclass
class Sweep:
    name: str
    path: Path
    output_dir: Path
    runs: list
    grid_keys: list
    launch: dict = field(default_factory=dict)
    table: dict = field(default_factory=dict)
    unset: list = field(default_factory=list)
    """``${VAR}`` names left unexpanded (``load_sweep(missing_ok=True)``)."""


def load_sweep(path, output_dir=None, environ=None, missing_ok=False) -> Sweep:
    """Read a sweep file and expand its runs (not yet validated: see ``validate_runs``).

    ``missing_ok``: a ``${VAR}`` that the environment lacks stays as it is (listing commands,
    collecting results) instead of being an error (writing or starting runs).
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise SweepError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: must be a mapping with base: and grid:")
    known = {
        "name",
        "description",
        "output_dir",
        "base",
        "grid",
        "exclude",
        "launch",
        "table",
        "paper",
    }
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SweepError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    name = str(spec.get("name") or path.stem)
    environ = os.environ if environ is None else environ
    unset = sorted(
        {name for name in re.findall(r"\$\{(\w+)\}", path.read_text()) if name not in environ}
    )
    if missing_ok:
        environ = {**{name: "${" + name + "}" for name in unset}, **environ}
    base = _mapping(spec.get("base"), f"{path}: base")
    grid = _mapping(spec.get("grid"), f"{path}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")
    excludes = spec.get("exclude") or []
    if not isinstance(excludes, list) or not all(isinstance(e, dict) for e in excludes):
        raise SweepError(f"{path}: exclude must be a list of mappings")
    for exclude in excludes:
        stray = sorted(set(exclude) - set(grid))
        if stray:
            raise SweepError(f"{path}: exclude names {', '.join(stray)}, which is not a grid key")
    paper = _mapping(spec.get("paper"), f"{path}: paper")
    out = (
        Path(output_dir)
        if output_dir is not None
        else Path(spec.get("output_dir") or f"runs/sweeps/{name}")
    )

    runs = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        if any(all(values[k] == v for k, v in exclude.items()) for exclude in excludes):
            continue
        run_name = run_name_for(values) or name
        flags = resolve_flags(base, values, where=f"{path}: run {run_name}", environ=environ)
        runs.append(
            Run(
                name=run_name,
                directory=out / run_name,
                values=values,
                flags=flags,
                paper=paper.get(run_name),
            )
        )
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SweepError(
            f"{path}: several runs are named {', '.join(duplicates)}; grid values "
            "must differ after formatting"
        )
    stray_paper = sorted(set(paper) - set(names))
    if stray_paper:
        raise SweepError(f"{path}: paper names unknown run(s) {', '.join(stray_paper)}")
    launch = _mapping(spec.get("launch"), f"{path}: launch")
    table = _mapping(spec.get("table"), f"{path}: table")
    return Sweep(
        name=name,
        path=path,
        output_dir=out,
        runs=runs,
        grid_keys=list(grid),
        launch=launch,
        table=table,
        unset=unset if missing_ok else [],
    )


def _mapping(value, where) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping")
    return dict(value)


def run_name_for(values: dict) -> str:
    """The run's name from its grid values, e.g. ``182m_remoe`` or ``remoe_e-16``."""
    parts = []
    for key, value in values.items():
        text = _format_value(value)
        if key == "config":
            text = Path(str(value)).stem
        if key not in SPECIAL_KEYS:
            text = f"{SHORT_NAMES.get(key, key)}-{text}"
        parts.append(re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-"))
    return "_".join(parts)


def _format_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(v) for v in value)
    return str(value)


def resolve_flags(base: dict, values: dict, *, where: str, environ) -> dict:
    """A run's flags: config file, router switch, base flags, grid flags (later ones win)."""
    settings = {**base, **values}
    router = settings.get("router")
    if router is not None and router not in ROUTERS:
        raise SweepError(f"{where}: router {router!r} is not one of {', '.join(ROUTERS)}")
    size = settings.get("size")
    config = settings.get("config")
    if size is not None and config is not None:
        raise SweepError(f"{where}: give size (with router) or config, not both")
    if size is not None:
        config = f"configs/{size}_{router or 'remoe'}.yaml"
    flags = {}
    if config is not None:
        config_path = resolve_path(config)
        if not config_path.is_file():
            raise SweepError(f"{where}: config file {config} does not exist")
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SweepError(f"{where}: {config} is not a mapping of flags")
        flags.update(loaded)
    explicit = {k: v for k, v in {**base, **values}.items() if k not in SPECIAL_KEYS}
    if router is not None and size is None:
        clashing = sorted(
            set(explicit) & {"moe_relu_routing", "moe_router_type", "moe_router_pre_softmax"}
        )
        if clashing:
            raise SweepError(
                f"{where}: {', '.join(clashing)} conflicts with router: {router}; "
                "the router key sets it"
            )
        for key in ROUTER_IDENTITY:
            flags.pop(key, None)
        if not SWEEP_NAMES[router].is_moe:
            flags = {k: v for k, v in flags.items() if not _is_moe_flag(k)}
        else:
            flags.update(ROUTER_SWITCHES[router])
            for key, value in MOE_DEFAULTS.items():
                flags.setdefault(key, value)
    flags.update(explicit)
    if flags.get("moe_router_topk_scaling_factor") is not None and (
        "moe_router_topk_scaling_factor" not in explicit
        or flags["moe_router_topk_scaling_factor"] == "E/k"
    ):
        # A TopK baseline keeps its gates scaled by the run's own E/k when a grid changes E
        # or k (a config's 8.0 is E/k for its E=8, k=1); the sweep can set the value itself.
        topk = flags.get("moe_router_topk", MOE_DEFAULTS["moe_router_topk"])
        flags["moe_router_topk_scaling_factor"] = float(flags["num_experts"]) / topk
    if router is not None and not SWEEP_NAMES[router].is_moe:
        flags = {k: v for k, v in flags.items() if not _is_moe_flag(k)}
    flags = {key: _expand(value, where, environ) for key, value in flags.items()}
    for key in LIST_FLAGS:
        if isinstance(flags.get(key), str):  # "w1 prefix1 w2 prefix2", e.g. from ${DATA_PATH}
            flags[key] = flags[key].split()
    return flags


def _is_moe_flag(key: str) -> bool:
    return key == "num_experts" or key.startswith("moe_") or key.startswith("expert_")


def _expand(value, where, environ):
    if isinstance(value, list):
        return [_expand(v, where, environ) for v in value]
    if not isinstance(value, str):
        return value
    missing = [name for name in re.findall(r"\$\{(\w+)\}", value) if name not in environ]
    if missing:
        raise SweepError(
            f"{where}: {', '.join(missing)} not set in the environment (used by {value!r})"
        )
    return re.sub(r"\$\{(\w+)\}", lambda m: environ[m[1]], value)


def resolve_path(path) -> Path:
    """A path as given if it exists from here, else relative to the repository."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path.resolve()
    return REPO / path


def run_argv(run: Run) -> list:
    """pretrain_gpt.py's flags for ``run`` (its config file, save/load and tensorboard dirs)."""
    directory = str(run.directory)
    return [
        "--config",
        str(run.config_path),
        "--save",
        directory,
        "--load",
        directory,
        "--tensorboard-dir",
        os.path.join(directory, run_directory.TENSORBOARD_DIR),
    ]


def validate_runs(sweep: Sweep) -> None:
    """Parse every run's flags with pretrain_gpt.py's parser; SweepError naming the sweep file,
    the run and what the parser says (an unknown key with the closest known one)."""
    from remoe_patches.cli.arguments import build_parser, parse_args, unknown_key_message

    known = {
        flag[2:].replace("-", "_")
        for action in build_parser()._actions
        for flag in action.option_strings
        if flag.startswith("--")
    }
    for run in sweep.runs:
        for key in run.flags:
            if key not in known:
                where = "grid" if key in run.values else "base"
                message = unknown_key_message(key, sorted(known))
                raise SweepError(f"{sweep.path}: {where}.{message}")
    with tempfile.TemporaryDirectory() as scratch:
        for run in sweep.runs:
            config = Path(scratch) / f"{run.name}.yaml"
            config.write_text(run.config_text())
            argv = ["--config", str(config), "--save", str(run.directory)]
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    parse_args(argv)
            except SystemExit as error:
                if error.code:
                    said = errors.getvalue().strip().replace(f"{config}: ", "")
                    said = said.removeprefix("pretrain_gpt.py: error: ")
                    raise SweepError(
                        f"{sweep.path}: run {run.name}: pretrain_gpt.py refuses its flags: {said}"
                    ) from None


# ---------------------------------------------------------------------------------------------
# State of a run


def latest_iteration(directory: Path) -> Optional[int]:
    """The iteration of the run's latest checkpoint; None when it has none."""
    try:
        return run_directory.latest_iteration(str(directory))
    except (OSError, ValueError):  # an unreadable or garbled pointer: as if none were written
        return None


def is_finished(run: Run) -> bool:
    """DONE marker, or a final checkpoint at ``train_iters``."""
    if run_directory.is_done(run.directory):
        return True
    iters = run.flags.get("train_iters")
    latest = latest_iteration(run.directory)
    return (
        iters is not None
        and latest is not None
        and latest >= iters
        and os.path.isdir(run_directory.checkpoint_dir(run.directory, latest))
    )


def mark_done(run: Run) -> bool:
    """Write DONE when the run reached ``train_iters``; whether it did."""
    latest = latest_iteration(run.directory)
    iters = run.flags.get("train_iters")
    if latest is None or (iters is not None and latest < iters):
        return False
    Path(run_directory.done_path(run.directory)).write_text(
        json.dumps(
            dict(
                run=run.name,
                iteration=latest,
                config_sha256=run.config_digest(),
                finished=datetime.datetime.now().isoformat(timespec="seconds"),
            )
        )
        + "\n"
    )
    return True


def prepare(run: Run, omit=()) -> None:
    """Write the run's config.yaml (a finished run keeps the one it was trained with), without
    the flags in ``omit``."""
    run.directory.mkdir(parents=True, exist_ok=True)
    run.config_path.write_text(run.config_text(omit))


def config_changed(run: Run) -> bool:
    """Whether a finished run was trained with other settings than the sweep file now gives."""
    try:
        done = json.loads(Path(run_directory.done_path(run.directory)).read_text())
    except (OSError, ValueError):
        return False
    return done.get("config_sha256") not in (None, run.config_digest())


# ---------------------------------------------------------------------------------------------
# Launchers


def local_command(run: Run, nproc_per_node: int = 1, master_port: Optional[int] = None) -> list:
    script = str(REPO / "pretrain_gpt.py")
    if nproc_per_node == 1:
        return [sys.executable, script, *run_argv(run)]
    if master_port is None:
        # torch and megatron-core: only when needed
        from remoe_patches.runtime.parallel import free_port

        master_port = free_port()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc_per_node),
        "--master-port",
        str(master_port),
        script,
        *run_argv(run),
    ]


def print_commands(sweep: Sweep, out=sys.stdout) -> None:
    """List every run's command; unfinished runs get their config.yaml, so the commands run
    as printed (one at a time: they share the master port).

    Without the sweep's ``${VAR}``: the flags that use them are left out of config.yaml and
    shown on the command line with the placeholders, which the shell fills in once the
    variables are exported."""
    nproc = int(sweep.launch.get("nproc_per_node", 1))
    if sweep.unset:
        names = ", ".join(sweep.unset)
        out.write(
            f"# {names} not set: the commands pass the flags that use them as ${{...}}, "
            "for the shell to fill in; export them first\n"
        )
    for run in sweep.runs:
        finished = is_finished(run)
        placeholders = run.placeholder_flags()
        if not finished:
            prepare(run, omit=tuple(placeholders))
        state = "finished, skipped" if finished else "to run"
        out.write(f"# {run.name} ({state}): {json.dumps(run.values)}\n")
        command = shlex.join(local_command(run, nproc, master_port=6000))
        for key, value in placeholders.items():
            command += f" --{key.replace('_', '-')} " + " ".join(
                _shell_word(word, key in LIST_FLAGS)
                for word in (value if isinstance(value, list) else [value])
            )
        out.write(command + "\n")


def _shell_word(word, split: bool) -> str:
    """``word`` for a shell command whose ``${VAR}`` the shell expands: a list flag's unquoted
    (a blend in DATA_PATH is several words), another's in double quotes."""
    word = str(word)
    if "${" not in word:
        return shlex.quote(word)
    if split and re.fullmatch(r"[\w${}/.,:+=-]+", word):
        return word
    return '"' + re.sub(r'(["\\`])', r"\\\1", word) + '"'


def run_local(sweep: Sweep, *, keep_going: bool = False, out=sys.stdout) -> dict:
    """Run the unfinished runs one after another; ``{name: 'skipped'|'finished'|'failed'}``."""
    nproc = int(sweep.launch.get("nproc_per_node", 1))
    if int(sweep.launch.get("nnodes", 1)) != 1:
        raise SweepError(
            "--launcher local runs on this machine: launch.nnodes must be 1; use --launcher slurm"
        )
    outcome = {}
    for index, run in enumerate(sweep.runs, start=1):
        prefix = f"[{index}/{len(sweep.runs)}] {run.name}"
        if is_finished(run):
            note = (
                " (its settings changed since; delete its DONE to run it again)"
                if config_changed(run)
                else ""
            )
            out.write(f"{prefix}: finished, skipped{note}\n")
            out.flush()
            outcome[run.name] = "skipped"
            continue
        prepare(run)
        command = local_command(run, nproc)
        out.write(f"{prefix}: {shlex.join(command)}\n")
        out.flush()
        log = run.directory / run_directory.LOG_FILE
        code = _run_logged(command, log, out)
        if code == 0 and mark_done(run):
            outcome[run.name] = "finished"
            out.write(f"{prefix}: finished\n")
        else:
            outcome[run.name] = "failed"
            reason = f"exit code {code}" if code else "stopped before --train-iters"
            out.write(f"{prefix}: FAILED ({reason}); log: {log}\n")
            if not keep_going:
                break
        out.flush()
    return outcome


def _run_logged(command, log_path: Path, out) -> int:
    """Run ``command``, its output both to ``log_path`` and ``out``; its exit code."""
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            log.write(line)
            out.write(line)
        return process.wait()


SLURM_SIGNAL_SECONDS = 180
"""How long before its time limit a Slurm task is told to save and stop (--signal)."""


def write_slurm(sweep: Sweep) -> Path:
    """A job-array sbatch script over the runs (the unfinished ones are submitted). A task that
    reaches its time limit saves (SIGTERM, --exit-signal-handler) and requeues itself while it
    makes progress; a finished run gets its DONE marker."""
    launch = dict(sweep.launch)
    nproc = int(launch.get("nproc_per_node", 8))
    nnodes = int(launch.get("nnodes", 1))
    options = dict(launch.get("slurm") or {})
    max_parallel = options.pop("max_parallel", None)
    pending = [i for i, run in enumerate(sweep.runs) if not is_finished(run)]
    for index in pending:
        prepare(sweep.runs[index])
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    (sweep.output_dir / "slurm").mkdir(exist_ok=True)
    array = ",".join(map(str, pending)) if pending else "0"
    if max_parallel:
        array += f"%{int(max_parallel)}"
    out_dir = sweep.output_dir.resolve()
    lines = [
        "#!/bin/bash",
        f"# Sweep {sweep.name} ({sweep.path}): one array task per run; written by tools/sweep.py.",
        "# Submit with: sbatch " + str(out_dir / "sweep.sbatch"),
        f"#SBATCH --job-name=remoe-{sweep.name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={nproc}",
        f"#SBATCH --output={out_dir}/slurm/%x_%A_%a.out",
        # SIGTERM to the job's steps 180 s before the time limit: pretrain_gpt.py
        # (--exit-signal-handler) finishes its step, saves and exits; torchrun waits for it
        # (TORCH_ELASTIC_SHUTDOWN_TIMEOUT). The task then requeues itself and resumes.
        f"#SBATCH --signal=TERM@{SLURM_SIGNAL_SECONDS}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    lines += [f"#SBATCH --{key.replace('_', '-')}={value}" for key, value in options.items()]
    runs = " ".join(shlex.quote(run.name) for run in sweep.runs)
    iters = " ".join(str(run.flags.get("train_iters", 0)) for run in sweep.runs)
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        f"RUNS=({runs})",
        f"TRAIN_ITERS=({iters})",
        'RUN="${RUNS[$SLURM_ARRAY_TASK_ID]}"',
        f'export RUN_DIR={shlex.quote(str(out_dir))}/"$RUN"',
        f'if [ -f "$RUN_DIR/{run_directory.DONE_FILE}" ]; then echo "$RUN: finished, skipped"; '
        "exit 0; fi",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_ARRAY_TASK_ID % 10000))",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SLURM_SIGNAL_SECONDS - 30}",
        f'STARTED="$(cat "$RUN_DIR/{run_directory.LATEST_FILE}" 2>/dev/null || echo 0)"',
        "source scripts/slurm/job_time.sh  # and by the clock, 10 minutes before the limit",
        'export EXIT_DURATION_FLAGS="$(exit_duration_flags)"',
        "srun --kill-on-bad-exit=1 bash -c 'exec torchrun "
        f'--nproc-per-node {nproc} --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" '
        '--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_gpt.py '
        f'--config "$RUN_DIR/{run_directory.CONFIG_FILE}" --save "$RUN_DIR" '
        f'--load "$RUN_DIR" --tensorboard-dir "$RUN_DIR/{run_directory.TENSORBOARD_DIR}" '
        "--exit-signal-handler $EXIT_DURATION_FLAGS' || true",
        f'LATEST="$(cat "$RUN_DIR/{run_directory.LATEST_FILE}" 2>/dev/null || echo 0)"',
        'if [ "$LATEST" -ge "${TRAIN_ITERS[$SLURM_ARRAY_TASK_ID]}" ]; then',
        '    echo "{\\"run\\": \\"$RUN\\", \\"iteration\\": $LATEST}" > '
        f'"$RUN_DIR/{run_directory.DONE_FILE}"',
        'elif [ "$LATEST" -gt "$STARTED" ]; then',
        '    echo "$RUN stopped at iteration $LATEST (from $STARTED); requeued to resume" >&2',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "else",
        '    echo "$RUN made no progress (iteration $LATEST); not requeued, see the log" >&2',
        "    exit 1",
        "fi",
    ]
    path = out_dir / "sweep.sbatch"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------
# Collecting results


def zero_shot_average(directory: Path) -> Optional[float]:
    """The zero-shot average (percent) of ``zero_shot.json`` or an lm-eval results file."""
    candidates = [Path(directory) / run_directory.ZERO_SHOT_FILE]
    candidates += sorted(
        (Path(p) for p in glob.glob(str(Path(directory) / "**" / "results*.json"), recursive=True)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        for key in ("avg", "average", "zero_shot_avg"):
            if isinstance(data.get(key), (int, float)):
                return float(data[key])
        if isinstance(data.get("results"), dict):
            from remoe_patches.eval.evaluation import table_scores

            tasks = [t for t, r in data["results"].items() if isinstance(r, dict)]
            return table_scores(data, tasks).get("avg")
    return None


def run_result(run: Run) -> dict:
    records = read_metrics(run.directory)
    steps = [r for r in records if "lm_loss" in r]
    val = [r for r in records if "val_lm_loss" in r]
    test = [r for r in records if "test_lm_loss" in r]
    target = target_from_flags(run.flags)
    status = "finished" if is_finished(run) else ("partial" if steps else "not started")
    result = dict(name=run.name)
    result.update(run.values)
    result.setdefault("router", run.router)
    result.update(
        status=status,
        iteration=steps[-1]["iteration"] if steps else None,
        val_lm_loss=val[-1]["val_lm_loss"] if val else None,
        val_iteration=val[-1]["iteration"] if val else None,
        test_lm_loss=test[-1]["test_lm_loss"] if test else None,
        settle_iteration=settle_iteration(steps, target) if target is not None else None,
        final_sparsity=steps[-1].get("sparsity") if steps else None,
        zero_shot_avg=zero_shot_average(run.directory),
        paper=run.paper,
        run_dir=str(run.directory),
    )
    return result


def collect(sweep: Sweep, reference=None) -> dict:
    """Write results.md, results.csv, runs.csv and val_curves.png into the sweep's directory;
    their contents. With replicates, results.md also has each row's 95% t-interval over them
    and its paired difference from the reference row (``reference``, else ``table.reference``,
    else the ReMoE row)."""
    results = [run_result(run) for run in sweep.runs]
    columns_key = sweep.table.get("columns", "router" if "router" in sweep.grid_keys else None)
    replicates_key = sweep.table.get("replicates")
    if replicates_key is not None and replicates_key not in sweep.grid_keys:
        raise SweepError(
            f"{sweep.path}: table.replicates names {replicates_key}, which is not a grid key"
        )
    rows_keys = list(
        sweep.table.get("rows")
        or [k for k in sweep.grid_keys if k not in (columns_key, replicates_key)]
    )
    values = list(sweep.table.get("values") or ["val_lm_loss"])
    if "zero_shot_avg" not in values and any(r["zero_shot_avg"] is not None for r in results):
        values.append("zero_shot_avg")
    for key in rows_keys + ([columns_key] if columns_key else []):
        if key not in sweep.grid_keys:
            raise SweepError(f"{sweep.path}: table names {key}, which is not a grid key")

    column_values = _unique([r[columns_key] for r in results]) if columns_key else [None]
    row_values = _unique([tuple(r[k] for k in rows_keys) for r in results])
    cell = {}  # (row, column) -> the runs in that cell (several only for replicates)
    for r in results:
        cell.setdefault(
            (tuple(r[k] for k in rows_keys), r[columns_key] if columns_key else None), []
        ).append(r)

    def column_title(value):
        if columns_key is None:
            return None
        if columns_key == "router":
            return sweep_router_title(value)
        return f"{LABELS.get(columns_key, columns_key)}={_format_value(value)}"

    row_title = " ".join(LABELS.get(k, k) for k in rows_keys) or "run"
    markdown = [f"# Sweep {sweep.name}", ""]
    table_rows = []
    for value_key in values:
        header = [row_title] + [
            column_title(c) or VALUE_TITLES.get(value_key, value_key) for c in column_values
        ]
        markdown += [
            f"{VALUE_TITLES.get(value_key, value_key).capitalize()}:",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in row_values:
            label = (
                " ".join(_row_label_part(k, v) for k, v in zip(rows_keys, row) if v is not None)
                or sweep.name
            )
            cells, csv_row = [], {row_title: label}
            for column in column_values:
                runs = cell.get((row, column))
                if runs is None:
                    text, mean, spread = "-", None, None
                elif replicates_key is None:
                    text = _cell(runs[0], value_key, with_paper=value_key == values[0])
                    mean, spread = runs[0][value_key], None
                else:
                    text, mean, spread = _replicates_cell(
                        runs, value_key, LABELS.get(replicates_key, replicates_key)
                    )
                cells.append(text)
                title = f"{column_title(column) or 'value'} {value_key}"
                csv_row[title] = "" if mean is None else mean
                if replicates_key is not None:
                    csv_row[f"{title} spread"] = "" if spread is None else spread
            markdown.append("| " + " | ".join([label] + cells) + " |")
            table_rows.append((value_key, csv_row))
        markdown.append("")
    unfinished = [r["name"] for r in results if r["status"] != "finished"]
    if unfinished:
        markdown.append(
            f"Not finished: {', '.join(unfinished)} (their cells show the last "
            "value logged, or n/a)."
        )
    if any(r["paper"] is not None for r in results):
        markdown.append(f"In parentheses: the paper's {VALUE_TITLES.get(values[0], values[0])}.")

    # one group per table cell: the runs that differ only in the replicate key
    groups = []
    for row in row_values:
        row_label = " ".join(_row_label_part(k, v) for k, v in zip(rows_keys, row) if v is not None)
        for column in column_values:
            runs = cell.get((row, column))
            if not runs:
                continue
            grid_values = {k: runs[0][k] for k in sweep.grid_keys if k != replicates_key}
            label = " ".join(p for p in (row_label, column_title(column)) if p) or sweep.name
            groups.append(
                dict(
                    label=label,
                    name=run_name_for(grid_values) or sweep.name,
                    values=grid_values,
                    router=runs[0]["router"],
                    runs=runs,
                )
            )
    seeds = dict(intervals=[], paired=[], reference=None)
    if replicates_key is not None:
        if markdown[-1] != "":
            markdown.append("")
        lines, seeds = seeds_markdown(
            groups,
            replicates_key,
            reference if reference is not None else sweep.table.get("reference"),
            where=str(sweep.path),
        )
        markdown += lines
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    plot_path = sweep.output_dir / CURVES_FILE
    curves = validation_curves(groups)
    plotted = None
    if curves:
        try:
            plot_validation_curves(
                curves,
                plot_path,
                title=f"Sweep {sweep.name}"
                + (
                    f" (mean over {LABELS.get(replicates_key, replicates_key)}s; band: min-max)"
                    if replicates_key
                    else ""
                ),
            )
            plotted = plot_path
        except ImportError:
            markdown += ["", "No plot of the validation curves: matplotlib is not installed."]
    if plotted is None and plot_path.exists():
        plot_path.unlink()  # not a stale plot of earlier runs beside this table
    if plotted is not None:
        over = (
            f"; mean over {LABELS.get(replicates_key, replicates_key)}s, band min-max"
            if replicates_key
            else ""
        )
        markdown += ([""] if markdown[-1] != "" else []) + [
            f"Validation curves of every row ({len(curves)}{over}): [{CURVES_FILE}]({CURVES_FILE})",
            "",
            f"![validation curves]({CURVES_FILE})",
        ]
    text = "\n".join(markdown).rstrip() + "\n"

    (sweep.output_dir / "results.md").write_text(text)
    wide = {}
    for _value_key, csv_row in table_rows:
        wide.setdefault(csv_row[row_title], {}).update(csv_row)
    # results.csv and runs.csv have always had the csv module's default \r\n line ends
    write_csv(sweep.output_dir / "results.csv", list(wide.values()), line_end="\r\n")
    write_csv(sweep.output_dir / "runs.csv", results, line_end="\r\n")
    return dict(
        markdown=text,
        results=results,
        table=list(wide.values()),
        seeds=seeds,
        curves=[c[0] for c in curves],
        plot=plotted,
    )


def _row_label_part(key, value) -> str:
    if key == "moe_router_topk_scaling_factor" and isinstance(value, (int, float)):
        return f"gate x {value:g}"  # "TopK MoE gate x 8" beside the unscaled "TopK MoE"
    return sweep_router_title(value) if key == "router" else _format_value(value)


def _replicates_cell(runs: list, key, replicate="seed") -> tuple:
    """'mean ± half range (n=N)' of the runs' values, with the mean and the half range; one
    value: 'value (one seed)', no spread."""
    values = [r[key] for r in runs if isinstance(r[key], (int, float))]
    if not values:
        return "n/a", None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        spread, text = None, f"{mean:.4f} (one {replicate})"
    else:
        spread = (max(values) - min(values)) / 2
        text = f"{mean:.4f} ± {spread:.4f} (n={len(values)})"
    if any(r["status"] != "finished" for r in runs):
        text += " (not all finished)"
    return text, mean, spread


def _cell(result, key, with_paper: bool = False) -> str:
    value = result[key]
    if value is None:
        text = "n/a"
    elif key == "zero_shot_avg":
        text = f"{value:.2f}"
    elif isinstance(value, float):
        text = f"{value:.4f}"
    else:
        text = str(value)
    if with_paper and result.get("paper") is not None:
        text += f" ({result['paper']:g})"
    if value is not None and result["status"] != "finished":
        at = result["val_iteration"] if key == "val_lm_loss" else result["iteration"]
        text += f" (iter {at})"
    return text


def _unique(items) -> list:
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# ---------------------------------------------------------------------------------------------
# Over seeds: t-intervals, paired differences from a reference row, the validation curves

# t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), 6 decimals); beyond 30 the
# Cornish-Fisher expansion of the t quantile around the normal's z_{0.975} = 1.959964, which is
# within 1e-7 of the exact quantile there. scipy is not a dependency of this package.
T_975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)
Z_975 = 1.959963984540054
INTERVAL_VALUES = ("val_lm_loss", "test_lm_loss")
CURVES_FILE = "val_curves.png"


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 values")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df**power for power, term in enumerate(terms, start=1))


def t_interval(values) -> dict:
    """``{n, mean, sd, half_width}``: the 95% t-interval mean ± t_{0.975,n-1} sd/sqrt(n), sd
    with n - 1; sd and half_width None for one value."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return dict(n=0, mean=None, sd=None, half_width=None)
    mean = sum(values) / n
    if n == 1:
        return dict(n=1, mean=mean, sd=None, half_width=None)
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return dict(n=n, mean=mean, sd=sd, half_width=t_quantile_975(n - 1) * sd / n**0.5)


def paired_difference(row: dict, reference: dict) -> dict:
    """The per-seed differences ``row[seed] - reference[seed]`` over the seeds both have: their
    t-interval, the seeds paired and those of either left out (``{seed: value}`` mappings)."""
    paired = [seed for seed in row if seed in reference]
    stats = t_interval([row[seed] - reference[seed] for seed in paired])
    stats.update(
        seeds=paired,
        unpaired_row=[s for s in row if s not in reference],
        unpaired_reference=[s for s in reference if s not in row],
    )
    hw = stats["half_width"]
    stats["excludes_zero"] = None if hw is None else abs(stats["mean"]) > hw
    return stats


def _seed_values(group: dict, key: str, replicates_key: str) -> dict:
    return {
        r[replicates_key]: float(r[key]) for r in group["runs"] if isinstance(r[key], (int, float))
    }


def find_reference(groups: list, reference, where: str) -> tuple:
    """The reference row: ``reference`` (a row's name, a grid value such as ``remoe``, a row's
    label, or a mapping of grid values), else the one ReMoE row; ``(group or None, note)``."""
    if reference is None:
        remoe = [g for g in groups if g["router"] == "remoe"]
        if len(remoe) == 1:
            return remoe[0], ""
        why = (
            "no ReMoE row"
            if not remoe
            else f"several ReMoE rows ({', '.join(g['name'] for g in remoe)})"
        )
        return None, f"No paired differences: {why}; set table.reference to a row."
    if isinstance(reference, dict):
        matches = [
            g
            for g in groups
            if all(k in g["values"] and g["values"][k] == v for k, v in reference.items())
        ]
    else:
        text = str(reference)
        matches = [g for g in groups if g["name"] == text]
        matches = matches or [
            g for g in groups if text in [_format_value(v) for v in g["values"].values()]
        ]
        matches = matches or [g for g in groups if g["label"] == text]
    if len(matches) != 1:
        names = ", ".join(g["name"] for g in (matches or groups))
        raise SweepError(
            f"{where}: table.reference {reference!r} matches "
            f"{'several rows' if matches else 'no row'}: {names}"
        )
    return matches[0], ""


def _number(value, digits=4, sign=False) -> str:
    return "n/a" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def seeds_markdown(groups: list, replicates_key: str, reference, where: str) -> tuple:
    """The results.md section on the replicates: each row's mean and 95% t-interval of the
    final losses, and its paired per-seed difference from the reference row; with the numbers
    (``{"intervals": [...], "paired": [...], "reference": name}``)."""
    keys = [
        k
        for k in INTERVAL_VALUES
        if any(isinstance(r[k], (int, float)) for g in groups for r in g["runs"])
    ]
    lines, intervals, paired = [], [], []
    if not keys:
        return lines, dict(intervals=intervals, paired=paired, reference=None)
    seed_label = LABELS.get(replicates_key, replicates_key)
    lines += [
        f"Over {seed_label}s (replicates): mean and 95% t-interval, mean ± "
        "t(0.975, n-1) · sd / sqrt(n), of each row's final loss; n = the runs with a value.",
        "",
    ]
    header = ["row"]
    for key in keys:
        header += [
            "n" if key == keys[0] else f"n ({VALUE_TITLES[key]})",
            f"{VALUE_TITLES[key]} mean",
            "95% interval",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        cells = []
        for key in keys:
            stats = t_interval(_seed_values(group, key, replicates_key).values())
            intervals.append(dict(row=group["name"], label=group["label"], value=key, **stats))
            n = str(stats["n"])
            if stats["n"] == 1:
                n, interval = "1 (one seed)", "one seed: no interval"
            elif stats["half_width"] is None:
                interval = "-"
            else:
                low, high = (
                    stats["mean"] - stats["half_width"],
                    stats["mean"] + stats["half_width"],
                )
                interval = f"± {stats['half_width']:.4f} [{low:.4f}, {high:.4f}]"
            if key == keys[0] and any(r["status"] != "finished" for r in group["runs"]):
                n += " (not all finished)"
            cells += [n, _number(stats["mean"]), interval]
        lines.append("| " + " | ".join([group["label"]] + cells) + " |")
    lines.append("")

    ref, note = find_reference(groups, reference, where)
    if ref is None:
        lines += [note, ""]
        return lines, dict(intervals=intervals, paired=paired, reference=None)
    lines += [
        f"Paired by {seed_label} (same {seed_label} = same data order and initial "
        f"weights): each row minus the reference row {ref['label']} ({ref['name']}), the "
        f"mean of the per-{seed_label} differences and its 95% t-interval; only "
        f"{seed_label}s both rows have count (pairs); a positive difference is a higher "
        "loss than the reference's.",
        "",
    ]
    for key in keys:
        reference_values = _seed_values(ref, key, replicates_key)
        compared = [g for g in groups if g is not ref and _seed_values(g, key, replicates_key)]
        if not compared:
            continue
        if not reference_values:
            lines += [f"No paired {VALUE_TITLES[key]} differences: the reference row has none.", ""]
            continue
        header = ["row", "pairs", f"{VALUE_TITLES[key]} difference", "95% interval", "excludes 0"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in compared:
            stats = paired_difference(_seed_values(group, key, replicates_key), reference_values)
            paired.append(
                dict(
                    row=group["name"],
                    label=group["label"],
                    value=key,
                    reference=ref["name"],
                    **stats,
                )
            )
            pairs = str(stats["n"])
            left_out = [
                f"{seed_label} {', '.join(map(_format_value, seeds))} only in {where}"
                for seeds, where in (
                    (stats["unpaired_row"], "this row"),
                    (stats["unpaired_reference"], "the reference"),
                )
                if seeds
            ]
            if left_out:
                count = len(stats["unpaired_row"]) + len(stats["unpaired_reference"])
                pairs += f" ({count} unpaired left out: {'; '.join(left_out)})"
            if stats["n"] == 0:
                interval, excludes = f"no {seed_label} in common", "-"
            elif stats["n"] == 1:
                interval, excludes = "one pair: no interval", "-"
            else:
                low = stats["mean"] - stats["half_width"]
                high = stats["mean"] + stats["half_width"]
                interval = f"± {stats['half_width']:.4f} [{low:+.4f}, {high:+.4f}]"
                excludes = "yes" if stats["excludes_zero"] else "no"
            lines.append(
                "| "
                + " | ".join(
                    [group["label"], pairs, _number(stats["mean"], sign=True), interval, excludes]
                )
                + " |"
            )
        lines.append("")
    return lines, dict(intervals=intervals, paired=paired, reference=ref["name"])


def validation_curves(groups: list) -> list:
    """Per row: ``(label, iterations, mean, min, max)`` of its runs' validation losses (the
    iterations at which every run with a curve has one); rows without a curve are left out."""
    curves = []
    for group in groups:
        per_run = []
        for r in group["runs"]:
            points = {
                rec["iteration"]: float(rec["val_lm_loss"])
                for rec in read_metrics(r["run_dir"])
                if "val_lm_loss" in rec and "iteration" in rec
            }
            if points:
                per_run.append(points)
        if not per_run:
            continue
        iterations = sorted(set.intersection(*(set(p) for p in per_run)))
        if not iterations:
            continue
        values = [[p[i] for p in per_run] for i in iterations]
        curves.append(
            (
                group["label"],
                iterations,
                [sum(v) / len(v) for v in values],
                [min(v) for v in values],
                [max(v) for v in values],
            )
        )
    return curves


def plot_validation_curves(curves: list, path: Path, title: str = ""):
    """Draw the rows' validation curves (mean over the replicates, a min-max band where they
    differ; ``curves`` as ``validation_curves`` gives them) into
    ``path`` (PNG, matplotlib's Agg canvas, no display); the Figure back."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for label, iterations, mean, low, high in curves:
        (line,) = axes.plot(
            iterations, mean, marker="o" if len(iterations) < 3 else None, label=label
        )
        if any(a != b for a, b in zip(low, high)):
            axes.fill_between(iterations, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("iteration")
    axes.set_ylabel("validation loss")
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return figure
