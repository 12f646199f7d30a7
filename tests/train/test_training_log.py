"""The training log's window summary: averages, expert shares for every router, timers and memory,
and the collapse and dead-expert warnings."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import psutil
import pytest
import torch

from remoe_patches.config.model_config import ModelConfig, ParallelConfig
from remoe_patches.train.expert_load import ExpertLoad
from remoe_patches.train.memory_usage import GB, local_memory_bytes
from remoe_patches.train.metrics_log import megatron_lm_memory_scalars, peak_memory_gb
from remoe_patches.routing.regularizer import RoutingStats
from remoe_patches.train.routing_health import RoutingHealth
from remoe_patches.train.step_timers import StepTimers
from remoe_patches.config.run_config import RunConfig, TrainingConfig
from remoe_patches.train.training import RunState, log_window
from remoe_patches.train.training_step import StepRecord


class CapturedLog:
    def __init__(self):
        self.lines, self.records = [], []

    def print(self, line):
        self.lines.append(line)

    def step(self, record):
        self.records.append(record)


def step_record(sparsity_L, load_LE, lm_loss=3.0):
    sparsity_L = torch.tensor(sparsity_L)
    routing = RoutingStats(
        sparsity=torch.nanmean(sparsity_L),
        sparsity_L=sparsity_L,
        reg_loss_L=torch.tensor([0.5, 0.7]),
        expert_load_LE=torch.tensor(load_LE),
        l1_coeff=torch.tensor(0.01),
    )
    return StepRecord(
        lm_loss=torch.tensor(lm_loss),
        grad_norm=1.0,
        skipped=False,
        lr=1e-3,
        routing=routing,
        step_seconds=0.5,
    )


TOKENS = 256  # per layer and step


def routed(*steps_LE) -> ExpertLoad:
    """The counts of steps whose layers gave each expert these shares of 256 tokens."""
    load = ExpertLoad(num_layers=2, num_experts=4)
    for share_LE in steps_LE:
        for layer, share_E in enumerate(share_LE, start=1):
            load.record(layer, torch.tensor(share_E) * TOKENS, torch.tensor(0.0), TOKENS)
    return load


def logged(log, window, health=None, iteration=2, config=None, **kwargs):
    """``log_window`` of steps whose routing the records' ``expert_load_LE`` say."""
    load = routed(*[r.routing.expert_load_LE.tolist() for r in window])
    log_window(
        log,
        window,
        config or CONFIG,
        RunState(iteration=iteration, consumed_samples=8),
        1,
        health,
        routing_load=load,
        **kwargs,
    )


MODEL = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    num_experts=4,
    topk=1,
    router="relu",
    vocab_size=128,
    seq_length=16,
)
CONFIG = RunConfig(
    model=MODEL,
    parallel=ParallelConfig(),
    training=TrainingConfig(micro_batch_size=4, global_batch_size=4, train_iters=10, lr=1e-3),
)
HEALTHY = [0.25, 0.25, 0.25, 0.25]
STARVED = [0.50, 0.49, 0.005, 0.005]  # experts 2 and 3 get 0.5% of the tokens


def test_window_averages_and_per_layer_routing_state():
    window = [
        step_record([0.70, 0.985], [HEALTHY, STARVED]),
        step_record([0.72, 0.999], [HEALTHY, STARVED]),
    ]
    log = CapturedLog()
    logged(log, window)
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
    windows = [
        sick,
        well,  # one starved window alone: chance, no warning
        sick,
        sick,
        sick,  # starved twice in a row: warned once
        well,
        sick,  # one fed window: still dead
        well,
        well,
    ]  # fed twice in a row: back
    for index, window in enumerate(windows, start=1):
        logged(log, window, health, iteration=2 * index)
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
        "none at the end, [2] at some point (per window: metrics.jsonl)"
    )


def test_no_warning_for_a_healthy_window():
    health = RoutingHealth()
    window = [step_record([0.75, 0.76], [HEALTHY, HEALTHY])]
    log = CapturedLog()
    logged(log, window, health, iteration=1)
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


TOPK = RunConfig(
    model=ModelConfig(**{**dataclasses.asdict(MODEL), "router": "topk", "topk": 2}),
    parallel=ParallelConfig(),
    training=CONFIG.training,
)


def topk_record(load_balancing_L, z_L):
    return StepRecord(
        lm_loss=torch.tensor(3.0),
        grad_norm=1.0,
        skipped=False,
        lr=1e-3,
        step_seconds=0.5,
        aux_losses_L={
            "load_balancing_loss": torch.tensor(load_balancing_L),
            "z_loss": torch.tensor(z_L),
        },
    )


def test_a_topk_window_holds_each_layers_expert_shares_and_aux_losses():
    balanced, skewed = [0.5, 0.5, 0.5, 0.5], [1.0, 0.75, 0.25, 0.0]
    log = CapturedLog()
    window = [topk_record([1.0, 1.5], [0.1, 0.3]), topk_record([1.0, 2.5], [0.2, 0.4])]
    log_window(
        log,
        window,
        TOPK,
        RunState(iteration=2),
        1,
        RoutingHealth(persist=1),
        routing_load=routed([balanced, skewed], [balanced, skewed]),
    )
    (record,) = log.records
    assert record["moe_layers"] == [1, 2]
    assert record["expert_share_per_layer"] == [balanced, skewed]
    assert record["experts_per_token_per_layer"] == [2.0, 2.0]
    assert record["expert_share_min"] == 0.0 and record["expert_share_max"] == 1.0
    cv = statistics.pstdev(skewed) / statistics.mean(skewed)
    assert record["expert_share_cv_per_layer"] == pytest.approx([0.0, cv])
    assert record["expert_share_cv"] == pytest.approx(cv / 2)
    assert record["dead_experts"] == 1 and record["dead_experts_per_layer"] == [[], [3]]
    # megatron's layer-mean aux losses (over the model's layers), and each layer's
    assert record["load_balancing_loss"] == pytest.approx((1.0 + 2.0) / 2)
    assert record["load_balancing_loss_per_layer"] == pytest.approx([1.0, 2.0])
    assert record["z_loss_per_layer"] == pytest.approx([0.15, 0.35])
    assert "sparsity" not in record and "reg_loss" not in record
    # the health report speaks for every router
    assert log.lines == [
        " WARNING: experts dead at iteration 2 (under 1/64 of their layer's "
        "tokens in 1 windows of 2 steps in a row): layer 2: expert 3"
    ]


def test_timers_and_memory_are_in_every_record(single_rank):  # (megatron's timers: CPU shims)
    timers = StepTimers(log_level=2, log_option="minmax")
    for _ in range(2):
        with timers.phase("optimizer"):
            time.sleep(0.01)
        with timers.phase("batch-generator"):
            pass
    log = CapturedLog()
    window = [step_record([0.75, 0.76], [HEALTHY, HEALTHY]) for _ in range(2)]
    logged(log, window, timers=timers)
    (record,) = log.records
    # ms per step (2 steps), the max over ranks; a timer nobody started is left out
    assert record["timers_ms"]["optimizer"] >= 10.0
    assert set(record["timers_ms"]) == {"optimizer", "batch-generator"}
    assert log.lines[0].startswith("(min, max) time across ranks (ms):")
    assert "optimizer ..." in log.lines[0]
    rss = psutil.Process().memory_info().rss / 1024**3
    assert record["memory_rss_gb"] == pytest.approx(rss, rel=0.2)
    assert record["memory_rss_peak_gb"] >= record["memory_rss_gb"]
    assert "memory_allocated_gb" not in record  # no GPU
    # the timers restarted
    assert timers.window(1, torch.device("cpu"))[0] == {}


def test_device_memory_is_read_from_torchs_cuda_allocator(monkeypatch):
    """On a GPU the record has torch's allocator figures and the window's peaks restart (torch's
    CUDA calls stood in for here)."""
    figures = dict(
        memory_allocated=2 * GB,
        memory_reserved=3 * GB,
        max_memory_allocated=5 * GB,
        max_memory_reserved=6 * GB,
    )
    resets = []
    for name, value in figures.items():
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    device = torch.device("cuda", 0)
    memory = local_memory_bytes(device)
    assert {key: memory[key] for key in memory if "rss" not in key} == dict(
        memory_allocated_gb=2 * GB,
        memory_reserved_gb=3 * GB,
        memory_max_allocated_gb=5 * GB,
        memory_max_reserved_gb=6 * GB,
    )
    assert resets == [device]
    record = {key: value / GB for key, value in memory.items()}
    assert peak_memory_gb(record) == 5.0
    assert megatron_lm_memory_scalars(record) == {
        "mem-reserved-bytes": 3 * GB,
        "mem-allocated-bytes": 2 * GB,
        "mem-max-allocated-bytes": 5 * GB,
    }
