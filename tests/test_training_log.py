"""The training log's window summary: averages, and the collapse and dead-expert warnings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from remoe_patches.config import ModelConfig
from remoe_patches.training import RunState, log_window


class CapturedLog:
    def __init__(self):
        self.lines, self.records = [], []

    def print(self, line):
        self.lines.append(line)

    def step(self, record):
        self.records.append(record)


def step_record(sparsity_L, load_LE, lm_loss=3.0):
    sparsity_L = torch.tensor(sparsity_L)
    return dict(lm_loss=torch.tensor(lm_loss), grad_norm=1.0, skipped=False, lr=1e-3,
                sparsity=torch.nanmean(sparsity_L), sparsity_L=sparsity_L,
                l1_coeff=torch.tensor(0.01), reg_loss_L=torch.tensor([0.5, 0.7]),
                expert_load=torch.tensor(load_LE), step_seconds=0.5)


def test_window_warns_about_collapsed_layers_and_dead_experts():
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        num_experts=4, topk=1, router="relu", vocab_size=128, seq_length=16)
    healthy = [0.25, 0.25, 0.25, 0.25]
    starved = [0.50, 0.49, 0.005, 0.005]  # experts 2 and 3 get 0.5% of the tokens
    window = [
        step_record([0.70, 0.985], [healthy, starved]),
        step_record([0.72, 0.999], [healthy, starved]),
    ]
    args = SimpleNamespace(global_batch_size=4, seq_length=16, train_iters=10)
    log = CapturedLog()
    log_window(log, window, args, RunState(iteration=2, consumed_samples=8), model, 1)
    (record,) = log.records
    assert math.isclose(record["sparsity_min"], 0.71, rel_tol=1e-6)
    assert math.isclose(record["sparsity_max"], 0.992, rel_tol=1e-6)
    assert record["sparsity_per_layer"] == [record["sparsity_min"], record["sparsity_max"]]
    assert record["collapsed_layers"] == 1 and record["dead_experts"] == 2
    collapsed = [l for l in log.lines if "collapsed layers" in l]
    dead = [l for l in log.lines if "dead experts" in l]
    assert collapsed == [" WARNING: collapsed layers at iteration 2 (mean sparsity >= 0.99 over "
                         "the last 2 steps): 2 (0.9920)"]
    assert dead == [" WARNING: dead experts at iteration 2 (under 1/64 of the layer's tokens over "
                    "the last 2 steps): layer 2: expert 2 (0.50%), 3 (0.50%)"]


def test_no_warning_for_a_healthy_window():
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        num_experts=4, topk=1, router="relu", vocab_size=128, seq_length=16)
    even = [[0.25] * 4, [0.25] * 4]
    window = [step_record([0.75, 0.76], even)]
    log = CapturedLog()
    log_window(log, window, SimpleNamespace(global_batch_size=4, seq_length=16, train_iters=10),
               RunState(iteration=1), model, 1)
    assert log.lines == [] and log.records[0]["dead_experts"] == 0
