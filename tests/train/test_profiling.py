"""profiling: Megatron-LM's --profile flags. The torch profiler runs here for real (CPU); CUDA's
profiler range and memory history, which need a GPU, are checked through stand-ins for torch's
CUDA calls that record when they are made."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from command_lines import TINY_MOE_FLAGS

from remoe_patches.train import profiling
from remoe_patches.cli.arguments import parse_run_config

REPO = Path(__file__).resolve().parent.parent.parent
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def logging_config(*flags):
    return parse_run_config([*TINY_MOE_FLAGS, "--mock-data", *flags]).logging


def run_steps(profiler, steps=6):
    """Megatron-LM's loop: before each step the steps done so far, after it the new count."""
    for done in range(steps):
        profiler.before_step(done)
        with torch.profiler.record_function(f"step_{done + 1}"):
            torch.ones(8, 8) @ torch.ones(8, 8)
        profiler.after_step(done + 1)
    profiler.stop()


def test_the_pytorch_profiler_traces_the_chosen_steps(tmp_path):
    """--profile-step-start 2 --profile-step-end 4: steps 3 and 4, one trace file that Perfetto
    and TensorBoard's profiler plugin read (Chrome trace JSON)."""
    logging = logging_config(
        "--profile",
        "--use-pytorch-profiler",
        "--profile-step-start",
        "2",
        "--profile-step-end",
        "4",
        "--tensorboard-dir",
        str(tmp_path),
    )
    profiler = profiling.StepProfiler.for_run(logging, rank=0, save=None, device=CPU)
    run_steps(profiler)
    traces = list(tmp_path.glob("*.pt.trace.json"))
    assert len(traces) == 1 and profiler.trace_written
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"step_3", "step_4"} <= names
    assert not {"step_1", "step_2", "step_5", "step_6"} & names


def test_only_the_profile_ranks_profile(tmp_path):
    logging = logging_config("--profile", "--use-pytorch-profiler", "--profile-ranks", "1", "3")
    assert logging.profile_ranks == (1, 3)
    assert profiling.StepProfiler.for_run(logging, rank=0, save=None, device=CPU) is None
    assert profiling.StepProfiler.for_run(
        logging, rank=3, save=str(tmp_path), device=CPU
    ).trace_dir == str(tmp_path / "profile")
    assert profiling.StepProfiler.for_run(logging_config(), rank=0, save=None, device=CPU) is None


def test_the_nsys_range_opens_and_closes_around_the_chosen_steps(monkeypatch):
    """Without --use-pytorch-profiler: cudaProfilerStart before step start+1, Stop after step
    end, with NVTX ranges in between (what nsys --capture-range=cudaProfilerApi records)."""
    calls = []
    monkeypatch.setattr(profiling, "cuda_profiler_start", lambda: calls.append("start"))
    monkeypatch.setattr(profiling, "cuda_profiler_stop", lambda: calls.append("stop"))

    @contextlib.contextmanager
    def emit_nvtx(record_shapes):
        calls.append("nvtx on")
        yield
        calls.append("nvtx off")

    monkeypatch.setattr(torch.autograd.profiler, "emit_nvtx", emit_nvtx)
    logging = logging_config("--profile", "--profile-step-start", "1", "--profile-step-end", "3")
    profiler = profiling.StepProfiler.for_run(logging, rank=0, save=None, device=CUDA)
    seen = []
    for done in range(5):
        profiler.before_step(done)
        seen.append((done + 1, list(calls)))
        profiler.after_step(done + 1)
    assert calls == ["start", "nvtx on", "nvtx off", "stop"]
    assert [step for step, before in seen if before == ["start", "nvtx on"]] == [2, 3]


def test_the_nsys_range_on_a_machine_without_a_gpu_is_refused():
    logging = logging_config("--profile")
    with pytest.raises(profiling.ProfilingError, match="add --use-pytorch-profiler"):
        profiling.StepProfiler.for_run(logging, rank=0, save=None, device=CPU)


def test_memory_history_is_recorded_and_its_snapshot_written_by_the_last_rank(
    monkeypatch, tmp_path
):
    recorded = []
    fake = types.SimpleNamespace(
        _record_memory_history=lambda **kw: recorded.append(kw),
        _snapshot=lambda: {"segments": ["a"]},
    )
    monkeypatch.setattr(torch.cuda, "memory", fake)
    path = tmp_path / "snapshot.pickle"
    logging = logging_config("--record-memory-history", "--memory-snapshot-path", str(path))
    profiling.start_memory_history(logging, CUDA)
    assert recorded == [{"max_entries": 100_000}]
    profiling.write_memory_snapshot(logging, is_last_rank=False)
    assert not path.exists()
    profiling.write_memory_snapshot(logging, is_last_rank=True)
    assert pickle.loads(path.read_bytes()) == {"segments": ["a"]}
    with pytest.raises(profiling.ProfilingError, match="has no GPU: drop the flag"):
        profiling.start_memory_history(logging, CPU)


def test_profile_steps_must_be_in_order(capsys):
    with pytest.raises(SystemExit):
        logging_config("--profile", "--profile-step-start", "5", "--profile-step-end", "5")
    assert "--profile-step-end 5 must be after --profile-step-start 5" in capsys.readouterr().err


@pytest.mark.integration
def test_a_training_run_writes_the_trace_of_its_profiled_steps(corpus, tmp_path):
    tensorboard = tmp_path / "tb"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain_gpt.py"),
            *TINY_MOE_FLAGS,
            "--data-path",
            corpus.data_prefix,
            "--split",
            "90,5,5",
            "--vocab-file",
            corpus.vocab_file,
            "--merge-file",
            corpus.merge_file,
            "--train-iters",
            "4",
            "--eval-iters",
            "0",
            "--profile",
            "--use-pytorch-profiler",
            "--profile-step-start",
            "1",
            "--profile-step-end",
            "3",
            "--tensorboard-dir",
            str(tensorboard),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    traces = list(tensorboard.glob("*.pt.trace.json"))
    assert len(traces) == 1
    names = {str(event.get("name")) for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert any(name.startswith("aten::") for name in names)
