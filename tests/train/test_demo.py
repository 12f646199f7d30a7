"""The demo config (what `make demo` runs) trains: the loss falls and the sparsity settles at the
target 1 - k/E = 0.875. Shortened to 200 steps; stages I and II take about 100."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent


def test_demo_trains_and_reaches_target_sparsity(tmp_path):
    save = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "pretrain_gpt.py",
            "--config",
            "configs/demo.yaml",
            "--train-iters",
            "200",
            "--log-interval",
            "10",
            "--eval-interval",
            "100",
            "--save",
            str(save),
            "--tensorboard-dir",
            str(save / "tensorboard"),
            "--save-interval",
            "200",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(save / "metrics.jsonl")]
    steps = [r for r in records if "lm_loss" in r]
    evaluations = [r["val_lm_loss"] for r in records if "val_lm_loss" in r]
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 1.0
    assert evaluations[-1] < evaluations[0]
    final_sparsity = sum(r["sparsity"] for r in steps[-5:]) / 5  # the last 50 steps
    assert abs(final_sparsity - 0.875) < 0.03, [r["sparsity"] for r in steps]
    assert steps[0]["sparsity"] < 0.7  # it started dense (stage I)
    assert any(
        path.name.startswith("events.out.tfevents") for path in (save / "tensorboard").iterdir()
    )
    assert "metrics: " in result.stdout and "checkpoint: " in result.stdout
