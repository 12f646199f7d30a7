"""``pretrain_gpt.py``'s body: parse the flags, report what has no effect here, train.

Bad input ends the run with one line on stderr (``error: ...``, exit code 2) before anything is
written; set ``REMOE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from remoe_patches.arguments import ineffective_flags, parse_args
from remoe_patches.model import HAVE_TE
from remoe_patches.parallel import destroy_parallel


def _is_first_rank() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def use_demo_corpus(args) -> None:
    """Point the data and tokenizer flags at the embedded demo corpus, building it if needed."""
    from remoe_patches.demo_corpus import ensure_demo_corpus

    if _is_first_rank():
        print(" demo corpus: building on first use, cached afterwards ...", flush=True)
    corpus = ensure_demo_corpus()
    if _is_first_rank():
        print(f" demo corpus: {corpus.root} ({corpus.num_tokens:,} tokens)", flush=True)
    args.data_path = [corpus.data_prefix]
    args.vocab_file, args.merge_file = corpus.vocab_file, corpus.merge_file
    args.tokenizer_type = "GPT2BPETokenizer"


def main(argv=None) -> int:
    from remoe_patches.training import TrainingStopped, pretrain

    args = parse_args(argv)
    started = time.time()
    try:
        if args.demo_corpus:
            use_demo_corpus(args)
        if _is_first_rank():
            notes = ineffective_flags(
                args, cuda_available=torch.cuda.is_available(),
                transformer_engine_available=HAVE_TE,
            )
            for flag, reason in notes:
                print(f" note: {flag} has no effect here: {reason}", flush=True)
        state = pretrain(args)
    except ValueError as error:
        if os.environ.get("REMOE_DEBUG"):
            raise
        if _is_first_rank():
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_parallel()
    if int(os.environ.get("RANK", 0)) == int(os.environ.get("WORLD_SIZE", 1)) - 1:
        ran = state.iteration - state.start_iteration
        print(f" done: iteration {state.iteration} ({ran} in this launch, "
              f"{time.time() - started:.0f} s)", flush=True)
    return 0
