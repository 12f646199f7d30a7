"""pretrain_gpt.py end to end on CPU: Megatron-LM flags, parallel equivalence, resume, bad input.

Runs go through the real entry point in subprocesses (``python`` or ``torchrun``), on a small
corpus that the tests build, and compare what they write to ``<save>/metrics.jsonl``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from remoe_patches.train.checkpointing import read_run_config

from training_runs import REPO, authors_style_flags, ok, run, steps

pytestmark = pytest.mark.integration


def test_megatron_launch_flags_train(corpus, tmp_path):
    save = tmp_path / "run"
    result = ok(run(authors_style_flags(corpus, save)))
    for flag in ("--use-flash-attn", "--moe-aux-loss-coeff"):
        assert f"note: {flag} has no effect here" in result.stdout
    for flag in ("--moe-grouped-gemm", "--bf16", "--use-distributed-optimizer"):
        assert f"note: {flag} has no effect" not in result.stdout  # they run on CPU too
    records = steps(save)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    first, last = records[1], records[6]
    for key in (
        "lm_loss",
        "reg_loss",
        "l1_coeff",
        "sparsity",
        "sparsity_per_layer",
        "lr",
        "grad_norm",
        "tokens_per_sec",
    ):
        assert key in last, key
    assert len(last["sparsity_per_layer"]) == 2
    assert last["lm_loss"] < first["lm_loss"]
    # the expert shares (counted from the dispatched routing maps) agree with the regularizer's
    # own sparsity: experts per token = (1 - sparsity) x E, layer by layer
    for record in records.values():
        assert record["experts_per_token_per_layer"] == pytest.approx(
            [(1.0 - s) * 8 for s in record["sparsity_per_layer"]], rel=1e-6
        )
    evaluations = [
        json.loads(line) for line in open(save / "metrics.jsonl") if "val_lm_loss" in line
    ]
    assert [e["iteration"] for e in evaluations] == [3, 6]
    assert (save / "iter_0000006").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6"
    # the layers actually built are recorded, not the --transformer-impl default asked for
    assert read_run_config(str(save)).layers.transformer_impl == "local"


LAYOUTS = {
    "dp2": [],
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


# Layouts are compared in fp32 (with the distributed optimizer), where a wrong shard shows as a
# difference far above the rounding of a reordered reduction; bf16 runs are compared with
# themselves in test_paper_configs.py.
FP32 = dict(bf16=None)


@pytest.fixture(scope="module")
def initial_weights(corpus, tmp_path_factory):
    """Iteration-0 weights that every layout starts from (``--load DIR --finetune``).

    megatron initializes each tensor-parallel shard from its own RNG stream, so runs under
    different layouts start from different weights unless they load the same ones.
    """
    save = tmp_path_factory.mktemp("initial")
    ok(run(authors_style_flags(corpus, save, train_iters=0, **FP32)))
    return ["--load", str(save), "--finetune"]


@pytest.fixture(scope="module")
def single_process_run(corpus, tmp_path_factory, initial_weights):
    save = tmp_path_factory.mktemp("single")
    ok(
        run(
            authors_style_flags(corpus, save, save_interval=None, eval_interval=None, **FP32)
            + initial_weights
        )
    )
    return steps(save)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_train_like_one(corpus, tmp_path, initial_weights, single_process_run, layout):
    argv = (
        authors_style_flags(
            corpus, tmp_path, save_interval=None, eval_interval=None, sequence_parallel=None, **FP32
        )
        + LAYOUTS[layout]
        + initial_weights
    )
    ok(run(argv, nproc=2))
    parallel = steps(tmp_path)
    assert sorted(parallel) == sorted(single_process_run)
    for iteration, expected in single_process_run.items():
        got = parallel[iteration]
        for key in ("lm_loss", "reg_loss", "sparsity", "l1_coeff", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=2e-4, abs=1e-6), (iteration, key)
        # the expert shares are reduced over every rank: one process's (a token whose gate sits
        # at 0 may flip under another reduction order: 1/128 of a layer's tokens per flip)
        assert got["moe_layers"] == expected["moe_layers"] == [1, 2]
        for got_E, expected_E in zip(
            got["expert_share_per_layer"], expected["expert_share_per_layer"]
        ):
            assert got_E == pytest.approx(expected_E, abs=0.02), iteration


def test_a_launchs_first_steps_print_before_its_first_log_interval(corpus, tmp_path):
    save = tmp_path / "run"
    result = ok(
        run(
            authors_style_flags(
                corpus, save, train_iters=12, log_interval=8, eval_interval=None, save_interval=None
            )
        )
    )
    printed = [
        int(line.split()[1].rstrip("/"))
        for line in result.stdout.splitlines()
        if line.startswith(" iteration ")
    ]
    assert printed == [1, 2, 5, 8, 10, 12]
    assert sorted(steps(save)) == [8, 12]  # metrics.jsonl: one record per window, as before


def test_resume_equals_uninterrupted(corpus, tmp_path):
    straight = tmp_path / "straight"
    ok(run(authors_style_flags(corpus, straight, save_interval=None, eval_interval=None)))
    resumed = tmp_path / "resumed"
    flags = authors_style_flags(corpus, resumed, save_interval=None, eval_interval=None)
    ok(run(flags + ["--exit-interval", "3"]))
    assert (resumed / "latest_checkpointed_iteration.txt").read_text() == "3"
    ok(run(flags + ["--load", str(resumed)]))
    expected, got = steps(straight), steps(resumed)
    for iteration in (4, 5, 6):
        for key in ("lm_loss", "reg_loss", "sparsity", "l1_coeff", "lr", "grad_norm"):
            assert got[iteration][key] == expected[iteration][key], (iteration, key)


def test_resume_with_another_data_parallel_size(corpus, tmp_path):
    straight = tmp_path / "straight"
    ok(run(authors_style_flags(corpus, straight, save_interval=None, eval_interval=None, **FP32)))
    resumed = tmp_path / "resumed"
    flags = authors_style_flags(corpus, resumed, save_interval=None, eval_interval=None, **FP32)
    ok(run(flags + ["--exit-interval", "3"], nproc=2))  # DP=2
    ok(run(flags + ["--load", str(resumed)]))  # DP=1
    expected, got = steps(straight), steps(resumed)
    for iteration in (4, 5, 6):
        for key in ("lm_loss", "sparsity", "l1_coeff"):
            assert got[iteration][key] == pytest.approx(expected[iteration][key], rel=1e-4)


def test_async_save_and_fully_parallel_load_resume_exactly(corpus, tmp_path):
    """--async-save: training goes on while each checkpoint is written (2 ranks, distributed
    optimizer, the default fully parallel save), each is put into place once written, and a
    resume from the last, read with --ckpt-fully-parallel-load, takes the uninterrupted run's
    steps."""
    straight = tmp_path / "straight"
    ok(run(authors_style_flags(corpus, straight, save_interval=None, eval_interval=None), nproc=2))
    resumed = tmp_path / "resumed"
    flags = authors_style_flags(corpus, resumed, save_interval=2, eval_interval=None)
    result = ok(
        run(
            flags + ["--exit-interval", "4", "--async-save", "--use-persistent-ckpt-worker"],
            nproc=2,
        )
    )
    lines = result.stdout.splitlines()
    written = [line for line in lines if "is being written in the background" in line]
    saved = [line for line in lines if "(written in the background)" in line]
    assert len(written) == len(saved) == 2  # steps 2 and 4, each put into place
    assert lines.index(written[0]) < lines.index(saved[0]) < lines.index(written[1])
    assert (resumed / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not list(resumed.glob("*.partial"))
    ok(run(flags + ["--load", str(resumed), "--ckpt-fully-parallel-load"], nproc=2))
    expected, got = steps(straight), steps(resumed)
    for iteration in (5, 6):
        for key in ("lm_loss", "reg_loss", "sparsity", "l1_coeff", "lr", "grad_norm"):
            assert got[iteration][key] == expected[iteration][key], (iteration, key)


@pytest.mark.parametrize("layout", ["tp2-sp", "pp2"])
def test_fully_reshardable_optimizer_state_resumes_under_another_layout(corpus, tmp_path, layout):
    """--dist-ckpt-optim-fully-reshardable: the distributed optimizer's Adam state saved under
    DP=2 resumes under TP=2 or PP=2 and continues the uninterrupted DP=2 run (fp32; the
    tolerance of a reordered reduction). Under EP=2, which splits the optimizer in two, it is
    refused in one line."""
    common = dict(save_interval=None, eval_interval=None, **FP32)
    straight = tmp_path / "straight"
    ok(run(authors_style_flags(corpus, straight, **common), nproc=2))
    first = tmp_path / "first"
    ok(
        run(
            authors_style_flags(corpus, first, **common)
            + ["--exit-interval", "3", "--dist-ckpt-optim-fully-reshardable"],
            nproc=2,
        )
    )
    moved = tmp_path / "moved"
    ok(
        run(
            authors_style_flags(corpus, moved, **{**common, "sequence_parallel": None})
            + LAYOUTS[layout]
            + ["--load", str(first)],
            nproc=2,
        )
    )
    expected, got = steps(straight), steps(moved)
    assert sorted(got) == [4, 5, 6]
    for iteration in (4, 5, 6):
        for key in ("lm_loss", "reg_loss", "sparsity", "grad_norm"):
            assert got[iteration][key] == pytest.approx(
                expected[iteration][key], rel=2e-4, abs=1e-6
            ), (iteration, key)
    if layout == "pp2":
        return
    refused = run(
        authors_style_flags(corpus, tmp_path / "ep2", **common)
        + LAYOUTS["ep2"]
        + ["--load", str(first)],
        nproc=2,
    )
    assert "holds the state of 1 optimizer(s), this run has 2" in refused.stderr
    assert "--no-load-optim" in refused.stderr


def error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if "error: " in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "changes, needle",
    [
        (
            dict(data_path="1.0 /nonexistent/prefix_text_document"),
            "prefix_text_document.bin does not exist",
        ),
        (
            dict(tensor_model_parallel_size=2),
            "error: --tensor-model-parallel-size: TP=2 x PP=1 does not divide the world size 1",
        ),
        (dict(global_batch_size=5), "--global-batch-size"),
    ],
)
def test_bad_input_one_line_and_nothing_written(corpus, tmp_path, changes, needle):
    save = tmp_path / "never"
    line = error_line(
        run(authors_style_flags(corpus, save, tensorboard_dir=save / "tb", **changes))
    )
    assert needle in line
    assert not save.exists()


def test_save_without_psutil_is_refused_at_start_instead_of_hanging(corpus, tmp_path):
    """megatron's checkpoint writer imports psutil in its forked writers, where a failure
    leaves the trainer waiting forever; the run must refuse before step 1 instead."""
    save = tmp_path / "never"
    without_psutil = (
        "import sys; sys.modules['psutil'] = None; "
        "from remoe_patches.cli.launch import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", without_psutil, *authors_style_flags(corpus, save)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert error_line(result).startswith("error: --save needs psutil")
    assert not save.exists()


def test_load_of_another_architecture_names_the_differing_flags(corpus, tmp_path, initial_weights):
    # initial_weights: the authors' flags at hidden size 64 and 8 experts, iteration 0
    save = tmp_path / "other"
    line = error_line(
        run(authors_style_flags(corpus, save, hidden_size=32, num_experts=4) + initial_weights)
    )
    assert "--hidden-size: checkpoint 64, this run 32" in line
    assert "--num-experts x --moe-granularity: checkpoint 8, this run 4" in line
    assert not save.exists()


def test_batch_not_divisible_by_data_parallel_ranks(corpus, tmp_path):
    save = tmp_path / "never"
    result = run(authors_style_flags(corpus, save, global_batch_size=6), nproc=2)
    assert result.returncode != 0
    assert "is not divisible by --micro-batch-size 2 x data-parallel size 2" in result.stderr
    assert not save.exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path):
    save = tmp_path / "diverged"
    result = run(
        authors_style_flags(
            corpus,
            save,
            lr=1e30,
            min_lr=0.0,
            lr_warmup_fraction=None,
            train_iters=20,
            max_skipped_steps=3,
            eval_interval=None,
            save_interval=None,
        )
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "4 steps in a row had a non-finite loss or gradient" in result.stderr
    records = steps(save)
    assert records[max(records)]["skipped_iterations"] >= 3  # logged before the stop


def test_scaled_topk_baseline_trains(corpus, tmp_path):
    save = tmp_path / "topk"
    result = ok(
        run(
            authors_style_flags(
                corpus,
                save,
                moe_relu_routing=None,
                moe_router_topk_scaling_factor=8.0,
                train_iters=8,
                eval_interval=None,
                save_interval=None,
                timing_log_level=2,
            )
        )
    )
    assert "--moe-router-topk-scaling-factor has no effect" not in result.stdout
    records = steps(save)
    assert records[8]["lm_loss"] < records[1]["lm_loss"]
    assert "sparsity" not in records[8] and records[8]["load_balancing_loss"] > 0
    # TopK's routing in the log: each layer's Switch loss and expert shares (k = 1 of 8)
    for record in records.values():
        assert len(record["load_balancing_loss_per_layer"]) == 2
        assert sum(record["load_balancing_loss_per_layer"]) / 2 == pytest.approx(
            record["load_balancing_loss"]
        )
        assert [len(shares) for shares in record["expert_share_per_layer"]] == [8, 8]
        assert [sum(shares) for shares in record["expert_share_per_layer"]] == pytest.approx(
            [1.0, 1.0]
        )
        assert record["tokens_without_expert"] == 0.0 and record["experts_per_token"] == 1.0
        # --timing-log-level 2: megatron-core's and the loop's timers, the MoE layer's parts;
        # the memory of every window
        assert {
            "forward-backward",
            "forward-compute",
            "backward-compute",
            "optimizer",
            "batch-generator",
            "moe-router",
            "moe-dispatch",
            "moe-experts",
            "moe-combine",
        } <= set(record["timers_ms"])
        assert 0.0 < record["timers_ms"]["moe-router"] < record["timers_ms"]["forward-compute"]
        assert record["memory_rss_peak_gb"] >= record["memory_rss_gb"] > 0.1
    assert "(min, max) time across ranks (ms):" in result.stdout


BASELINES = {
    "hash": {},
    "expert_choice": {},
    "sparsemixer": dict(moe_aux_loss_coeff=1e-2),
    "lory": dict(moe_lory_segment_length=16),  # two segments of the 32-token sequences
}


@pytest.mark.parametrize("router", list(BASELINES))
def test_table_2_baseline_trains_and_resumes(corpus, tmp_path, router):
    """Each Table 2 baseline trains through pretrain_gpt.py and resumes where it stopped: the
    steps after the restart are those of the uninterrupted run."""
    overrides = dict(
        moe_relu_routing=None,
        moe_router_type=router,
        save_interval=None,
        eval_interval=None,
        train_iters=6,
        **BASELINES[router],
    )
    straight = tmp_path / "straight"
    ok(run(authors_style_flags(corpus, straight, **overrides)))
    resumed = tmp_path / "resumed"
    flags = authors_style_flags(corpus, resumed, **overrides)
    ok(run(flags + ["--exit-interval", "3"]))
    ok(run(flags + ["--load", str(resumed)]))
    expected, got = steps(straight), steps(resumed)
    assert expected[6]["lm_loss"] < expected[1]["lm_loss"]
    for iteration in (4, 5, 6):
        for key in ("lm_loss", "lr", "grad_norm"):
            assert got[iteration][key] == expected[iteration][key], (iteration, key)
    assert ("load_balancing_loss" in expected[6]) == (router == "sparsemixer")
    # every baseline's routing is in the log: each layer's expert shares and their summaries
    for record in expected.values():
        shares_LE = record["expert_share_per_layer"]
        assert record["moe_layers"] == [1, 2] and [len(s) for s in shares_LE] == [8, 8]
        assert record["experts_per_token_per_layer"] == pytest.approx(
            [sum(shares_E) for shares_E in shares_LE]
        )
        assert record["expert_share_max"] == pytest.approx(max(map(max, shares_LE)))
        # Hash, SparseMixer: one expert a token; Lory: weights summing to 1; Expert Choice:
        # every expert takes its capacity, k*T/E tokens, so some tokens get none
        assert record["experts_per_token"] == pytest.approx(1.0)
        if router == "expert_choice":
            assert record["expert_share_cv"] == pytest.approx(0.0, abs=1e-9)
            assert 0.0 < record["tokens_without_expert"] < 1.0
        else:
            assert record["tokens_without_expert"] == 0.0


def test_lory_dense_warmup_trains_then_routes_and_resumes_across_the_switch(corpus, tmp_path):
    """--moe-lory-dense-warmup-fraction 0.5 of 6 steps: steps 1-3 train the dense FFN (their
    first loss is not the routed model's), step 4 starts every expert from it; a run stopped at
    step 3 and resumed takes the same steps 4-6 as the uninterrupted one."""
    overrides = dict(
        moe_relu_routing=None,
        moe_router_type="lory",
        save_interval=None,
        eval_interval=None,
        train_iters=6,
        moe_lory_segment_length=16,
    )
    straight = tmp_path / "straight"
    ok(run(authors_style_flags(corpus, straight, moe_lory_dense_warmup_fraction=0.5, **overrides)))
    routed = tmp_path / "routed"
    ok(run(authors_style_flags(corpus, routed, moe_lory_dense_warmup_fraction=0.0, **overrides)))
    resumed = tmp_path / "resumed"
    flags = authors_style_flags(corpus, resumed, moe_lory_dense_warmup_fraction=0.5, **overrides)
    ok(run(flags + ["--exit-interval", "3"]))
    ok(run(flags + ["--load", str(resumed)]))
    expected, got = steps(straight), steps(resumed)
    assert expected[1]["lm_loss"] != steps(routed)[1]["lm_loss"]  # step 1 was dense
    assert expected[6]["lm_loss"] < expected[1]["lm_loss"]
    for iteration in (4, 5, 6):
        for key in ("lm_loss", "lr", "grad_norm"):
            assert got[iteration][key] == expected[iteration][key], (iteration, key)
