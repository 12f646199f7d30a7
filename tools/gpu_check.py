#!/usr/bin/env python3
"""GPU acceptance in parts: ``make gpu-check PART=tests|train|bench OUT=dir``.

Each part fits one 10-minute GPU command with room to spare (its steps' time limits add up to
under 8 minutes) and prints its own summary (also ``OUT/summary_<part>.md`` and ``.json``);
without ``PART`` all three run in turn.

- ``tests``: ``pytest tests_gpu`` (CUDA's sync detector around ReMoE's router, regularizer and
  update; SDPA and megatron's attention against float64; grouped against sequential experts,
  outputs and gradients; the launcher path with bf16, the distributed optimizer, save and resume).
- ``train``: the real launcher, ``scripts/pretrain_182m_remoe.sh`` with
  ``configs/182m_remoe.yaml`` as written, on the demo corpus: 200 steps saving at 100 and 200,
  then a resume to 240 that must continue from 200 (loss, lambda and sparsity continuous). The
  checkpoints (~10 GB each) go to a temporary directory that is deleted afterwards; the metrics
  and logs stay in ``OUT``.
- ``bench``: ``tools/benchmark.py`` at 182m on the launchers' token path (alltoall) and on the
  sorted one, then at 469m one model at a time, with MoE-layer recomputation on a card of less
  than 100 GiB (ReMoE's stage I, where routing is still dense, peaked at 75.5 GiB on an H200).

Before any part: one line and exit 2 when torch does not import or sees no CUDA device, and
when a package the runs need is missing. On an offline machine with python3, a CUDA torch and
the common packages, megatron-core and psutil (without which megatron's checkpoint writer hangs)
come as wheels in ``.whl/`` (or ``--wheels DIR``), installed with ``--no-deps`` into
``OUT/site``. A step that outlives its time limit is killed with every process it started,
also those in sessions of their own (torchrun's workers).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# stdlib only: importable before the checks that the runs' packages are installed
from remoe_patches.runs.run_directory import LATEST_FILE, METRICS_FILE, metrics_path  # noqa: E402

PARTS = ("tests", "train", "bench")
ALPHA = 1.2  # configs/182m_remoe.yaml's coefficient multiplier (the default)
LARGE_CARD_GIB = 100  # 469m's benchmark needs MoE recomputation below this

# What the GPU runs import, by module, with the distribution that provides it; the first two are
# the ones an offline machine brings as wheels.
NEEDED = {
    "megatron.core": "megatron-core==0.16.1",
    "psutil": "psutil",
    "numpy": "numpy",
    "yaml": "PyYAML",
    "tokenizers": "tokenizers",
    "tensorboard": "tensorboard",
    "pytest": "pytest",
}
FROM_WHEELS = {"megatron.core": "megatron_core-*.whl", "psutil": "psutil-*.whl"}


def refuse(message: str):
    """gpu-check cannot run here: one line on stderr, exit code 2."""
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=PARTS + ("all",),
        default="all",
        help="Which part to run (default: all, one after another).",
    )
    parser.add_argument("--out", default="gpu_check", help="Output directory.")
    parser.add_argument(
        "--wheels",
        default=str(REPO / ".whl"),
        help="Where megatron-core's and psutil's wheels are (offline machines).",
    )
    args = parser.parse_args(argv)
    require_cuda()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment(out, Path(args.wheels))
    device = device_name(env)
    failed = False
    for part in PARTS if args.part == "all" else (args.part,):
        failed |= not write_summary(out, part, device, RUNS[part](out, env))
    return 1 if failed else 0


def require_cuda() -> None:
    """Refuse in one line where the GPU runs cannot start."""
    try:
        import torch
    except ImportError as error:
        refuse(
            f"torch does not import ({error}); this needs python3 with a CUDA build of "
            "torch (the CPU suite is `make test`)"
        )
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        refuse(
            f"needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none; run it "
            "on a GPU machine (the CPU suite is `make test`)"
        )


def environment(out: Path, wheels: Path) -> dict:
    """The subprocesses' environment: the repo importable, missing wheels installed, every
    needed module importable (else a one-line refusal naming each)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    missing = missing_modules(env, FROM_WHEELS)
    if missing:
        found = [w for m in missing for w in sorted(glob.glob(str(wheels / FROM_WHEELS[m])))[-1:]]
        if found:
            site = out / "site"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--upgrade",
                    "--target",
                    str(site),
                    *found,
                ],
                check=True,
            )
            env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    missing = missing_modules(env, NEEDED)
    if missing:
        refuse(
            "missing " + ", ".join(f"{m} ({NEEDED[m]})" for m in missing) + f" for {sys.executable}"
            f"; pip install them, or on an offline machine put the wheels in {wheels} "
            "(README: 'GPU acceptance')"
        )
    # The launchers call `python` and `torchrun` from PATH: make both this interpreter.
    bin_dir = out / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    if not python.exists():
        python.symlink_to(sys.executable)
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(f'#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    torchrun.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def missing_modules(env: dict, modules) -> list:
    code = (
        "import importlib.util as u, sys\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n        found = u.find_spec(m) is not None\n"
        "    except ImportError:\n        found = False\n"
        "    found or print(m)"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True
    )
    return probe.stdout.split()


def run(log: Path, env: dict, timeout: float, *command, extra_env=None) -> tuple[int, float]:
    """``command`` with its output in ``log``; past ``timeout`` it and every process it started
    are killed (exit code 124)."""
    started = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            out.write(
                f"\n[gpu-check] timed out after {timeout:.0f} s; killed it and every "
                "process it started\n"
            )
            code = 124
    return code, time.time() - started


def descendants(pid: int) -> list:
    """Every process below ``pid``, found through parent links (a process that moved to its own
    session or group, as torchrun's workers do, is still a child)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(pid: int, grace: float = 5.0) -> None:
    """SIGTERM to ``pid`` and all its descendants, SIGKILL to whatever is left after ``grace``."""
    targets = [pid] + descendants(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in targets:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while sig == signal.SIGTERM and time.time() < deadline and any(map(alive, targets[1:])):
            time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---- the parts: each returns its rows (step, ok, seconds, detail) ----


def row(step, ok, seconds, detail) -> dict:
    print(f"[gpu-check] {step}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s) {detail}", flush=True)
    return dict(step=step, ok=ok, seconds=round(seconds), detail=detail)


def tests_part(out: Path, env: dict) -> list:
    code, seconds = run(
        out / "tests_gpu.log",
        env,
        420,
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(REPO / "tests_gpu"),
    )
    return [row("tests_gpu", code == 0, seconds, pytest_counts(out / "tests_gpu.log", code))]


def pytest_counts(log: Path, code: int) -> str:
    lines = [
        line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", line)
    ]
    if code == 124:
        return "timed out (see tests_gpu.log)"
    return lines[-1].strip("= ") if lines else "no pytest summary (see tests_gpu.log)"


def bench_part(out: Path, env: dict) -> list:
    runs = [("182m", "alltoall", []), ("182m", "sorted", [])]
    if total_memory_gib(env) < LARGE_CARD_GIB:
        runs.append(("469m", "alltoall", ["--sequential", "--recompute", "moe"]))
    else:
        runs.append(("469m", "alltoall", ["--sequential"]))
    rows = []
    # 140 + 140 + 190 s: the part stays under 8 minutes even when every run hits its limit
    for (preset, dispatcher, extra), limit in zip(runs, (140, 140, 190)):
        name = f"bench_{preset}_{dispatcher}"
        path = out / f"{name}.json"
        code, seconds = run(
            out / f"{name}.log",
            env,
            limit,
            sys.executable,
            str(REPO / "tools" / "benchmark.py"),
            "--preset",
            preset,
            "--moe-token-dispatcher-type",
            dispatcher,
            "--micro-batch-size",
            "8",
            "--steps",
            "10",
            "--rounds",
            "2",
            "--stage1-steps",
            "5",
            "--max-settle-steps",
            "300",
            "--json",
            str(path),
            *extra,
        )
        label = f"benchmark {preset} {dispatcher}" + (f" ({' '.join(extra)})" if extra else "")
        rows.append(
            row(
                label,
                code == 0 and path.exists(),
                seconds,
                benchmark_summary(path) if code != 124 else "timed out",
            )
        )
    return rows


def total_memory_gib(env) -> float:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    return float(probe.stdout.strip() or 0)


def benchmark_summary(path: Path) -> str:
    if not path.exists():
        return "no JSON (see the log)"
    report = json.loads(path.read_text())
    parts = []
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") is not None else "no MFU"
        memory = f", {r['peak_memory'] / 2**30:.1f} GiB peak" if r.get("peak_memory") else ""
        parts.append(
            f"{r['label']}: {r['median_ms']:.1f} ms, {mfu}, {r['syncs_per_step']:.0f} syncs{memory}"
        )
    return "; ".join(parts)


def train_part(out: Path, env: dict) -> list:
    """200 steps saving at 100 and 200, then a resume to 240: it must continue from 200."""
    started = time.time()
    corpus_code = (
        "from remoe_patches.data.demo_corpus import ensure_demo_corpus as e; c = e(); "
        "print(c.data_prefix, c.vocab_file, c.merge_file)"
    )
    corpus = subprocess.run(
        [sys.executable, "-c", corpus_code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    if corpus.returncode != 0:
        (out / "demo_corpus.log").write_text(corpus.stdout + corpus.stderr)
        return [
            row(
                "launcher 182m_remoe save+resume",
                False,
                time.time() - started,
                "demo corpus failed (see demo_corpus.log)",
            )
        ]
    data, vocab, merges = corpus.stdout.split()[-3:]
    save = Path(tempfile.mkdtemp(prefix="gpu_check_launcher_"))
    try:
        ok, detail = launch_and_resume(out, env, save, data, vocab, merges)
    finally:
        if os.path.exists(metrics_path(save)):
            shutil.copy(metrics_path(save), out / "launcher_metrics.jsonl")
        shutil.rmtree(save, ignore_errors=True)
    return [row("launcher 182m_remoe save+resume", ok, time.time() - started, detail)]


def launch_and_resume(out, env, save, data, vocab, merges) -> tuple[bool, str]:
    launch_env = dict(
        GPUS_PER_NODE="1",
        CHECKPOINT_DIR=str(save),
        DATA_PATH=data,
        VOCAB_FILE=vocab,
        MERGE_FILE=merges,
        MASTER_PORT="29517",
    )
    # The same schedule (decay over 240 steps) in both runs, so the resume continues one run.
    flags = [
        "--micro-batch-size",
        "16",
        "--global-batch-size",
        "32",
        "--lr-decay-iters",
        "240",
        "--save-interval",
        "100",
        "--eval-interval",
        "100",
        "--eval-iters",
        "2",
        "--log-interval",
        "10",
        "--make-vocab-size-divisible-by",
        "128",
    ]
    script = str(REPO / "scripts" / "pretrain_182m_remoe.sh")
    for log, iters, limit in (
        ("launcher_200.log", "200", 230),
        ("launcher_resume_240.log", "240", 150),
    ):
        code, _ = run(
            out / log, env, limit, script, *flags, "--train-iters", iters, extra_env=launch_env
        )
        if code != 0:
            return False, f"exit {code}{' (timed out)' if code == 124 else ''} (see {log})"
    return resume_continuity(save)


def resume_continuity(save: Path, stop=200, end=240, interval=10) -> tuple[bool, str]:
    """Whether the run resumed at ``stop`` continues it: the resumed run's first log window
    (``stop + interval``) against the first run's last (``stop``), and a checkpoint at ``end``.

    A window's loss may move by 5%, the sparsity by 0.05, lambda by at most one factor alpha
    per step; a run that restarted from scratch (loss and lambda back at their start) fails.
    """
    records = {}
    for line in open(metrics_path(save)):
        record = json.loads(line)
        if "lm_loss" in record:
            records[record["iteration"]] = record  # the resume appends; later wins
    before, after = records.get(stop), records.get(stop + interval)
    if not before or not after:
        return False, f"iterations {stop} and {stop + interval} are not both in {METRICS_FILE}"
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
    latest = save / LATEST_FILE
    if not latest.exists() or latest.read_text().strip() != str(end):
        problems.append(f"no checkpoint at {end}")
    first, last = records[min(records)], records[max(records)]
    detail = (
        f"loss {first['lm_loss']:.2f} -> {before['lm_loss']:.2f} ({stop}) -> "
        f"{after['lm_loss']:.2f} ({stop + interval}) -> {last['lm_loss']:.2f} "
        f"({max(records)}); sparsity {before['sparsity']:.3f} -> {after['sparsity']:.3f}; "
        f"lambda {before['l1_coeff']:.3g} -> {after['l1_coeff']:.3g}; "
        f"{before.get('tokens_per_sec', 0):,.0f} tokens/s"
    )
    return not problems, detail + ("" if not problems else "; PROBLEMS: " + "; ".join(problems))


RUNS = {"tests": tests_part, "train": train_part, "bench": bench_part}


def write_summary(out: Path, part: str, device: str, rows: list) -> bool:
    """Print and write the part's summary; whether every step passed."""
    total = sum(r["seconds"] for r in rows)
    lines = [
        f"# gpu-check {part}, {device}, {time.strftime('%Y-%m-%d')}, {total} s",
        "",
        "| step | result | seconds | detail |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | {r['detail']} |"
        for r in rows
    ]
    summary = "\n".join(lines)
    print("\n" + summary, flush=True)
    (out / f"summary_{part}.md").write_text(summary + "\n")
    (out / f"summary_{part}.json").write_text(json.dumps(rows, indent=1))
    return bool(rows) and all(r["ok"] for r in rows)


def device_name(env) -> str:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.cuda.get_device_name()"
            " if torch.cuda.is_available() else 'no CUDA device')",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    return probe.stdout.strip() or "unknown device"


if __name__ == "__main__":
    sys.exit(main())
