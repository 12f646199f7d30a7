#!/usr/bin/env python
"""Validate a launcher's pretrain_gpt.py flags for a world size, without training.

    python scripts/_check_launch.py --world-size 8 [--gpus-per-node 8 --nnodes 1] -- FLAGS...

Called by ``scripts/_launch.sh`` (every launch, and ``--dry-run``). The flags go through
pretrain_gpt.py's own parser (``remoe_patches.cli.arguments.parse_args``) and its mapping onto the
model and parallel configs; then the layout is checked against the world size and the global
batch against the data-parallel size, as ``pretrain_gpt.py`` does once it has started. A
problem is one line on stderr and exit code 2; a valid command prints a summary and exits 0.
Tokenizer and data files are only looked for (a note when absent here): the dry run may be
prepared on a machine that does not see the cluster's file system.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore")  # megatron-core's import-time notices (no TE, no apex)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GPT2_VOCAB = 50257  # GPT-2 BPE's size, assumed when the vocab file is not readable here


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("_check_launch.py: error: put the pretrain_gpt.py flags after --", file=sys.stderr)
        return 2
    split = argv.index("--")
    own = argparse.ArgumentParser(prog="_check_launch.py")
    own.add_argument("--world-size", type=int, required=True)
    own.add_argument("--gpus-per-node", type=int)
    own.add_argument("--nnodes", type=int, default=1)
    options = own.parse_args(argv[:split])
    flags = argv[split + 1 :]

    from remoe_patches.config.run_config import split_blend
    from remoe_patches.cli.arguments import parse_run_config
    from remoe_patches.config.model_config import ConfigError
    from remoe_patches.config.router_registry import ROUTERS
    from remoe_patches.data.tokenizer import build_tokenizer, vocab_size_with_padding
    from remoe_patches.train.training import check_batch_sizes

    # one line on stderr and exit 2 when the flags are not valid
    config = parse_run_config(flags)
    parallel, data, training = config.parallel, config.data, config.training
    prog = "_check_launch.py: error: "
    try:
        parallel.validate_world(options.world_size)
        dp = parallel.data_parallel_size(options.world_size)
        training = check_batch_sizes(training, dp)
    except ConfigError as error:
        print(prog + str(error), file=sys.stderr)
        return 2
    accumulation = training.global_batch_size // (training.micro_batch_size * dp)

    notes = []
    vocab = None
    if data.tokenizer_type == "GPT2BPETokenizer":
        if os.path.isfile(data.vocab_file) and os.path.isfile(data.merge_file):
            vocab = build_tokenizer(
                data.tokenizer_type, vocab_file=data.vocab_file, merge_file=data.merge_file
            ).vocab_size
        else:
            notes.append(
                f"tokenizer files not found here ({data.vocab_file}, {data.merge_file}); "
                f"the parameter count assumes GPT-2's {GPT2_VOCAB} tokens"
            )
    padded = vocab_size_with_padding(
        vocab or GPT2_VOCAB, data.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size
    )
    model = config.replace(model=dict(vocab_size=padded)).model
    if data.data_path:
        prefixes, _ = split_blend(data.data_path)
        absent = [p for p in prefixes if not os.path.isfile(p + ".idx")]
        if absent:
            notes.append(
                f"{len(absent)} of {len(prefixes)} --data-path prefixes not found here "
                f"(first: {absent[0]}.bin/.idx)"
            )

    router = ROUTERS[model.router].title
    moe = ""
    if model.is_moe:
        moe = f"; E={model.num_experts} k={model.topk} G={model.granularity}" + (
            f", target sparsity {model.target_sparsity:g}" if model.kind.adaptive_l1 else ""
        )
    global_batch = training.global_batch_size
    iterations = training.train_iters
    tokens = iterations * global_batch * model.seq_length
    nodes = (
        f"{options.nnodes} node(s) x {options.gpus_per_node} GPUs"
        if options.gpus_per_node
        else f"{options.world_size} ranks"
    )
    print("dry run: valid for pretrain_gpt.py (nothing was started)")
    print(
        f"  world: {options.world_size} ranks = {nodes}; TP={parallel.tensor_model_parallel_size}"
        f" PP={parallel.pipeline_model_parallel_size} EP={parallel.expert_model_parallel_size}"
        f" DP={dp}; sequence parallel {'on' if parallel.sequence_parallel else 'off'}"
    )
    print(
        f"  model: {router}, {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads ({model.num_query_groups} query groups), FFN "
        f"{model.dense_ffn_hidden_size}{moe}; {model.num_parameters() / 1e6:,.0f}M parameters "
        f"(vocabulary {padded})"
    )
    print(
        f"  training: {iterations} iterations x {global_batch} sequences x "
        f"{model.seq_length} tokens = {_count(tokens)} tokens; micro batch "
        f"{training.micro_batch_size} x {accumulation} accumulation steps x DP {dp}; lr "
        f"{training.lr:g} -> {training.min_lr:g} {training.lr_decay_style}; "
        f"{'bf16' if training.bf16 else 'fp32'}"
    )
    for note in notes:
        print(f"  note: {note}")
    return 0


def _count(number: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return str(number)


if __name__ == "__main__":
    sys.exit(main())
