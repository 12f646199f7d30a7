#!/usr/bin/env python
"""Generate text from a pretrain_gpt.py checkpoint or an export (tools/export_checkpoint.py).

    python tools/generate.py --load runs/demo --prompt "def fibonacci(n):"
    python tools/generate.py --load export/demo --prompt "import os" --temperature 0.7 \\
        --top-k 50 --top-p 0.9 --max-new-tokens 128 --seed 7
    python tools/generate.py --load runs/demo --prompt "class " --prompt "def " --temperature 0
    python tools/generate.py --load export/demo --prompt-file prompts.jsonl --batch-size 16

``--load`` is a ``--save`` directory (its latest checkpoint), one ``iter_XXXXXXX`` directory
(megatron-core on one process, any saved layout) or an export directory (the plain-PyTorch
reference model). Each ``--prompt`` (and each line of ``--prompt-file``, a JSON string) prints
its completion after the prompt, in order; ``--json`` prints one JSON object per prompt instead.

Up to ``--batch-size`` prompts decode together, left-padded, with a key/value cache: the prompts
run once, then each step feeds one new token per prompt (``remoe_patches/inference/generation.py``).
A checkpoint is converted to the reference model in memory for this. Checkpoints whose router
routes a token by its neighbours (Expert Choice, Lory) or that the reference model does not
implement are generated without the cache, each prompt alone (a note says why). ``--no-kv-cache``
does that for any model: each prompt alone, its whole context recomputed for every token, the
checkpoint on megatron-core, as before the cache. The tokens are the same either way, and the same
seed gives the same text (each prompt has its own generator).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from remoe_patches.inference.generation import SamplingConfig

    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--load",
        required=True,
        metavar="DIR",
        help="checkpoint (--save directory or iter_XXXXXXX) or export directory",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="text to continue; give it several times for several prompts",
    )
    parser.add_argument(
        "--prompt-file",
        metavar="FILE",
        help="more prompts, one JSON string a line (after the --prompt ones)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts decoded together (default 8)"
    )
    parser.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="recompute the whole context for every token, each prompt alone "
        "(the behaviour before the cache; the same tokens, slower)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0: no limit")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1: no limit")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--no-stop-at-eod", action="store_true", help="go on after the end-of-document token"
    )
    parser.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="directory now holding a checkpoint's tokenizer files",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return parser.parse_args(argv)


def read_prompts(args) -> list:
    """``--prompt``s, then ``--prompt-file``'s lines (JSON strings)."""
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file) as f:
                lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
        except OSError as error:
            raise ValueError(f"--prompt-file {args.prompt_file}: {error.strerror}") from None
        for number, line in lines:
            try:
                prompt = json.loads(line)
            except json.JSONDecodeError:
                prompt = None
            if not isinstance(prompt, str):
                raise ValueError(
                    f"--prompt-file {args.prompt_file} line {number} is not a JSON "
                    'string; write each prompt as "text", escapes for newlines'
                )
            prompts.append(prompt)
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    from remoe_patches.inference.generation import (
        SamplingConfig,
        SamplingError,
        generate,
        load_for_generation,
    )
    from remoe_patches.train.checkpointing import CheckpointError

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eod=not args.no_stop_at_eod,
    )
    try:
        sampling.validate()
    except SamplingError as error:  # in the terms of the flag given
        print(
            f"generate.py: error: --{error.field.replace('_', '-')} "
            f"{getattr(args, error.field)}: {error.message}",
            file=sys.stderr,
        )
        return 2
    if args.batch_size < 1:
        print(f"generate.py: error: --batch-size {args.batch_size}: must be >= 1", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args)
        if not prompts:
            raise ValueError(
                "no prompt: give --prompt TEXT (several times for several) or --prompt-file FILE"
            )
        loaded = load_for_generation(
            args.load, tokenizer_dir=args.tokenizer_dir, use_cache=not args.no_kv_cache
        )
        if loaded.no_cache_reason:
            print(
                f"generate.py: note: no key/value cache: {loaded.no_cache_reason}; each prompt "
                "is generated alone, its context recomputed for every token",
                file=sys.stderr,
                flush=True,
            )
        tokenizer, context = loaded.tokenizer, loaded.context_length
        prompt_ids = [tokenizer.tokenize(prompt) for prompt in prompts]
        for number, ids in enumerate(prompt_ids, start=1):
            if len(ids) > context:
                print(
                    f"generate.py: note: prompt {number} is {len(ids)} tokens; the "
                    f"model sees only its last {context} (the checkpoint's --seq-length)",
                    file=sys.stderr,
                    flush=True,
                )
        for start in range(0, len(prompts), args.batch_size):
            batch = slice(start, start + args.batch_size)
            new = generate(
                loaded.model,
                prompt_ids[batch],
                sampling,
                vocab_size=tokenizer.vocab_size,
                context_length=context,
                eod=tokenizer.eod,
                use_cache=loaded.use_cache,
            )
            for prompt, tokens in zip(prompts[batch], new):
                completion = tokenizer.detokenize(tokens)
                if args.json:
                    print(json.dumps(dict(prompt=prompt, completion=completion, tokens=tokens)))
                else:
                    print(prompt + completion, flush=True)
    except (CheckpointError, ValueError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
