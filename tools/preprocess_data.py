"""Tokenize a jsonl corpus into Megatron indexed datasets, with Megatron-LM's command line.

    python tools/preprocess_data.py --input X.jsonl --output-prefix P \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --append-eod --workers 32

writes ``P_text_document.bin`` and ``P_text_document.idx`` (one pair per ``--json-keys`` key),
readable by Megatron-LM and megatron-core. The work is done by
``remoe_patches.data.preprocess.preprocess_jsonl``.
"""

import argparse
import importlib.util
import os
import sys

if importlib.util.find_spec("remoe_patches") is None:
    # Run from a checkout without installing the package: the repository root is our parent.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from remoe_patches.data.preprocess import preprocess_jsonl  # noqa: E402
from remoe_patches.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Parse Megatron-LM's preprocess_data.py flags (the subset this tool implements)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="jsonl file, one json object per line")
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, help=", ".join(TOKENIZER_TYPES))
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument(
        "--tokenizer-model",
        help="SentencePiece .model (SentencePieceTokenizer), tokenizer.json (HuggingFaceTokenizer)",
    )
    group.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx"
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    group.add_argument(
        "--log-interval", type=int, default=1000, help="report every this many documents"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the tool; return the process exit status."""
    args = parse_args(argv)
    try:
        tokenizer = build_tokenizer(
            args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model,
        )
        prefixes = preprocess_jsonl(
            args.input,
            args.output_prefix,
            tokenizer,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
        )
    except ValueError as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 1
    for prefix in prefixes.values():
        print(f"wrote {prefix}.bin and {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
