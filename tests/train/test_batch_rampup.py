"""--rampup-batch-size: runs whose steps take the batches of megatron-core's ramp-up rule (written
out here by hand), whose LR schedule advances by them, which resume mid-ramp as if never stopped,
and the refusals of what the calculator cannot ramp."""

from __future__ import annotations

import math

import pytest
import torch

from remoe_patches.cli.arguments import parse_run_config
from remoe_patches.config.model_config import ConfigError
from remoe_patches.train.training import check_batch_sizes, lr_scheduler

from command_lines import TINY_FLAGS
from training_runs import authors_style_flags, ok, run, steps

START, INCREMENT, RAMPUP_SAMPLES, GLOBAL, TRAIN_SAMPLES = 2, 2, 24, 8, 60
RAMPUP = f"{START} {INCREMENT} {RAMPUP_SAMPLES}"
SEQ = 32  # authors_style_flags' --seq-length


def batches_by_hand(start, increment, rampup_samples, global_batch, train_samples) -> list:
    """Each step's global batch until ``train_samples`` are consumed: START, growing by
    INCREMENT every RAMPUP_SAMPLES / ((GBS - START) / INCREMENT) consumed samples, GBS once more
    than RAMPUP_SAMPLES are consumed."""
    increments = (global_batch - start) // increment
    sizes, consumed = [], 0
    while consumed < train_samples:
        if consumed > rampup_samples:
            size = global_batch
        else:  # whole increments passed: consumed / (rampup_samples / increments), floored
            size = start + increment * (consumed * increments // rampup_samples)
        sizes.append(size)
        consumed += size
    return sizes


EXPECTED = batches_by_hand(START, INCREMENT, RAMPUP_SAMPLES, GLOBAL, TRAIN_SAMPLES)


def test_the_rule_by_hand_ramps():
    assert EXPECTED == [2, 2, 2, 2, 4, 4, 6, 6, 8, 8, 8, 8]


def rampup_flags(corpus, save, **overrides):
    flags = dict(
        train_iters=None,
        train_samples=TRAIN_SAMPLES,
        global_batch_size=GLOBAL,
        rampup_batch_size=RAMPUP,
        save_interval=None,
        eval_interval=None,
    )
    return authors_style_flags(corpus, save, **{**flags, **overrides})


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("straight")
    ok(run(rampup_flags(corpus, save)))
    return steps(save)


@pytest.mark.integration
def test_steps_take_the_ramps_batches_and_the_lr_follows_the_samples(straight):
    assert sorted(straight) == list(range(1, len(EXPECTED) + 1))
    records = [straight[i] for i in sorted(straight)]  # --log-interval 1: a record a step
    assert [r["global_batch_size"] for r in records] == EXPECTED
    consumed = [sum(EXPECTED[: i + 1]) for i in range(len(EXPECTED))]
    assert [r["consumed_samples"] for r in records] == consumed
    assert consumed[-1] == TRAIN_SAMPLES
    assert {r["train_iters"] for r in records} == {len(EXPECTED)}
    for r in records:  # throughput from the step's own batch
        tokens_per_sec = r["global_batch_size"] * SEQ / (r["ms_per_iteration"] / 1000)
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_sec, rel=1e-6)
    # Megatron-LM's schedule over samples: --lr-warmup-fraction 0.2 of the 60, then cosine
    # from 5e-4 to 5e-5; a step's lr is the one of the samples consumed before it.
    warmup, peak, floor = 0.2 * TRAIN_SAMPLES, 5e-4, 5e-5
    for r, before in zip(records, [0] + consumed):
        ratio = (before - warmup) / (TRAIN_SAMPLES - warmup)
        lr = (
            peak * before / warmup
            if before <= warmup
            else floor + 0.5 * (math.cos(math.pi * ratio) + 1) * (peak - floor)
        )
        assert r["lr"] == pytest.approx(lr, rel=1e-5), r["iteration"]


@pytest.mark.integration
def test_a_run_stopped_mid_ramp_resumes_as_if_never_stopped(corpus, tmp_path, straight):
    save = tmp_path / "resumed"
    flags = rampup_flags(corpus, save)
    ok(run(flags + ["--exit-interval", "5"]))  # after 12 samples: step 6 takes 4
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "5"
    result = ok(run(flags + ["--load", str(save)]))
    assert "consumed samples 12," in result.stdout
    resumed = steps(save)
    assert sorted(resumed) == sorted(straight)
    for iteration in range(6, len(EXPECTED) + 1):
        for key in ("global_batch_size", "consumed_samples", "lm_loss", "lr", "grad_norm"):
            assert resumed[iteration][key] == straight[iteration][key], (iteration, key)


def test_warmup_and_decay_iterations_count_the_ramps_steps():
    """--lr-warmup-iters 4: the peak at step 4 whatever the batches; min-lr at the last step."""
    argv = [a for a in TINY_FLAGS if a not in ("--train-iters", "10")]
    training = parse_run_config(
        argv
        + [
            "--train-samples",
            str(TRAIN_SAMPLES),
            "--global-batch-size",
            str(GLOBAL),
            "--rampup-batch-size",
            *RAMPUP.split(),
            "--lr-warmup-iters",
            "4",
            "--min-lr",
            "1e-4",
            "--lr-decay-style",
            "linear",
        ]
    ).training
    assert training.train_iters == len(EXPECTED)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = lr_scheduler(training, optimizer)
    lrs = []
    for size in EXPECTED:
        scheduler.step(increment=size)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[-1] == pytest.approx(1e-4)


def test_a_yaml_config_gives_the_ramp_as_a_list(tmp_path):
    argv = [a for a in TINY_FLAGS if a not in ("--train-iters", "10")]
    config = tmp_path / "ramp.yaml"
    config.write_text(
        f"train_samples: {TRAIN_SAMPLES}\nglobal_batch_size: {GLOBAL}\n"
        f"rampup_batch_size: [{START}, {INCREMENT}, {RAMPUP_SAMPLES}]\n"
    )
    training = parse_run_config(["--config", str(config), *argv]).training
    assert training.rampup_batch_size == (START, INCREMENT, RAMPUP_SAMPLES)
    assert training.train_iters == len(EXPECTED)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            [
                "--train-iters",
                "10",
                "--global-batch-size",
                "8",
                "--rampup-batch-size",
                "2",
                "2",
                "24",
            ],
            "--rampup-batch-size needs --train-samples",
        ),
        (
            [
                "--train-samples",
                "60",
                "--global-batch-size",
                "8",
                "--rampup-batch-size",
                "2",
                "4",
                "24",
            ],
            "--rampup-batch-size 2 4 24: --global-batch-size 8 - START 2 = 6 is not divisible by "
            "INCREMENT 4",
        ),
        (
            [
                "--train-samples",
                "60",
                "--global-batch-size",
                "8",
                "--rampup-batch-size",
                "8",
                "2",
                "24",
            ],
            "START must be below --global-batch-size 8",
        ),
        (
            [
                "--train-samples",
                "60",
                "--global-batch-size",
                "8",
                "--rampup-batch-size",
                "2",
                "2",
                "0",
            ],
            "START, INCREMENT and RAMPUP_SAMPLES must be >= 1",
        ),
    ],
)
def test_what_the_calculator_cannot_ramp_is_refused(flags, message, capsys):
    argv = [a for a in TINY_FLAGS if a not in ("--train-iters", "10")]
    with pytest.raises(SystemExit) as exit_info:
        parse_run_config(argv + flags)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


@pytest.mark.parametrize(
    "rampup, data_parallel_size", [((2, 2, 24), 2), ((4, 2, 24), 2), ((3, 1, 24), 1)]
)
def test_batches_that_do_not_split_into_micro_batches_are_refused(rampup, data_parallel_size):
    argv = [a for a in TINY_FLAGS if a not in ("--train-iters", "10")]  # --micro-batch-size 2
    training = parse_run_config(
        argv
        + [
            "--train-samples",
            "60",
            "--global-batch-size",
            "8",
            "--rampup-batch-size",
            *map(str, rampup),
        ]
    ).training
    with pytest.raises(
        ConfigError,
        match="START and INCREMENT must be multiples of "
        rf"--micro-batch-size 2 x data-parallel size {data_parallel_size}",
    ):
        check_batch_sizes(training, data_parallel_size)
