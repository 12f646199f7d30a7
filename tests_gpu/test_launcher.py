"""On one GPU: ``pretrain_gpt.py`` with ``configs/182m_remoe.yaml`` as written (bf16, distributed
optimizer, both overlap flags, grouped-GEMM experts, MoE-layer recomputation), shrunk in size,
trains, saves and resumes where it stopped.

The CPU suite checks the same path bit-exact (tests/train/test_paper_configs.py); on a GPU, atomic
adds in the token permutation's backward make two runs differ in the last bits, so the resumed run
is compared within bf16 noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from remoe_patches.data.demo_corpus import build_demo_corpus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=1024, max_chars_per_domain=200_000
    )


def train(corpus, save, *extra):
    sizes = dict(
        num_layers=4,
        hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=1024,
        seq_length=256,
        max_position_embeddings=256,
        make_vocab_size_divisible_by=128,
        micro_batch_size=4,
        global_batch_size=16,
        train_iters=20,
        lr_warmup_iters=2,
        log_interval=1,
        eval_interval=10,
        eval_iters=2,
        save_interval=10,
    )
    argv = [
        sys.executable,
        str(REPO / "pretrain_gpt.py"),
        "--config",
        str(REPO / "configs" / "182m_remoe.yaml"),
        "--data-path",
        corpus.data_prefix,
        "--vocab-file",
        corpus.vocab_file,
        "--merge-file",
        corpus.merge_file,
        "--save",
        str(save),
    ]
    for key, value in sizes.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        argv + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def steps(save) -> dict:
    return {
        r["iteration"]: r
        for r in map(json.loads, open(Path(save) / "metrics.jsonl"))
        if "lm_loss" in r
    }


def test_paper_config_trains_saves_and_resumes_on_one_gpu(corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(corpus, straight)
    for flag in (
        "--bf16",
        "--use-distributed-optimizer",
        "--overlap-param-gather",
        "--moe-grouped-gemm",
    ):
        assert f"note: {flag}" not in result.stdout
    expected = steps(straight)
    assert expected[20]["lm_loss"] < expected[1]["lm_loss"]
    train(corpus, resumed, "--exit-interval", "10")
    assert (resumed / "latest_checkpointed_iteration.txt").read_text() == "10"
    train(corpus, resumed, "--load", str(resumed))
    got = steps(resumed)
    assert sorted(got) == list(range(1, 21))
    for iteration in range(11, 21):
        assert got[iteration]["lr"] == expected[iteration]["lr"]
        assert got[iteration]["lm_loss"] == pytest.approx(expected[iteration]["lm_loss"], rel=2e-2)
        assert got[iteration]["sparsity"] == pytest.approx(
            expected[iteration]["sparsity"], abs=0.05
        )
    # the coefficient continues from the saved one: at most one factor alpha per step apart
    ratio = got[11]["l1_coeff"] / expected[10]["l1_coeff"]
    assert 1 / 1.2 - 1e-6 <= ratio <= 1.2 + 1e-6
