"""Routing analyses on a small trained run: every analysis writes its PNG and CSV, and the CSV's
numbers equal a direct computation here (own router hooks, one sequence per forward pass, own
counts), so neither the hooks' token order nor the bookkeeping can go wrong unnoticed.

The run is trained once for the module by ``pretrain_gpt.py`` (6 steps, checkpoints at 3 and 6)
on a small multi-domain corpus.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from remoe_patches import analysis
from remoe_patches.demo_corpus import build_demo_corpus
from remoe_patches.preprocess import import_indexed_dataset
from test_training import authors_style_flags, ok, run

REPO = Path(__file__).resolve().parent.parent
SEQ_LENGTH = 32
NUM_SEQUENCES = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("corpus"), vocab_size=384,
                             max_chars_per_domain=40_000)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("run")
    ok(run(authors_style_flags(corpus, save, seq_length=SEQ_LENGTH, train_iters=6,
                               save_interval=3, eval_interval=3, log_interval=1)))
    return save


def direct_masks(model, tokens_NS) -> np.ndarray:
    """[N, S, L, E] routing masks: one sequence per forward, hooks on each layer's router."""
    routers = [layer.mlp.router for layer in model.decoder.layers]
    seen = {}
    handles = [router.register_forward_hook(
        lambda module, inputs, output, i=i: seen.__setitem__(i, output[1].clone()))
        for i, router in enumerate(routers)]
    masks = []
    try:
        with torch.no_grad():
            for sequence in tokens_NS:
                tokens = torch.as_tensor(sequence)[None]
                model(tokens, torch.arange(len(sequence))[None], None)
                masks.append(torch.stack([seen[i] for i in range(len(routers))], dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(masks).bool().numpy()  # [N, S(T of one sequence), L, E]


@pytest.fixture(scope="module")
def routed(single_rank, corpus, trained):
    calibration = analysis.calibration_set(corpus.data_prefix, seq_length=SEQ_LENGTH,
                                           num_sequences=NUM_SEQUENCES)
    samples, direct = [], []
    for directory in analysis.checkpoint_dirs(trained):
        checkpoint = analysis.load_checkpoint(directory)
        samples.append(analysis.route_checkpoint(checkpoint, calibration, batch_size=5))
        direct.append(direct_masks(checkpoint.model, calibration.tokens_NS))
    assert [s.iteration for s in samples] == [3, 6]
    return dict(calibration=calibration, samples=samples, direct=direct)


def read_csv(path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_outputs(result, name):
    assert result.png == result.png.parent / f"{name}.png" and result.png.stat().st_size > 10_000
    assert result.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return read_csv(result.csv)


def test_calibration_is_document_beginnings(corpus, routed):
    calibration = routed["calibration"]
    dataset = import_indexed_dataset().IndexedDataset(corpus.data_prefix)
    documents = calibration.documents_NS.reshape(-1)
    tokens = calibration.tokens_NS.reshape(-1)
    starts = np.r_[0, np.nonzero(np.diff(documents))[0] + 1]
    ends = np.r_[starts[1:], documents.size]
    order = documents[starts]
    assert len(set(order.tolist())) == len(order) > 1  # each document once, several of them
    for index, (start, end) in enumerate(zip(starts, ends)):
        document = np.asarray(dataset[order[index]], dtype=np.int64)
        assert np.array_equal(tokens[start:end], document[:end - start])
        if index < len(order) - 1:  # all but the last: the first 4 * S tokens, or all of them
            assert end - start == min(len(document), 4 * SEQ_LENGTH)
    assert calibration.tokens_NS.shape == (NUM_SEQUENCES, SEQ_LENGTH)


def test_routing_masks_match_one_sequence_at_a_time(routed):
    for sample, direct in zip(routed["samples"], routed["direct"]):
        assert sample.layers == [1, 2]
        assert sample.mask_NSLE.shape == direct.shape == (NUM_SEQUENCES, SEQ_LENGTH, 2, 8)
        assert np.array_equal(sample.mask_NSLE, direct)


def test_stages_from_metrics(trained, tmp_path):
    result = analysis.stages(trained, tmp_path)
    rows = check_outputs(result, "stages")
    records = [r for r in analysis.read_metrics(trained) if "lm_loss" in r]
    assert [int(r["iteration"]) for r in rows] == [r["iteration"] for r in records] == list(range(1, 7))
    for row, record in zip(rows, records):
        for key in ("sparsity", "l1_coeff", "reg_loss", "lm_loss"):
            assert float(row[key]) == pytest.approx(record[key], rel=1e-12)
        assert [float(row[f"sparsity_layer_{i}"]) for i in (1, 2)] == \
            pytest.approx(record["sparsity_per_layer"], rel=1e-12)
    validation = {int(r["iteration"]): float(r["val_lm_loss"]) for r in rows if r["val_lm_loss"]}
    assert validation == {r["iteration"]: r["val_lm_loss"]
                          for r in analysis.read_metrics(trained) if "val_lm_loss" in r}
    assert result.summary["target_sparsity"] == 0.875  # 1 - k/E, read from the checkpoint
    assert {row["stage"] for row in rows} <= {"I", "II", "III"}


def test_settle_iteration():
    records = [dict(iteration=i, sparsity=s) for i, s in
               enumerate([0.3, 0.2, 0.6, 0.87, 0.95, 0.88, 0.874, 0.876], start=1)]
    assert analysis.settle_iteration(records, 0.875, tolerance=0.02) == 6
    assert analysis.settle_iteration(records[:5], 0.875, tolerance=0.02) is None


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
            active_per_token[tokens == token].sum() / (count * 2))
    counts = [int(r["count"]) for r in rows]
    assert counts == sorted(counts, reverse=True)


def test_per_domain_fractions_are_direct_counts(corpus, routed, tmp_path):
    sample, direct = routed["samples"][-1], routed["direct"][-1]
    domains = json.loads(Path(corpus.domains_file).read_text())
    rows = check_outputs(analysis.per_domain(sample, analysis.read_domains(corpus.domains_file),
                                             tmp_path), "per_domain")
    token_domains = np.array([domains[d] for d in routed["calibration"].documents_NS.reshape(-1)])
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
            flat[mine, layer, :].sum() / mine.sum())


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
    forged = analysis.RoutedSample(**{**sample.__dict__, "mask_NSLE": mask})
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


def test_command_line_all_and_report(trained, tmp_path):
    out = tmp_path / "analysis"
    tool = str(REPO / "tools" / "analyze_routing.py")
    result = subprocess.run(
        [sys.executable, tool, "all", str(trained), "--documents", "all", "--num-sequences", "4",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in analysis.REPORT_ORDER:
        assert (out / f"{name}.png").is_file() and (out / f"{name}.csv").is_file(), name
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "Routing stability" in page and "per_domain.csv" in page
    # --report alone rebuilds the page from a run directory's analysis/ folder
    (out / "index.html").unlink()
    result = subprocess.run([sys.executable, tool, "--report", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "index.html").is_file()
    bad = subprocess.run([sys.executable, tool, "stability", str(trained / "iter_0000006")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "two or more checkpoints" in bad.stderr.strip().splitlines()[-1]
