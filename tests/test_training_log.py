"""The training log's window summary: averages, and the collapse and dead-expert warnings."""

from __future__ import annotations

import math

import torch

from remoe_patches.config import ModelConfig, ParallelConfig
from remoe_patches.regularizer import RoutingStats
from remoe_patches.routing_health import RoutingHealth
from remoe_patches.run_config import RunConfig, TrainingConfig
from remoe_patches.training import RunState, log_window
from remoe_patches.training_step import StepRecord


class CapturedLog:
    def __init__(self):
        self.lines, self.records = [], []

    def print(self, line):
        self.lines.append(line)

    def step(self, record):
        self.records.append(record)


def step_record(sparsity_L, load_LE, lm_loss=3.0):
    sparsity_L = torch.tensor(sparsity_L)
    routing = RoutingStats(sparsity=torch.nanmean(sparsity_L), sparsity_L=sparsity_L,
                           reg_loss_L=torch.tensor([0.5, 0.7]),
                           expert_load_LE=torch.tensor(load_LE), coeff=torch.tensor(0.01))
    return StepRecord(lm_loss=torch.tensor(lm_loss), grad_norm=1.0, skipped=False, lr=1e-3,
                      routing=routing, step_seconds=0.5)


MODEL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                    num_experts=4, topk=1, router="relu", vocab_size=128, seq_length=16)
CONFIG = RunConfig(model=MODEL, parallel=ParallelConfig(),
                   training=TrainingConfig(micro_batch_size=4, global_batch_size=4,
                                           train_iters=10, lr=1e-3))
HEALTHY = [0.25, 0.25, 0.25, 0.25]
STARVED = [0.50, 0.49, 0.005, 0.005]  # experts 2 and 3 get 0.5% of the tokens


def test_window_averages_and_per_layer_routing_state():
    window = [
        step_record([0.70, 0.985], [HEALTHY, STARVED]),
        step_record([0.72, 0.999], [HEALTHY, STARVED]),
    ]
    log = CapturedLog()
    log_window(log, window, CONFIG, RunState(iteration=2, consumed_samples=8), 1)
    (record,) = log.records
    assert math.isclose(record["sparsity_min"], 0.71, rel_tol=1e-6)
    assert math.isclose(record["sparsity_max"], 0.992, rel_tol=1e-6)
    assert record["sparsity_per_layer"] == [record["sparsity_min"], record["sparsity_max"]]
    assert record["collapsed_layers"] == 1 and record["dead_experts"] == 2
    assert record["dead_experts_per_layer"] == [[], [2, 3]]


def test_warnings_only_when_a_state_persists_and_a_summary_at_the_end():
    health = RoutingHealth(persist=2)
    log = CapturedLog()
    sick = [step_record([0.70, 0.999], [HEALTHY, STARVED])]
    well = [step_record([0.70, 0.80], [HEALTHY, HEALTHY])]
    windows = [sick, well,  # one starved window alone: chance, no warning
               sick, sick, sick,  # starved twice in a row: warned once
               well, sick,  # one fed window: still dead
               well, well]  # fed twice in a row: back
    for index, window in enumerate(windows, start=1):
        log_window(log, window, CONFIG, RunState(iteration=2 * index), 1, health)
    assert log.lines == [
        " WARNING: experts dead at iteration 8 (under 1/64 of their layer's tokens in 2 windows "
        "of 1 steps in a row): layer 2: expert 2, 3",
        " WARNING: layers collapsed at iteration 8 (mean sparsity >= 0.99 in 2 windows of 1 "
        "steps in a row): 2",
        " note: experts active again at iteration 18: layer 2: expert 2, 3",
        " note: layers routing again at iteration 18: 2",
    ]
    # every window's own state is in metrics.jsonl
    assert [r["dead_experts"] for r in log.records] == [2, 0, 2, 2, 2, 0, 2, 0, 0]
    assert health.summary() == (
        " routing health: 0 dead experts at the end; 2 dead at some point; collapsed layers: "
        "none at the end, [2] at some point (per window: metrics.jsonl)")


def test_no_warning_for_a_healthy_window():
    health = RoutingHealth()
    window = [step_record([0.75, 0.76], [HEALTHY, HEALTHY])]
    log = CapturedLog()
    log_window(log, window, CONFIG, RunState(iteration=1), 1, health)
    assert log.lines == [] and log.records[0]["dead_experts"] == 0
    assert health.summary() is None


def test_a_console_only_line_writes_no_record_and_leaves_the_health_alone():
    health = RoutingHealth(persist=1)
    log = CapturedLog()
    window = [step_record([0.70, 0.999], [HEALTHY, STARVED])]
    log_window(log, window, CONFIG, RunState(iteration=1), 1, health, console_only=True)
    (line,) = log.lines
    assert line.startswith(" iteration        1/      10 |") and "sparsity: " in line
    assert log.records == [] and health.summary() is None
