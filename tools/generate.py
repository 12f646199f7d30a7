#!/usr/bin/env python
"""Generate text from a pretrain_gpt.py checkpoint or an export (tools/export_checkpoint.py).

    python tools/generate.py --load runs/demo --prompt "def fibonacci(n):"
    python tools/generate.py --load export/demo --prompt "import os" --temperature 0.7 \\
        --top-k 50 --top-p 0.9 --max-new-tokens 128 --seed 7
    python tools/generate.py --load runs/demo --prompt "class " --temperature 0   # greedy

``--load`` is a ``--save`` directory (its latest checkpoint), one ``iter_XXXXXXX`` directory
(megatron-core on one process, any saved layout) or an export directory (the plain-PyTorch
reference model). Each ``--prompt`` prints its completion after the prompt; ``--json`` prints
one JSON object per prompt instead. The same seed gives the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from remoe_patches.generation import SamplingConfig

    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, metavar="DIR",
                        help="checkpoint (--save directory or iter_XXXXXXX) or export directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; give it several times for several prompts")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="0: greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0: no limit")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1: no limit")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-stop-at-eod", action="store_true",
                        help="go on after the end-of-document token")
    parser.add_argument("--tokenizer-dir", metavar="DIR",
                        help="directory now holding a checkpoint's tokenizer files")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return parser.parse_args(argv)


def load(directory: str, tokenizer_dir=None):
    """(logits function, tokenizer, context length) of a checkpoint or an export."""
    from remoe_patches.hf_export import is_export_dir, load_export_for_inference
    from remoe_patches.trained_model import load_model_for_inference, megatron_logits

    if is_export_dir(directory):
        model, tokenizer, config = load_export_for_inference(directory)
        return model, tokenizer, config["seq_length"]
    model, tokenizer, model_config = load_model_for_inference(directory,
                                                              tokenizer_dir=tokenizer_dir)
    return (lambda tokens: megatron_logits(model, tokens)), tokenizer, model_config.seq_length


def main(argv=None) -> int:
    args = parse_args(argv)
    from remoe_patches.generation import SamplingConfig, SamplingError, generate
    from remoe_patches.checkpointing import CheckpointError

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_at_eod=not args.no_stop_at_eod)
    try:
        sampling.validate()
    except SamplingError as error:  # in the terms of the flag given
        print(f"generate.py: error: --{error.field.replace('_', '-')} "
              f"{getattr(args, error.field)}: {error.message}", file=sys.stderr)
        return 2
    try:
        logits_fn, tokenizer, context = load(args.load, args.tokenizer_dir)
        for number, prompt in enumerate(args.prompt, start=1):
            prompt_ids = tokenizer.tokenize(prompt)
            if len(prompt_ids) > context:
                print(f"generate.py: note: prompt {number} is {len(prompt_ids)} tokens; the "
                      f"model sees only its last {context} (the checkpoint's --seq-length)",
                      file=sys.stderr, flush=True)
            new = generate(logits_fn, prompt_ids, sampling,
                           vocab_size=tokenizer.vocab_size, context_length=context,
                           eod=tokenizer.eod)
            completion = tokenizer.detokenize(new)
            if args.json:
                print(json.dumps(dict(prompt=prompt, completion=completion, tokens=new)))
            else:
                print(prompt + completion)
    except (CheckpointError, ValueError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
