"""The paper's GPU configurations, shrunk in size only, on 2 gloo ranks: the code path a GPU run
takes (bf16 mixed precision, megatron's distributed optimizer, both overlap flags, grouped-GEMM
experts, MoE-layer recomputation, the alltoall dispatcher) trains, saves and resumes bit-exact.

Every flag of ``configs/182m_{dense,moe,remoe}.yaml`` stays as written except the sizes (model
width and depth, sequence, batch, iterations and intervals) and the data paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron.core import dist_checkpointing

from training_runs import REPO, ok, run, steps

pytestmark = pytest.mark.integration

CONFIGS = ("182m_dense", "182m_moe", "182m_remoe")

# What a GPU run of these configs turns on; none of it may be reported as having no effect.
GPU_SETTINGS = (
    "--bf16",
    "--use-distributed-optimizer",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--moe-grouped-gemm",
    "--moe-layer-recompute",
)

COMPARED = ("lm_loss", "grad_norm", "lr", "reg_loss", "sparsity", "l1_coeff", "load_balancing_loss")


def shrunk(corpus, save, config="182m_remoe", *extra) -> list:
    """``configs/<config>.yaml`` with CPU sizes: 2 ranks x 2 micro-batches of 2 per step."""
    sizes = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        seq_length=32,
        max_position_embeddings=32,
        make_vocab_size_divisible_by=128,
        micro_batch_size=2,
        global_batch_size=8,
        train_iters=6,
        lr_warmup_iters=1,
        log_interval=1,
        eval_interval=3,
        eval_iters=1,
        save_interval=3,
    )
    paths = dict(
        data_path=corpus.data_prefix,
        vocab_file=corpus.vocab_file,
        merge_file=corpus.merge_file,
        tokenizer_type="GPT2BPETokenizer",
        save=save,
    )
    argv = ["--config", str(REPO / "configs" / f"{config}.yaml")]
    for key, value in {**sizes, **paths}.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv + list(extra)


def compare(expected: dict, got: dict, iterations, exact=True, rel=0.0):
    for iteration in iterations:
        for key in COMPARED:
            if key not in expected[iteration]:
                continue
            want, have = expected[iteration][key], got[iteration][key]
            if exact:
                assert have == want, (iteration, key, have, want)
            else:
                assert have == pytest.approx(want, rel=rel), (iteration, key, have, want)


def validation(save) -> dict:
    return {
        r["iteration"]: r["val_lm_loss"]
        for r in map(json.loads, open(Path(save) / "metrics.jsonl"))
        if "val_lm_loss" in r
    }


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """Uninterrupted 6-step runs on 2 ranks (saving at 3 and 6), one per config, made on demand."""
    runs = {}

    def get(config):
        if config not in runs:
            save = tmp_path_factory.mktemp(config)
            result = ok(run(shrunk(corpus, save, config), nproc=2))
            runs[config] = (save, result)
        return runs[config]

    return get


@pytest.mark.parametrize("config", CONFIGS)
def test_paper_config_trains_saves_and_resumes_bit_exact(corpus, tmp_path, straight, config):
    save, result = straight(config)
    for flag in GPU_SETTINGS:
        assert f"note: {flag} has no effect" not in result.stdout, flag
    records = steps(save)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[6]["lm_loss"] < records[1]["lm_loss"]
    metadata = dist_checkpointing.load_content_metadata(str(save / "iter_0000006"))
    assert metadata == {
        "distrib_optim_sharding_type": "dp_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }

    resumed = tmp_path / "resumed"
    ok(run(shrunk(corpus, resumed, config, "--exit-interval", "3"), nproc=2))
    assert (resumed / "latest_checkpointed_iteration.txt").read_text() == "3"
    ok(run(shrunk(corpus, resumed, config, "--load", str(resumed)), nproc=2))
    compare(records, steps(resumed), (4, 5, 6))
    assert validation(resumed)[6] == validation(save)[6]


def test_expert_parallel_run_with_both_overlaps_resumes_bit_exact(corpus, tmp_path):
    ep2 = ("--expert-model-parallel-size", "2")
    straight_run, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run(shrunk(corpus, straight_run, "182m_remoe", *ep2), nproc=2))
    ok(run(shrunk(corpus, resumed, "182m_remoe", *ep2, "--exit-interval", "3"), nproc=2))
    ok(run(shrunk(corpus, resumed, "182m_remoe", *ep2, "--load", str(resumed)), nproc=2))
    compare(steps(straight_run), steps(resumed), (4, 5, 6))


def test_overlapped_communication_changes_no_number(corpus, tmp_path, straight):
    save, _ = straight("182m_remoe")
    config = yaml.safe_load(open(REPO / "configs" / "182m_remoe.yaml"))
    del config["overlap_grad_reduce"], config["overlap_param_gather"]
    plain_yaml = tmp_path / "no_overlap.yaml"
    plain_yaml.write_text(yaml.safe_dump(config))
    plain = tmp_path / "plain"
    argv = shrunk(corpus, plain, "182m_remoe")
    argv[1] = str(plain_yaml)
    ok(run(argv, nproc=2))
    compare(steps(save), steps(plain), range(1, 7))
    assert validation(plain) == validation(save)


def test_two_rank_checkpoint_resumes_on_one_rank(corpus, tmp_path, straight):
    save, _ = straight("182m_remoe")
    resumed = tmp_path / "resumed"
    ok(run(shrunk(corpus, resumed, "182m_remoe", "--exit-interval", "3"), nproc=2))
    # One rank takes both ranks' slices of the distributed optimizer's state and accumulates
    # the same global batch over 4 micro-batches: equal up to bf16 rounding of the reduction order.
    ok(run(shrunk(corpus, resumed, "182m_remoe", "--load", str(resumed)), nproc=1))
    compare(steps(save), steps(resumed), (4, 5, 6), exact=False, rel=2e-3)
