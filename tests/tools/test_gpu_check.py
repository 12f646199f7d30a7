"""tools/gpu_check.py's judgement of a save-and-resume, on a real run of the 182M ReMoE launcher
(shrunk by scripts/smoke_cpu.sh), and its summary when a step cannot run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from training_runs import REPO, SCRIPTS, environment

pytestmark = pytest.mark.integration

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def smoke(corpus, save, *flags):
    env = environment(
        GPUS_PER_NODE="1",
        CHECKPOINT_DIR=str(save),
        DATA_PATH=corpus.data_prefix,
        VOCAB_FILE=corpus.vocab_file,
        MERGE_FILE=corpus.merge_file,
    )
    result = subprocess.run(
        [
            str(SCRIPTS / "smoke_cpu.sh"),
            "--lr-decay-iters",
            "24",
            "--log-interval",
            "2",
            "--save-interval",
            "10",
            "--eval-interval",
            "10",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_a_resumed_launch_continues_and_a_restart_is_caught(corpus, tmp_path):
    save = tmp_path / "run"
    smoke(corpus, save, "--train-iters", "20")
    smoke(corpus, save, "--train-iters", "24")  # the launcher passes --load CHECKPOINT_DIR
    ok, detail = gpu_check.resume_continuity(save, stop=20, end=24, interval=2)
    assert ok, detail

    # The same log, as if the second launch had started from scratch instead of iteration 20.
    lines = [json.loads(line) for line in open(save / "metrics.jsonl")]
    first = next(r for r in lines if r.get("iteration") == 2 and "lm_loss" in r)
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    (restarted / "latest_checkpointed_iteration.txt").write_text("24")
    with open(restarted / "metrics.jsonl", "w") as out:
        for record in lines:
            if record.get("iteration") == 22 and "lm_loss" in record:
                record = {**record, **{k: first[k] for k in ("lm_loss", "l1_coeff", "sparsity")}}
            out.write(json.dumps(record) + "\n")
    ok, detail = gpu_check.resume_continuity(restarted, stop=20, end=24, interval=2)
    assert not ok and "lm loss jumps" in detail and "l1 coeff jumps" in detail


@pytest.mark.parametrize("part", ["tests", "train", "bench", "all"])
def test_each_part_refuses_in_one_line_without_cuda(tmp_path, part):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gpu_check.py"),
            "--part",
            part,
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_refuses_in_one_line_without_torch(tmp_path):
    # -S: no site-packages, so no torch (the message must not blame megatron-core)
    result = subprocess.run(
        [sys.executable, "-S", str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("gpu-check: torch does not import")
    assert "megatron" not in result.stderr and result.stderr.count("\n") == 1


def fake_wheel(directory: Path, name: str) -> Path:
    """A minimal wheel of an importable module ``name`` (what pip download puts in .whl/)."""
    path = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_missing_packages_come_from_wheels_or_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    fake_wheel(wheels, "remoe_fake_writer_dep")
    monkeypatch.setattr(
        gpu_check, "FROM_WHEELS", {"remoe_fake_writer_dep": "remoe_fake_writer_dep-*.whl"}
    )
    monkeypatch.setattr(gpu_check, "NEEDED", {"remoe_fake_writer_dep": "fake", "yaml": "PyYAML"})
    env = gpu_check.environment(tmp_path / "out", wheels)
    probe = subprocess.run(
        [sys.executable, "-c", "import remoe_fake_writer_dep as m; print(m.VALUE)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "42"  # installed into OUT/site from its wheel

    monkeypatch.setattr(gpu_check, "NEEDED", {"remoe_absent_module": "absent-dist==1.0"})
    with pytest.raises(SystemExit) as stop:
        gpu_check.environment(tmp_path / "out2", wheels)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "remoe_absent_module (absent-dist==1.0)" in error


def test_a_timed_out_step_is_killed_with_every_process_it_started(tmp_path):
    # The child moves to a session of its own, as torchrun's workers do.
    pid_file = tmp_path / "pid"
    code, seconds = gpu_check.run(
        tmp_path / "log",
        dict(os.environ),
        2,
        "bash",
        "-c",
        f"setsid sleep 300 & echo $! > {pid_file}; wait",
    )
    assert code == 124 and seconds < 30
    worker = int(pid_file.read_text())
    deadline = time.time() + 10
    while gpu_check.alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not gpu_check.alive(worker)
    assert "timed out after 2 s" in (tmp_path / "log").read_text()
