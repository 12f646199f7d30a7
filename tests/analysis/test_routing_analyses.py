"""Routing analyses on a small trained run (``routing_fixtures``): every analysis writes its PNG
and CSV, and the CSV's numbers equal a direct computation here (own router hooks, one sequence
per forward pass, own counts), so the bookkeeping cannot go wrong unnoticed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from remoe_patches.analysis import routing_analyses as analysis, routing_capture
from remoe_patches.data import domains
from remoe_patches.runs import run_metrics

pytestmark = pytest.mark.integration


def read_csv(path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_outputs(result, name):
    assert result.png == result.png.parent / f"{name}.png" and result.png.stat().st_size > 10_000
    assert result.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return read_csv(result.csv)


def test_stages_from_metrics(routing_run, tmp_path):
    result = analysis.stages(routing_run, tmp_path)
    rows = check_outputs(result, "stages")
    records = [r for r in run_metrics.read_metrics(routing_run) if "lm_loss" in r]
    assert (
        [int(r["iteration"]) for r in rows]
        == [r["iteration"] for r in records]
        == list(range(1, 7))
    )
    for row, record in zip(rows, records):
        for key in ("sparsity", "l1_coeff", "reg_loss", "lm_loss"):
            assert float(row[key]) == pytest.approx(record[key], rel=1e-12)
        assert [float(row[f"sparsity_layer_{i}"]) for i in (1, 2)] == pytest.approx(
            record["sparsity_per_layer"], rel=1e-12
        )
    validation = {int(r["iteration"]): float(r["val_lm_loss"]) for r in rows if r["val_lm_loss"]}
    assert validation == {
        r["iteration"]: r["val_lm_loss"]
        for r in run_metrics.read_metrics(routing_run)
        if "val_lm_loss" in r
    }
    assert result.summary["target_sparsity"] == 0.875  # 1 - k/E, read from the checkpoint
    assert {row["stage"] for row in rows} <= {"I", "II", "III"}


def test_per_token_counts_add_up(routed, tmp_path):
    sample, direct = routed["samples"][-1], routed["direct"][-1]
    rows = check_outputs(analysis.per_token(sample, tmp_path), "per_token")
    tokens = routed["calibration"].tokens_NS.reshape(-1)
    active_per_token = direct.sum(axis=(2, 3)).reshape(-1)
    assert sum(int(r["active_total"]) for r in rows) == direct.sum()
    assert sum(int(r["count"]) for r in rows) == tokens.size
    assert len(rows) == len(np.unique(tokens))
    for row in rows:
        token = int(row["token_id"])
        count = int((tokens == token).sum())
        assert int(row["count"]) == count
        assert int(row["active_total"]) == active_per_token[tokens == token].sum()
        assert float(row["mean_active_experts"]) == pytest.approx(
            active_per_token[tokens == token].sum() / (count * 2)
        )
    counts = [int(r["count"]) for r in rows]
    assert counts == sorted(counts, reverse=True)


def test_per_domain_fractions_are_direct_counts(routing_corpus, routed, tmp_path):
    sample, direct = routed["samples"][-1], routed["direct"][-1]
    written = json.loads(Path(routing_corpus.domains_file).read_text())
    rows = check_outputs(
        analysis.per_domain(sample, domains.read_domains(routing_corpus.domains_file), tmp_path),
        "per_domain",
    )
    token_domains = np.array([written[d] for d in routed["calibration"].documents_NS.reshape(-1)])
    flat = direct.reshape(-1, 2, 8)
    assert len(rows) == 2 * len(set(token_domains))
    for row in rows:
        layer = int(row["layer"]) - 1
        mine = token_domains == row["domain"]
        assert int(row["tokens"]) == mine.sum() > 0
        expected = flat[mine, layer, :].sum(axis=0) / mine.sum()
        got = [float(row[f"expert_{e}"]) for e in range(8)]
        assert got == pytest.approx(expected.tolist(), abs=1e-12)
        assert float(row["active_experts"]) == pytest.approx(
            flat[mine, layer, :].sum() / mine.sum()
        )


def test_load_dead_experts_and_collapsed_layers(routed, tmp_path):
    rows = check_outputs(analysis.expert_load(routed["samples"], tmp_path), "load")
    assert {int(r["iteration"]) for r in rows} == {3, 6}
    for row in rows:
        direct = routed["direct"][0 if int(row["iteration"]) == 3 else 1]
        flat = direct.reshape(-1, 2, 8)
        layer, expert = int(row["layer"]) - 1, int(row["expert"])
        load = flat[:, layer, expert].mean()
        assert float(row["load"]) == pytest.approx(load)
        assert row["dead"] == str(load < 1 / 64)
        sparsity = 1 - flat[:, layer, :].mean()
        assert float(row["layer_sparsity"]) == pytest.approx(sparsity)
        assert row["collapsed"] == str(sparsity >= 0.99)


def test_collapsed_layer_and_dead_experts_are_flagged(routed, tmp_path):
    sample = routed["samples"][-1]
    mask = sample.mask_NSLE.copy()
    mask[:, :, 1, :] = False  # layer 2: no token uses any expert
    mask[:, :, 0, 3] = False  # layer 1: expert 3 gets nothing
    forged = routing_capture.RoutedSample(**{**sample.__dict__, "mask_NSLE": mask})
    result = analysis.expert_load([forged], tmp_path)
    assert result.summary["collapsed_layers"] == [2]
    assert 3 in result.summary["dead_experts"]["1"]
    assert result.summary["dead_experts"]["2"] == list(range(8))


def test_flip_rate(routed, tmp_path):
    first, last = routed["samples"]
    rows = check_outputs(analysis.stability([last, last], tmp_path), "stability")
    assert all(float(r["flip_rate"]) == 0.0 and int(r["flips"]) == 0 for r in rows)
    rows = check_outputs(analysis.stability([first, last], tmp_path), "stability")
    a, b = routed["direct"]
    L, T, E = 2, a.shape[0] * a.shape[1], 8
    overall = np.abs(a.astype(int) - b.astype(int)).sum() / (L * T * E)
    by_layer = {r["layer"]: r for r in rows}
    assert float(by_layer["all"]["flip_rate"]) == pytest.approx(overall) and overall > 0
    for layer in (1, 2):
        flips = (a[:, :, layer - 1] != b[:, :, layer - 1]).sum()
        assert int(by_layer[str(layer)]["flips"]) == flips
        assert float(by_layer[str(layer)]["flip_rate"]) == pytest.approx(flips / (T * E))
    assert {(r["from_iteration"], r["to_iteration"]) for r in rows} == {("3", "6")}
