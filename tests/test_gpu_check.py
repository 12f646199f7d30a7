"""tools/gpu_check.py's judgement of a save-and-resume, on a real run of the 182M ReMoE launcher
(shrunk by scripts/smoke_cpu.sh), and its summary when a step cannot run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from test_launchers import REPO, SCRIPTS, corpus, environment  # noqa: F401 (corpus: a fixture)

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def smoke(corpus, save, *flags):
    env = environment(GPUS_PER_NODE="1", CHECKPOINT_DIR=str(save), DATA_PATH=corpus.data_prefix,
                      VOCAB_FILE=corpus.vocab_file, MERGE_FILE=corpus.merge_file)
    result = subprocess.run([str(SCRIPTS / "smoke_cpu.sh"), "--lr-decay-iters", "24",
                             "--log-interval", "2", "--save-interval", "10",
                             "--eval-interval", "10", *flags],
                            env=env, capture_output=True, text=True, timeout=600)
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


def test_summary_names_a_failed_step(tmp_path):
    # Without a visible GPU tests_gpu refuses to start: the step fails and the summary says so.
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out",
                             str(tmp_path), "--skip", "benchmark", "launcher"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["step"], r["ok"]) for r in rows] == [("tests_gpu", False)]
    assert "| tests_gpu | FAILED |" in (tmp_path / "summary.md").read_text()
