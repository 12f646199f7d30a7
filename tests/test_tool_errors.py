"""The tools end in one ``error:`` line, not a traceback, on a checkpoint they cannot take
(issue 26): ``tools/export_checkpoint.py`` on a Hash-router run, ``tools/evaluate.py`` on a
directory without a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from training_runs import REPO, authors_style_flags, ok, run

pytestmark = pytest.mark.integration


def test_export_of_a_hash_router_run_is_one_line(corpus, tmp_path):
    save = tmp_path / "hash"
    ok(run(authors_style_flags(corpus, save, moe_relu_routing=None, moe_router_type="hash",
                               train_iters=0, eval_interval=None, save_interval=None)))
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "export_checkpoint.py"),
                             "--load", str(save), "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"export_checkpoint.py: error: --load {save}: the reference model "
                           "does not implement the hash router")
    assert "tools/evaluate.py" in line
    assert not out.exists()


def test_evaluate_of_a_directory_without_a_checkpoint_is_one_line(tmp_path):
    empty = tmp_path / "no_run"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--load",
                             str(empty), "--tasks", "piqa"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [text for text in result.stderr.splitlines() if "error" in text]
    assert line.startswith(f"evaluate.py: error: --load {empty}: {empty} holds no checkpoint")
