"""``pretrain_gpt.py``'s body: parse the flags into a ``RunConfig``, report what has no effect
here, train.

Bad input ends the run with one line on stderr (``error: ...``, exit code 2) before anything is
written; a failure of the machine's (an ``OSError``: a directory that cannot be written, a full
disk during a save) or of the GPU's (out of memory, with what lowers it) with one line and exit
code 1; Ctrl-C with one line and exit code 130. Set ``REMOE_DEBUG=1`` to see the traceback
instead.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from remoe_patches.cli.argument_mapping import in_flag_terms
from remoe_patches.cli.argument_notes import ineffective_flags
from remoe_patches.cli.arguments import parse_command_line
from remoe_patches.cli.machine_notes import less_memory, machine_notes
from remoe_patches.model.build import HAVE_TE, HAVE_WGRAD_FUSION, transformer_impl_in_use
from remoe_patches.runtime.parallel import destroy_parallel
from remoe_patches.config.model_config import ConfigError
from remoe_patches.config.run_config import RunConfig


def _is_first_rank() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _rank_prefix() -> str:
    """'rank N: ' when several ranks may each print their own error."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""


def use_demo_corpus(config: RunConfig) -> RunConfig:
    """``config`` reading the embedded demo corpus and its tokenizer, built if needed."""
    from remoe_patches.data.demo_corpus import ensure_demo_corpus

    def building():  # said only when there is no cached copy to use
        if _is_first_rank():
            print(" demo corpus: building on first use, cached afterwards ...", flush=True)

    corpus = ensure_demo_corpus(on_build=building)
    if _is_first_rank():
        print(f" demo corpus: {corpus.root} ({corpus.num_tokens:,} tokens)", flush=True)
    return config.replace(
        data=dict(
            data_path=(corpus.data_prefix,),
            vocab_file=corpus.vocab_file,
            merge_file=corpus.merge_file,
            tokenizer_type="GPT2BPETokenizer",
        ),
        logging=dict(eval_domains=config.logging.eval_domains or corpus.domains_file),
    )


def notes_on_this_machine(config: RunConfig) -> list:
    """``machine_notes`` for this process's machine and launch."""
    gpu_memory = (
        torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if torch.cuda.is_available()
        else None
    )
    return machine_notes(
        config,
        transformer_engine=transformer_impl_in_use(config.layers.transformer_impl)
        == "transformer_engine",
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        gpu_memory_bytes=gpu_memory,
    )


def arguments_listing(args) -> list:
    """Megatron-LM's start-up listing: every argument with its resolved value (YAML, command line
    and derived defaults applied), sorted, dotted to one column."""
    names = sorted((name for name in vars(args) if name != "given"), key=str.lower)
    return (
        ["------------------------ arguments ------------------------"]
        + [f"  {name} {'.' * (48 - len(name))} {getattr(args, name)}" for name in names]
        + ["-------------------- end of arguments ---------------------"]
    )


def main(argv=None) -> int:
    from remoe_patches.train.training import TrainingStopped, pretrain

    config, args = parse_command_line(argv)
    started = time.time()
    try:
        if config.data.demo_corpus:
            config = use_demo_corpus(config)
        listing = arguments_listing(args)
        if _is_first_rank():
            print("\n".join(listing), flush=True)
            notes = ineffective_flags(
                args,
                cuda_available=torch.cuda.is_available(),
                transformer_engine_available=HAVE_TE,
                wgrad_fusion_available=HAVE_WGRAD_FUSION,
            )
            for flag, reason in notes:
                print(f" note: {flag} has no effect here: {reason}", flush=True)
        # On every rank: a run that cannot fit is refused by all of them alike.
        for note in notes_on_this_machine(config):
            if _is_first_rank():
                print(f" note: {note}", flush=True)
        state = pretrain(config, arguments=listing)
    except ValueError as error:  # ConfigError, CheckpointError: the same on every rank
        if os.environ.get("REMOE_DEBUG"):
            raise
        if _is_first_rank():  # a config's rule (the layout against the world) in flag terms
            message = in_flag_terms(error) if isinstance(error, ConfigError) else error
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    except OSError as error:  # the machine's: a directory that cannot be written, a full disk
        if os.environ.get("REMOE_DEBUG"):
            raise
        print(f"error: {_rank_prefix()}{error}", file=sys.stderr, flush=True)
        return 1
    except torch.OutOfMemoryError as error:
        if os.environ.get("REMOE_DEBUG"):
            raise
        print(
            f"error: {_rank_prefix()}out of GPU memory ({str(error).splitlines()[0]}); "
            f"lower it with {less_memory(config)}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C without --exit-signal-handler (after a save under way)
        if os.environ.get("REMOE_DEBUG"):
            raise
        print(
            f"{_rank_prefix()}interrupted (Ctrl-C); resume from the last checkpoint with --load",
            file=sys.stderr,
            flush=True,
        )
        return 130
    finally:
        destroy_parallel()
    if int(os.environ.get("RANK", 0)) == int(os.environ.get("WORLD_SIZE", 1)) - 1:
        ran = state.iteration - state.start_iteration
        print(
            f" done: iteration {state.iteration} ({ran} in this launch, "
            f"{time.time() - started:.0f} s)",
            flush=True,
        )
    return 0
