#!/usr/bin/env python
"""Benchmark dense vs TopK MoE vs ReMoE training steps of one preset and print one table.

    python tools/benchmark.py --preset tiny                       # CPU, seconds
    python tools/benchmark.py --preset 182m --micro-batch-size 8  # one GPU (bf16, grouped GEMM)
    python tools/benchmark.py --preset 469m --json bench.json

The models share the preset and the active parameters per token (dense FFN = k experts), train
with pretrain_gpt.py's code on synthetic tokens, and are timed after a warm-up, in alternating
rounds (--sequential: one after another); ReMoE is measured in stage I (dense routing, right
after the warm-up) and stage III (after its sparsity settles at 1 - k/E). See
remoe_patches/experiments/benchmark.py for what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv):
    from remoe_patches.experiments.benchmark import DEFAULT_ROUTERS, ROUTERS, BenchmarkConfig
    from remoe_patches.config.model_config import PRESETS

    defaults = BenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--preset", choices=list(PRESETS), default=defaults.preset)
    for name in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "seq_length",
        "vocab_size",
        "ffn_hidden_size",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, dest=name, help="Override the preset's value."
        )
    parser.add_argument("--num-experts", type=int, default=defaults.num_experts, help="E.")
    parser.add_argument(
        "--moe-router-topk", type=int, default=defaults.topk, dest="topk", help="k."
    )
    parser.add_argument(
        "--moe-granularity", type=int, default=defaults.granularity, dest="granularity", help="G."
    )
    parser.add_argument(
        "--routers",
        nargs="+",
        choices=ROUTERS,
        default=list(DEFAULT_ROUTERS),
        help="Routers to compare (default: dense topk relu).",
    )
    parser.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size)
    parser.add_argument("--num-microbatches", type=int, default=defaults.num_microbatches)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="Timed steps a phase.")
    parser.add_argument(
        "--stage1-steps",
        type=int,
        default=defaults.stage1_steps,
        help="Timed steps of ReMoE's stage I.",
    )
    parser.add_argument("--max-settle-steps", type=int, default=defaults.max_settle_steps)
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="Alternating timing rounds (the timed steps split over them).",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="Measure and free one model at a time (for models that do not fit "
        "in memory together) instead of alternating rounds.",
    )
    parser.add_argument("--recompute", choices=["none", "moe", "full"], default=defaults.recompute)
    parser.add_argument(
        "--grouped-gemm",
        action=argparse.BooleanOptionalAction,
        default=defaults.grouped_gemm,
        help="Grouped-GEMM experts.",
    )
    parser.add_argument(
        "--moe-token-dispatcher-type",
        dest="token_dispatcher",
        choices=["sorted", "alltoall", "allgather"],
        default=defaults.token_dispatcher,
        help="The MoE models' token path.",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 mixed precision (default: on GPUs).",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="The device's peak for MFU (default: by device name)."
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", metavar="PATH", help="Also write the results as JSON.")
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "seq_length",
            "vocab_size",
            "ffn_hidden_size",
        )
        if getattr(args, name) is not None
    }
    config = BenchmarkConfig(
        preset=args.preset,
        model_overrides=overrides,
        num_experts=args.num_experts,
        topk=args.topk,
        granularity=args.granularity,
        routers=tuple(args.routers),
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        stage1_steps=args.stage1_steps,
        max_settle_steps=args.max_settle_steps,
        recompute=args.recompute,
        interleave=not args.sequential,
        rounds=args.rounds,
        grouped_gemm=args.grouped_gemm,
        bf16=args.bf16,
        peak_tflops=args.peak_tflops,
        token_dispatcher=args.token_dispatcher,
        seed=args.seed,
    )
    return config, args.json


def main(argv=None) -> int:
    from remoe_patches.experiments.benchmark import format_table, run_benchmark, to_json
    from remoe_patches.config.model_config import ConfigError, ParallelConfig
    from remoe_patches.runtime.parallel import destroy_parallel, initialize_parallel

    config, json_path = parse(argv)
    try:
        config.validate()
        initialize_parallel(ParallelConfig(), seed=config.seed)
        report = run_benchmark(config, progress=lambda line: print(line, flush=True))
    except (ConfigError, ValueError) as error:
        if os.environ.get("REMOE_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    print(
        f"\n{report['device']}, preset {config.preset}"
        + (f" {config.model_overrides}" if config.model_overrides else "")
        + f", E={config.num_experts} k={config.topk} G={config.granularity}, micro-batch "
        f"{config.micro_batch_size} x {config.num_microbatches}, {config.steps} timed steps "
        f"({config.stage1_steps} in ReMoE's stage I)\n"
    )
    print(format_table(report), flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{json_path}.partial"
        with open(tmp, "w") as out:
            json.dump(to_json(report), out, indent=1)
        os.replace(tmp, json_path)
        print(f"\n json: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
