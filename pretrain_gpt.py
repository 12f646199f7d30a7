#!/usr/bin/env python
"""Pretrain a GPT model (dense, TopK MoE or ReMoE) on megatron-core with Megatron-LM's flags.

    torchrun --nproc-per-node N pretrain_gpt.py [Megatron-LM flags] [--config file.yaml]
    python pretrain_gpt.py --config configs/demo.yaml          # the CPU demo

Parse, build, train: everything else lives in ``remoe_patches``.
"""

import sys

from remoe_patches.cli.launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
