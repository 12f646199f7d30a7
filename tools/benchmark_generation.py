#!/usr/bin/env python
"""Time text generation with and without the key/value cache; print one table.

    python tools/benchmark_generation.py --load runs/demo         # a checkpoint or an export
    python tools/benchmark_generation.py --router topk            # random weights, demo size
    python tools/benchmark_generation.py --load runs/demo --prompts 8 --new-tokens 128

Four ways to generate the same greedy tokens with the reference model (``generation.generate``),
timed in alternating rounds so that the machine's drift falls on all of them alike:

- recompute, each prompt alone: the loop before the cache (the whole context for every token);
- recompute, batched: the prompts left-padded together, the whole context for every token;
- cache, each prompt alone: the prompt once, then one position per token;
- cache, batched: what ``tools/generate.py`` does.

The prompts are random token ids, their lengths spread evenly over ``--prompt-tokens MIN MAX``;
every prompt gets exactly ``--new-tokens`` (no stop at the end-of-document token), and the table
says whether all four gave the same tokens. Without ``--load`` the model has random weights of
the demo's size (``configs/demo.yaml``): ReLU routing then activates about half of the experts,
as in ReMoE's stage I, so time a trained ReMoE with ``--load``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = (
    ("recompute, each prompt alone (before the cache)", False, False),
    ("recompute, batched (left-padded)", False, True),
    ("key/value cache, each prompt alone", True, False),
    ("key/value cache, batched (tools/generate.py)", True, True),
)
"""(title, use_cache, batched)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--load",
        metavar="DIR",
        help="checkpoint (--save directory or iter_XXXXXXX) or export directory; "
        "default: random weights of the demo's size",
    )
    parser.add_argument(
        "--router",
        choices=("dense", "topk", "relu"),
        default="relu",
        help="the random model's router (without --load)",
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batch")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs=2,
        default=(16, 64),
        metavar=("MIN", "MAX"),
        help="prompt lengths, spread evenly",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens added to each prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of every mode")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts and random weights")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: torch's own choice); on a machine "
        "that other jobs share, 1 keeps OpenMP threads from waiting on each other",
    )
    parser.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="directory now holding a checkpoint's tokenizer files",
    )
    return parser.parse_args(argv)


def random_model(router: str, seed: int):
    """The demo's shape (configs/demo.yaml) with weights drawn as at initialisation."""
    import torch

    from remoe_patches.inference.reference_model import GPT, GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=4096,
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=4,
        head_dim=32,
        seq_length=256,
        rotary_base=1e6,
        norm_epsilon=1e-5,
        router=router,
        ffn_hidden_size=512,
        num_experts=8,
        topk=1,
        expert_ffn_hidden_size=512,
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" not in name:
                parameter.normal_(0.0, 0.01)
    return model, config.vocab_size


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from remoe_patches.train.checkpointing import CheckpointError
    from remoe_patches.inference.generation import SamplingConfig, generate, load_for_generation
    from remoe_patches.inference.reference_model import GPT

    low, high = args.prompt_tokens
    if not (
        args.prompts >= 1
        and 1 <= low <= high
        and args.new_tokens >= 1
        and args.repeats >= 1
        and (args.threads or 1) >= 1
    ):
        print(
            "benchmark_generation.py: error: --prompts, --new-tokens, --repeats, --threads "
            "and --prompt-tokens MIN MAX must be >= 1, with MIN <= MAX",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load:
        try:
            loaded = load_for_generation(args.load, tokenizer_dir=args.tokenizer_dir)
        except (CheckpointError, ValueError) as error:
            print(f"benchmark_generation.py: error: {error}", file=sys.stderr)
            return 2
        if not isinstance(loaded.model, GPT):
            print(
                f"benchmark_generation.py: error: --load {args.load}: no key/value cache for "
                f"this model ({loaded.no_cache_reason}); nothing to compare",
                file=sys.stderr,
            )
            return 2
        model, vocab, context = loaded.model, loaded.tokenizer.vocab_size, loaded.context_length
        described = f"--load {args.load}"
    else:
        model, vocab = random_model(args.router, args.seed)
        context = model.config.seq_length
        described = "random weights of the demo's size"
    if high + args.new_tokens > context:
        print(
            f"benchmark_generation.py: note: prompts of up to {high} tokens plus "
            f"{args.new_tokens} new ones pass the model's {context}-token context: the rows "
            "that do are recomputed past it",
            file=sys.stderr,
        )

    generator = torch.Generator().manual_seed(args.seed)
    lengths = [
        round(low + (high - low) * i / max(args.prompts - 1, 1)) for i in range(args.prompts)
    ]
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    sampling = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens, stop_at_eod=False)

    def run(use_cache: bool, batched: bool, config=sampling) -> list:
        target = model if use_cache or batched else (lambda tokens: model(tokens))
        common = dict(vocab_size=vocab, context_length=context, use_cache=use_cache)
        if batched:
            return generate(target, prompts, config, **common)
        return [generate(target, [prompt], config, **common)[0] for prompt in prompts]

    load_before = os.getloadavg()[0]  # other processes on the cores slow every mode
    warm_up = SamplingConfig(temperature=0, max_new_tokens=2, stop_at_eod=False)
    for _, use_cache, batched in MODES:
        run(use_cache, batched, warm_up)
    seconds = {title: [] for title, _, _ in MODES}
    tokens = {}
    for _ in range(args.repeats):
        for title, use_cache, batched in MODES:
            start = time.perf_counter()
            tokens[title] = run(use_cache, batched)
            seconds[title].append(time.perf_counter() - start)

    new_tokens = args.prompts * args.new_tokens
    threads = torch.get_num_threads()
    parameters = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"command: python tools/benchmark_generation.py {shlex.join(sys.argv[1:])}")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{threads} thread{'s' if threads > 1 else ''}, float32; "
        f"{datetime.date.today().isoformat()}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(
        f"model: {described}: {cfg.router}, {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, {cfg.num_experts or 'no'} experts, {parameters / 1e6:.1f}M "
        f"parameters, context {context}"
    )
    print(
        f"work: {args.prompts} prompts of {low}-{high} tokens, {args.new_tokens} new tokens "
        f"each ({new_tokens} in all), greedy; the median of {args.repeats} "
        f"round{'s' if args.repeats > 1 else ''}"
    )
    print()
    print("| mode | seconds: median (min-max) | new tokens/s | speed-up |")
    print("|---|---|---|---|")
    baseline = statistics.median(seconds[MODES[0][0]])
    for title, _, _ in MODES:
        median = statistics.median(seconds[title])
        print(
            f"| {title} | {median:.2f} ({min(seconds[title]):.2f}-{max(seconds[title]):.2f}) "
            f"| {new_tokens / median:,.0f} | {baseline / median:.1f}x |"
        )
    same = all(tokens[title] == tokens[MODES[0][0]] for title, _, _ in MODES)
    print()
    print(f"same tokens in all four modes: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
