"""The tools end in one ``error:`` line, not a traceback, on a checkpoint they cannot take
(issue 26): ``tools/export_checkpoint.py`` on a Hash-router run, ``tools/evaluate.py`` on a
directory without a checkpoint; ``tools/generate.py`` and ``tools/evaluate.py`` on a model that
transformers saved, not tools/export_checkpoint.py (issue 25)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from training_runs import REPO, authors_style_flags, ok, run

pytestmark = pytest.mark.integration


def test_export_of_a_hash_router_run_is_one_line(corpus, tmp_path):
    save = tmp_path / "hash"
    ok(
        run(
            authors_style_flags(
                corpus,
                save,
                moe_relu_routing=None,
                moe_router_type="hash",
                train_iters=0,
                eval_interval=None,
                save_interval=None,
            )
        )
    )
    out = tmp_path / "export"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            str(save),
            "--output",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"export_checkpoint.py: error: --load {save}: the reference model "
        "does not implement the hash router"
    )
    assert "tools/evaluate.py" in line
    assert not out.exists()


def test_evaluate_of_a_directory_without_a_checkpoint_is_one_line(tmp_path):
    empty = tmp_path / "no_run"
    empty.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "evaluate.py"),
            "--load",
            str(empty),
            "--tasks",
            "piqa",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [text for text in result.stderr.splitlines() if "error" in text]
    assert line.startswith(f"evaluate.py: error: --load {empty}: {empty} holds no checkpoint")


def test_generate_and_evaluate_on_a_model_saved_by_transformers_are_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    saved = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(saved)
    expected = (
        f"{saved} is not written by tools/export_checkpoint.py (config.json has format "
        "None, not remoe-reference-gpt or remoe-hf-llama); load it with transformers, or "
        "export the training checkpoint with tools/export_checkpoint.py"
    )
    for tool, argv, prefix in (
        ("generate.py", ["--prompt", "x"], "generate.py: error: "),
        ("evaluate.py", ["--tasks", "piqa"], f"evaluate.py: error: --load {saved}: "),
    ):
        result = subprocess.run(
            [sys.executable, str(REPO / "tools" / tool), "--load", str(saved), *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        [line] = [text for text in result.stderr.splitlines() if "error" in text]
        assert line == prefix + expected
