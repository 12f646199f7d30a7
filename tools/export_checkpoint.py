#!/usr/bin/env python
"""Export a pretrain_gpt.py checkpoint (any TP/EP/PP layout) to safetensors + config.json.

    python tools/export_checkpoint.py --load ckpt/182m_dense --output exported/182m_dense
    python tools/export_checkpoint.py --load ckpt/182m_remoe --output exported/182m_remoe --bf16

writes ``OUT/model.safetensors`` (all parallel shards merged; float32, or bfloat16 with
``--bf16``), ``OUT/config.json`` and the tokenizer files. A dense run becomes a standard
transformers ``LlamaForCausalLM`` (Llama's parameter names and config.json, no remote code); a
MoE run (TopK, ReMoE) keeps megatron's parameter names, with config.json holding the
architecture (sizes, router kind, experts, k, granularity, rotary base, norm epsilon, vocabulary,
tokenizer) and the transformers remote code beside it (``trust_remote_code=True``). Run either
with ``remoe_patches.inference.hf_export.load_export_for_inference(OUT)`` (plain PyTorch, no
megatron), ``tools/generate.py --load OUT`` or ``tools/evaluate.py --load OUT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--load",
        required=True,
        metavar="DIR",
        help="pretrain_gpt.py --save directory (latest checkpoint) or one iter_XXXXXXX directory.",
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="Export directory.")
    parser.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="Directory now holding the checkpoint's tokenizer files.",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Export into a non-empty directory, overwriting the exported files.",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="Save the weights in bfloat16 (half the size; config.json's "
        "torch_dtype says so). Default: float32, the checkpoint's weights exactly.",
    )
    args = parser.parse_args(argv)

    from remoe_patches.train.checkpointing import CheckpointError
    from remoe_patches.inference.hf_export import export_checkpoint

    try:
        out = export_checkpoint(
            args.load,
            args.output,
            tokenizer_dir=args.tokenizer_dir,
            force=args.force,
            dtype="bfloat16" if args.bf16 else "float32",
        )
    except CheckpointError as error:  # the message names the directory
        print(f"export_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a model the export does not cover, e.g. the Hash router
        print(f"export_checkpoint.py: error: --load {args.load}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # --output not writable, a full disk
        print(f"export_checkpoint.py: error: --output {args.output}: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.load} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
