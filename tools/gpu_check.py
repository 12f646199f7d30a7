#!/usr/bin/env python3
"""GPU acceptance in one command: ``make gpu-check OUT=dir`` (or ``python3 tools/gpu_check.py``).

Sized for one H100/H200 in about 8 minutes. In order, each step a subprocess with a time limit:

1. ``pytest tests_gpu`` (CUDA sync detector around ReMoE's router and regularizer, the local
   fast layers against megatron's and a float64 formula, the launcher path with save/resume);
2. ``tools/benchmark.py --preset 182m`` and ``--preset 469m`` with ``--json`` (dense, TopK,
   ReMoE stage I and III: ms/step, MFU, memory, router share, host syncs);
3. the real launcher, ``scripts/pretrain_182m_remoe.sh`` with ``configs/182m_remoe.yaml`` (bf16,
   distributed optimizer, both overlap flags, grouped GEMM, MoE-layer recomputation) on the demo
   corpus: 200 steps saving at 100 and 200, then a resume to 240 that must continue from 200
   (loss, the L1 coefficient and sparsity continuous).

It prints a summary (also ``OUT/summary.md`` and ``OUT/summary.json``) and exits non-zero if a
step failed. Everything it writes goes to ``OUT`` (default ``gpu_check/``): logs, benchmark
JSON, the launcher's metrics. On an offline machine that has only python3 with a CUDA torch and
common packages, megatron-core comes from its wheel: ``--megatron-wheel PATH`` (default: the
``megatron_core-*.whl`` in ``.whl/``) is installed with ``--no-deps`` into ``OUT/site`` when
``megatron.core`` does not import.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALPHA = 1.2  # configs/182m_remoe.yaml's coefficient multiplier (the default)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="Output directory.")
    parser.add_argument("--megatron-wheel", help="megatron-core wheel for an offline machine.")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "benchmark", "launcher"])
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(out, args.megatron_wheel)
    rows, started = [], time.time()

    def record(name, ok, seconds, detail):
        rows.append(dict(step=name, ok=ok, seconds=round(seconds), detail=detail))
        print(f"[gpu-check] {name}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s) {detail}",
              flush=True)

    if "tests" not in args.skip:
        result, seconds = run(out / "tests_gpu.log", env, 240,
                              sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(REPO / "tests_gpu"))
        record("tests_gpu", result == 0, seconds, pytest_counts(out / "tests_gpu.log"))
    if "benchmark" not in args.skip:
        for preset, settle in (("182m", 300), ("469m", 300)):
            path = out / f"bench_{preset}.json"
            result, seconds = run(out / f"bench_{preset}.log", env, 150,
                                  sys.executable, str(REPO / "tools" / "benchmark.py"),
                                  "--preset", preset, "--micro-batch-size", "8", "--steps", "10",
                                  "--rounds", "2", "--stage1-steps", "5",
                                  "--max-settle-steps", str(settle), "--json", str(path))
            record(f"benchmark {preset}", result == 0 and path.exists(), seconds,
                   benchmark_summary(path))
    if "launcher" not in args.skip:
        ok, seconds, detail = launcher_check(out, env)
        record("launcher 182m_remoe save+resume", ok, seconds, detail)

    total = time.time() - started
    lines = [f"# gpu-check, {device_name(env)}, {time.strftime('%Y-%m-%d')}, {total:.0f} s", "",
             "| step | result | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | {r['detail']} |"
              for r in rows]
    summary = "\n".join(lines)
    print("\n" + summary, flush=True)
    (out / "summary.md").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(r["ok"] for r in rows) else 1


def environment(out: Path, wheel) -> dict:
    """The subprocesses' environment: the repo importable, megatron-core from its wheel if need be."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = [str(REPO)]
    probe = subprocess.run([sys.executable, "-c", "import megatron.core"], capture_output=True)
    if probe.returncode != 0:
        wheels = [wheel] if wheel else glob.glob(str(REPO / ".whl" / "megatron_core-*.whl"))
        if not wheels:
            sys.exit("gpu-check: megatron.core does not import and no megatron_core-*.whl was "
                     "found; pass --megatron-wheel PATH (pip download megatron-core==0.16.1)")
        site = out / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--upgrade", "--target", str(site), wheels[0]], check=True)
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The launchers call `python` and `torchrun` from PATH: make both this interpreter.
    bin_dir = out / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    if not python.exists():
        python.symlink_to(sys.executable)
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(f"#!/bin/sh\nexec {sys.executable} -m torch.distributed.run \"$@\"\n")
    torchrun.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def run(log: Path, env: dict, timeout: int, *command, extra_env=None) -> tuple[int, float]:
    started = time.time()
    with open(log, "w") as out:
        try:
            result = subprocess.run(command, cwd=REPO, env={**env, **(extra_env or {})},
                                    stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            code = result.returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu-check] timed out after {timeout} s\n")
            code = 124
    return code, time.time() - started


def pytest_counts(log: Path) -> str:
    lines = [l for l in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", l)]
    return lines[-1].strip("= ") if lines else "no pytest summary (see tests_gpu.log)"


def benchmark_summary(path: Path) -> str:
    if not path.exists():
        return "no JSON (see the log)"
    report = json.loads(path.read_text())
    parts = []
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") is not None else "no MFU"
        parts.append(f"{r['label']}: {r['median_ms']:.1f} ms, {mfu}, "
                     f"{r['syncs_per_step']:.0f} syncs")
    return "; ".join(parts)


def launcher_check(out: Path, env: dict) -> tuple[bool, float, str]:
    """200 steps saving at 100 and 200, then a resume to 240: it must continue from 200."""
    started = time.time()
    corpus_code = ("from remoe_patches.demo_corpus import ensure_demo_corpus as e; c = e(); "
                   "print(c.data_prefix, c.vocab_file, c.merge_file)")
    corpus = subprocess.run([sys.executable, "-c", corpus_code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    if corpus.returncode != 0:
        (out / "demo_corpus.log").write_text(corpus.stdout + corpus.stderr)
        return False, time.time() - started, "demo corpus failed (see demo_corpus.log)"
    data, vocab, merges = corpus.stdout.split()[-3:]
    save = out / "launcher"
    launch_env = dict(GPUS_PER_NODE="1", CHECKPOINT_DIR=str(save), DATA_PATH=data,
                      VOCAB_FILE=vocab, MERGE_FILE=merges, MASTER_PORT="29517")
    # The same schedule (decay over 240 steps) in both runs, so the resume continues one run.
    flags = ["--micro-batch-size", "16", "--global-batch-size", "32", "--lr-decay-iters", "240",
             "--save-interval", "100", "--eval-interval", "100", "--eval-iters", "2",
             "--log-interval", "10", "--make-vocab-size-divisible-by", "128"]
    script = str(REPO / "scripts" / "pretrain_182m_remoe.sh")
    for log, iters in (("launcher_200.log", "200"), ("launcher_resume_240.log", "240")):
        code, _ = run(out / log, env, 200, script, *flags, "--train-iters", iters,
                      extra_env=launch_env)
        if code != 0:
            return False, time.time() - started, f"exit {code} (see {log})"
    ok, detail = resume_continuity(save)
    return ok, time.time() - started, detail


def resume_continuity(save: Path, stop=200, end=240, interval=10) -> tuple[bool, str]:
    """Whether the run resumed at ``stop`` continues it: the resumed run's first log window
    (``stop + interval``) against the first run's last (``stop``), and a checkpoint at ``end``.

    A window's loss may move by 5%, the sparsity by 0.05, lambda by at most one factor alpha
    per step; a run that restarted from scratch (loss and lambda back at their start) fails.
    """
    records = {}
    for line in open(save / "metrics.jsonl"):
        record = json.loads(line)
        if "lm_loss" in record:
            records[record["iteration"]] = record  # the resume appends; later wins
    before, after = records.get(stop), records.get(stop + interval)
    if not before or not after:
        return False, f"iterations {stop} and {stop + interval} are not both in metrics.jsonl"
    problems = []
    if sorted(records) != list(range(interval, end + 1, interval)):
        problems.append(f"logged iterations {sorted(records)[:3]}...{sorted(records)[-3:]}")
    if abs(after["lm_loss"] - before["lm_loss"]) > 0.05 * before["lm_loss"]:
        problems.append(f"lm loss jumps {before['lm_loss']:.3f} -> {after['lm_loss']:.3f}")
    ratio = after["l1_coeff"] / before["l1_coeff"]
    if not ALPHA ** -(interval + 0.5) <= ratio <= ALPHA ** (interval + 0.5):
        problems.append(f"l1 coeff jumps x{ratio:.3g} in {interval} steps")
    if abs(after["sparsity"] - before["sparsity"]) > 0.05:
        problems.append(f"sparsity jumps {before['sparsity']:.3f} -> {after['sparsity']:.3f}")
    latest = save / "latest_checkpointed_iteration.txt"
    if not latest.exists() or latest.read_text().strip() != str(end):
        problems.append(f"no checkpoint at {end}")
    first, last = records[min(records)], records[max(records)]
    detail = (f"loss {first['lm_loss']:.2f} -> {before['lm_loss']:.2f} ({stop}) -> "
              f"{after['lm_loss']:.2f} ({stop + interval}) -> {last['lm_loss']:.2f} "
              f"({max(records)}); sparsity {before['sparsity']:.3f} -> {after['sparsity']:.3f}; "
              f"lambda {before['l1_coeff']:.3g} -> {after['l1_coeff']:.3g}; "
              f"{before.get('tokens_per_sec', 0):,.0f} tokens/s")
    return not problems, detail + ("" if not problems else "; PROBLEMS: " + "; ".join(problems))


def device_name(env) -> str:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name()"
                            " if torch.cuda.is_available() else 'no CUDA device')"],
                           capture_output=True, text=True, env=env)
    return probe.stdout.strip() or "unknown device"


if __name__ == "__main__":
    sys.exit(main())
