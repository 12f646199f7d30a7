"""Settings of the training loop (``training.py``) without a training run: the learning-rate
schedule (Megatron-LM's WSD, checked against the schedule written out by hand) and --manual-gc's
collection points."""

from __future__ import annotations

import math

import pytest
import torch

from remoe_patches.cli.arguments import parse_run_config
from remoe_patches.train.training import lr_scheduler

from command_lines import TINY_FLAGS

PEAK, FLOOR, WARMUP, STEPS, ANNEAL = 1e-3, 1e-4, 4, 40, 10


def wsd_by_hand(step: int, style: str) -> float:
    """Warm-up to PEAK, stable, then the last ANNEAL steps annealed to FLOOR."""
    if step <= WARMUP:
        return PEAK * step / WARMUP
    anneal_start = STEPS - ANNEAL
    if step <= anneal_start:
        return PEAK
    ratio = (step - anneal_start) / ANNEAL
    coeff = {
        "exponential": 2 * 0.5**ratio - 1,
        "linear": 1 - ratio,
        "cosine": 0.5 * (math.cos(math.pi * ratio) + 1),
        "minus_sqrt": 1 - math.sqrt(ratio),
    }
    return FLOOR + coeff[style] * (PEAK - FLOOR)


@pytest.mark.parametrize("style", ["exponential", "linear", "cosine", "minus_sqrt"])
def test_wsd_schedule_is_megatron_lms(style):
    config = parse_run_config(
        [
            *TINY_FLAGS,
            "--lr",
            str(PEAK),
            "--min-lr",
            str(FLOOR),
            "--train-iters",
            str(STEPS),
            "--lr-warmup-iters",
            str(WARMUP),
            "--global-batch-size",
            "2",
            "--lr-decay-style",
            "WSD",
            "--lr-wsd-decay-iters",
            str(ANNEAL),
            "--lr-wsd-decay-style",
            style,
        ]
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = lr_scheduler(config.training, optimizer)
    for step in range(1, STEPS + 1):
        scheduler.step(increment=config.training.global_batch_size)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(wsd_by_hand(step, style)), step


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "lr_wsd_decay_iters: --lr-decay-style WSD needs --lr-wsd-decay-iters"),
        (
            ["--lr-wsd-decay-iters", "50"],
            "lr_wsd_decay_iters: 50 must be between 1 and the decay's 10",
        ),
    ],
)
def test_wsd_needs_an_anneal_inside_the_decay(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_run_config([*TINY_FLAGS, "--lr-decay-style", "WSD", *flags])
    assert message in capsys.readouterr().err


def test_wsd_flags_without_wsd_are_listed_as_without_effect():
    from remoe_patches.cli.argument_notes import ineffective_flags
    from remoe_patches.cli.arguments import parse_args

    args = parse_args([*TINY_FLAGS, "--lr-decay-style", "cosine", "--lr-wsd-decay-iters", "3"])
    notes = dict(ineffective_flags(args, cuda_available=False, transformer_engine_available=False))
    assert notes["--lr-wsd-decay-iters"] == "only used with --lr-decay-style WSD"
    args = parse_args([*TINY_FLAGS, "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3"])
    notes = dict(ineffective_flags(args, cuda_available=False, transformer_engine_available=False))
    assert "--lr-wsd-decay-iters" not in notes


def test_manual_gc_collects_at_megatron_lms_points(monkeypatch):
    """--manual-gc: every --manual-gc-interval steps and around evaluations (unless
    --no-manual-gc-eval); nothing without --manual-gc."""
    import gc

    from remoe_patches.train.training import collect_garbage

    collected = []
    monkeypatch.setattr(gc, "collect", lambda *args: collected.append(args))

    def points(*flags):
        training = parse_run_config([*TINY_FLAGS, *flags]).training
        collected.clear()
        steps = [step for step in range(1, 13) if collect_garbage(training, iteration=step)]
        return steps, collect_garbage(training, evaluation=True), len(collected)

    assert points() == ([], False, 0)
    assert points("--manual-gc") == ([], True, 1)  # interval 0: only around evaluations
    assert points("--manual-gc", "--manual-gc-interval", "4") == ([4, 8, 12], True, 4)
    assert points("--manual-gc", "--manual-gc-interval", "5", "--no-manual-gc-eval") == (
        [5, 10],
        False,
        2,
    )
