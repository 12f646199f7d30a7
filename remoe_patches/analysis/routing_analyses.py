"""Routing analyses of ReMoE and TopK-MoE runs (spec section 5): a PNG plot and its CSV each.

Shape suffixes: N = calibration sequences, S = positions, L = MoE layers, E = experts (after
granularity), V = vocabulary, D = domains.

From ``metrics.jsonl`` alone (read by ``run_metrics``):

- ``stages``: the three training stages of ReLU routing: sparsity (mean and per layer) against
  the target, the L1 coefficient (log scale), the regularization and LM losses over steps.

From checkpoints' routing masks on a fixed calibration set (``routing_capture``: ``M[n, s, l,
e]`` = token ``s`` of sequence ``n`` uses expert ``e`` in MoE layer ``l``); the analyses are
counts over those masks:

- ``per_token``: average active experts per vocabulary id against the token's frequency;
- ``per_domain``: per layer, the fraction of each domain's tokens routed to each expert, and
  the average active experts per domain and layer;
- ``expert_load``: each expert's share of each layer's tokens, dead experts (under 1/64 of the
  tokens) and collapsed layers (sparsity >= 0.99), for one or several checkpoints;
- ``stability``: the flip rate ``sum_l ||M_i^l - M_j^l||_1 / (L T E)`` between checkpoints.

Each writes its files through ``analysis_report``, whose ``write_report`` puts every plot of a
directory on one HTML page. ``tools/analyze_routing.py`` is the command line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from remoe_patches.analysis.analysis_report import (
    AnalysisResult,
    pyplot,
    save_figure,
    write_summary,
)
from remoe_patches.runs.csv_table import write_csv
from remoe_patches.config.router_registry import ROUTERS
from remoe_patches.analysis.routing_capture import AnalysisError, RoutedSample
from remoe_patches.train.routing_health import COLLAPSE_SPARSITY, DEAD_EXPERT_SHARE
from remoe_patches.runs.run_directory import METRICS_FILE
from remoe_patches.runs.run_metrics import (
    SETTLE_TOLERANCE,
    _run_target,
    read_metrics,
    settle_iteration,
)


# ---------------------------------------------------------------------------------------------
# Training stages


def stages(
    run_dir, out_dir, *, target: Optional[float] = None, tolerance: float = SETTLE_TOLERANCE
) -> AnalysisResult:
    """Sparsity (mean, per layer), coefficient, reg and LM loss over steps; the three stages."""
    run_dir = Path(run_dir)
    metrics = run_dir if run_dir.is_file() else run_dir / METRICS_FILE
    records = read_metrics(metrics)
    steps = [r for r in records if "lm_loss" in r]
    if not steps:
        raise AnalysisError(f"{metrics} holds no training records")
    if not any("sparsity" in r for r in steps):
        raise AnalysisError(
            f"{metrics} has no sparsity: the stages are those of ReLU routing (a ReMoE run)"
        )
    steps = [r for r in steps if "sparsity" in r]
    if target is None:
        target = _run_target(metrics.parent)
    evaluations = {r["iteration"]: r["val_lm_loss"] for r in records if "val_lm_loss" in r}
    num_layers = max(len(r.get("sparsity_per_layer") or []) for r in steps)

    iterations = np.array([r["iteration"] for r in steps])
    sparsity = np.array([r["sparsity"] for r in steps])
    settle = settle_iteration(steps, target, tolerance) if target is not None else None
    before = iterations < settle if settle is not None else np.ones_like(iterations, dtype=bool)
    stage2_start = int(iterations[before][np.argmin(sparsity[before])]) if before.any() else None
    stage_of = []
    for iteration in iterations:
        if settle is not None and iteration >= settle:
            stage_of.append("III")
        elif stage2_start is not None and iteration > stage2_start:
            stage_of.append("II")
        else:
            stage_of.append("I")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for record, stage in zip(steps, stage_of):
        row = dict(
            iteration=record["iteration"],
            stage=stage,
            lm_loss=record.get("lm_loss"),
            val_lm_loss=evaluations.get(record["iteration"]),
            reg_loss=record.get("reg_loss"),
            l1_coeff=record.get("l1_coeff"),
            sparsity=record["sparsity"],
            lr=record.get("lr"),
        )
        per_layer = record.get("sparsity_per_layer") or []
        for layer in range(num_layers):
            row[f"sparsity_layer_{layer + 1}"] = (
                per_layer[layer] if layer < len(per_layer) else None
            )
        rows.append(row)
    csv_path = write_csv(out_dir / "stages.csv", rows)

    stage3 = sparsity[iterations >= settle] if settle is not None else np.array([])
    summary = dict(
        target_sparsity=target,
        settle_iteration=settle,
        stage2_start=stage2_start,
        stage3_sparsity_mean=float(stage3.mean()) if stage3.size else None,
        stage3_sparsity_std=float(stage3.std()) if stage3.size else None,
        final_sparsity=float(sparsity[-1]),
        final_sparsity_per_layer=steps[-1].get("sparsity_per_layer"),
        final_l1_coeff=steps[-1].get("l1_coeff"),
        final_lm_loss=steps[-1].get("lm_loss"),
        final_val_lm_loss=evaluations[max(evaluations)] if evaluations else None,
    )

    plt = pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(10.5, 11), sharex=True)
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, max(num_layers, 1)))
    ax = axes[0]
    for layer in range(num_layers):
        values = [r.get(f"sparsity_layer_{layer + 1}") for r in rows]
        ax.plot(
            iterations,
            _floats(values),
            color=colors[layer],
            lw=1,
            alpha=0.8,
            label=f"layer {layer + 1}",
        )
    ax.plot(iterations, sparsity, color="black", lw=2.2, label="mean")
    if target is not None:
        ax.axhline(target, color="red", ls="--", lw=1, label=f"target {target:g}")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].plot(iterations, _floats(r["l1_coeff"] for r in rows), color="tab:purple")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("L1 coefficient $\\lambda$")
    axes[2].plot(iterations, _floats(r["reg_loss"] for r in rows), color="tab:orange")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("$L_{reg}$")
    axes[3].plot(iterations, _floats(r["lm_loss"] for r in rows), label="train")
    if evaluations:
        val_iterations = sorted(evaluations)
        axes[3].plot(
            val_iterations, [evaluations[i] for i in val_iterations], "o-", label="validation"
        )
    axes[3].set_ylabel("LM loss")
    axes[3].set_xlabel("iteration")
    axes[3].legend(fontsize=8)
    # The first record is the mean of the steps since iteration 0: stage I starts there.
    spans = [
        ("I", 0, stage2_start, "tab:blue"),
        ("II", stage2_start, settle if settle is not None else iterations[-1], "tab:orange"),
        ("III", settle, iterations[-1], "tab:green"),
    ]
    for name, start, end, color in spans:
        if start is None or end is None or end <= start:
            continue
        for axis in axes:
            axis.axvspan(start, end, color=color, alpha=0.08)
        axes[0].text((start + end) / 2, 0.04, name, ha="center", fontsize=9, fontweight="bold")
    title = f"{ROUTERS['relu'].title} training stages"
    if settle is not None:
        title += (
            f": settled at iteration {settle}; stage III sparsity "
            f"{summary['stage3_sparsity_mean']:.4f} $\\pm$ "
            f"{summary['stage3_sparsity_std']:.4f}"
        )
    elif target is not None:
        title += f": sparsity not yet within {tolerance} of the target"
    axes[0].set_title(title, fontsize=10)
    png = save_figure(fig, out_dir / "stages.png")
    return write_summary(AnalysisResult("stages", png, csv_path, summary), out_dir)


# ---------------------------------------------------------------------------------------------
# Per-token allocation


def per_token(sample: RoutedSample, out_dir) -> AnalysisResult:
    """Average active experts (per MoE layer) of each vocabulary id against its frequency."""
    tokens = sample.calibration.tokens_NS.reshape(-1)
    mask = sample.mask_NSLE.reshape(tokens.size, len(sample.layers), -1)
    num_layers = mask.shape[1]
    vocab = int(tokens.max()) + 1
    active_TL = mask.sum(axis=2)  # experts used by each token in each layer
    counts_V = np.bincount(tokens, minlength=vocab)
    active_V = np.bincount(tokens, weights=active_TL.sum(axis=1), minlength=vocab)
    active_VL = np.stack(
        [
            np.bincount(tokens, weights=active_TL[:, layer], minlength=vocab)
            for layer in range(num_layers)
        ],
        axis=1,
    )
    present = np.nonzero(counts_V)[0]
    order = present[np.argsort(-counts_V[present], kind="stable")]
    rows = []
    for token in order:
        count = int(counts_V[token])
        row = dict(
            token_id=int(token),
            token=_one_line(_token_text(sample.tokenizer, token)),
            count=count,
            frequency=count / tokens.size,
            active_total=int(active_V[token]),
            mean_active_experts=active_V[token] / (count * num_layers),
        )
        for index, layer in enumerate(sample.layers):
            row[f"mean_active_layer_{layer}"] = active_VL[token, index] / count
        rows.append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out_dir / "per_token.csv", rows)

    frequency = counts_V[order] / tokens.size
    mean_active = active_V[order] / (counts_V[order] * num_layers)
    rho = _spearman(frequency, mean_active)
    edges = np.unique(np.geomspace(frequency.min(), frequency.max() * 1.0001, 13))
    bins = np.clip(np.digitize(frequency, edges) - 1, 0, len(edges) - 2)
    centers, binned = [], []
    for index in range(len(edges) - 1):
        inside = bins == index
        if inside.any():
            # token-weighted: the mean over the bin's token occurrences
            weights = counts_V[order][inside]
            centers.append(math.sqrt(edges[index] * edges[index + 1]))
            binned.append(float(np.average(mean_active[inside], weights=weights)))
    summary = dict(
        tokens=int(tokens.size),
        distinct_tokens=int(present.size),
        spearman_frequency_vs_active=rho,
        mean_active_experts=float(active_V.sum() / (tokens.size * num_layers)),
        active_total=int(active_V.sum()),
        iteration=sample.iteration,
    )

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(
        frequency,
        mean_active,
        s=np.clip(counts_V[order] / counts_V.max() * 60, 3, 60),
        alpha=0.35,
        color="tab:blue",
        edgecolors="none",
        label="vocabulary id",
    )
    ax.plot(centers, binned, "o-", color="tab:red", lw=2, label="mean in frequency bin")
    ax.axhline(
        summary["mean_active_experts"],
        color="gray",
        ls=":",
        lw=1,
        label=f"mean over tokens {summary['mean_active_experts']:.2f}",
    )
    if ROUTERS[sample.router].adaptive_l1:
        ax.axhline(
            sample.topk, color="black", ls="--", lw=1, label=f"TopK's fixed k = {sample.topk}"
        )
    for token in order[:8]:  # the most frequent tokens, labelled
        ax.annotate(
            repr(_token_text(sample.tokenizer, token))[1:-1][:12],
            (counts_V[token] / tokens.size, active_V[token] / (counts_V[token] * num_layers)),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("token frequency in the calibration set")
    ax.set_ylabel("average active experts per MoE layer")
    ax.set_title(
        f"Active experts per vocabulary id ({present.size} ids, {tokens.size:,} tokens, "
        f"iteration {sample.iteration}); Spearman rho = {rho:.2f}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    png = save_figure(fig, out_dir / "per_token.png")
    return write_summary(AnalysisResult("per_token", png, csv_path, summary), out_dir)


def _token_text(tokenizer, token) -> str:
    if tokenizer is None:
        return ""
    try:
        return tokenizer.detokenize([int(token)])
    except Exception:  # an id beyond the tokenizer (vocabulary padding)
        return ""


def _spearman(x, y) -> float:
    """Spearman's rank correlation with ties averaged (no scipy needed)."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


# ---------------------------------------------------------------------------------------------
# Per-domain routing


def default_domains_file(prefix: str) -> Optional[Path]:
    candidate = Path(prefix).parent / "domains.json"
    return candidate if candidate.is_file() else None


def per_domain(sample: RoutedSample, domains: Sequence[str], out_dir) -> AnalysisResult:
    """Per layer: the share of each domain's tokens routed to each expert; active experts."""
    documents = sample.calibration.documents_NS.reshape(-1)
    if documents.max() >= len(domains):
        raise AnalysisError(
            f"the domain list names {len(domains)} documents, but the "
            f"calibration set reaches document {documents.max()}"
        )
    names = sorted(set(domains[d] for d in np.unique(documents)))
    domain_index = {name: i for i, name in enumerate(names)}
    per_document = np.array([domain_index.get(name, -1) for name in domains])
    token_domain = per_document[documents]
    mask = sample.mask_NSLE.reshape(documents.size, len(sample.layers), -1)
    num_experts = mask.shape[2]
    tokens_D = np.bincount(token_domain, minlength=len(names))
    routed_DLE = np.stack([mask[token_domain == d].sum(axis=0) for d in range(len(names))])
    fraction_DLE = routed_DLE / tokens_D[:, None, None]
    active_DL = fraction_DLE.sum(axis=2)

    rows = []
    for index, layer in enumerate(sample.layers):
        for d, name in enumerate(names):
            row = dict(layer=layer, domain=_one_line(name), tokens=int(tokens_D[d]))
            for expert in range(num_experts):
                row[f"expert_{expert}"] = fraction_DLE[d, index, expert]
            row["active_experts"] = active_DL[d, index]
            rows.append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out_dir / "per_domain.csv", rows)
    summary = dict(
        domains={name: int(tokens_D[d]) for d, name in enumerate(names)},
        active_experts={
            name: [round(float(v), 4) for v in active_DL[d]] for d, name in enumerate(names)
        },
        layers=sample.layers,
        iteration=sample.iteration,
    )

    plt = pyplot()
    from matplotlib.gridspec import GridSpec

    num_layers = len(sample.layers)
    columns = min(num_layers, 4)
    heat_rows = math.ceil(num_layers / columns)
    fig = plt.figure(figsize=(3.6 * columns + 1, 2.2 * heat_rows + 3.6))
    grid = GridSpec(
        heat_rows + 1,
        columns + 1,
        figure=fig,
        width_ratios=[1] * columns + [0.05],
        height_ratios=[1] * heat_rows + [1.5],
    )
    vmax = float(fraction_DLE.max()) or 1.0
    image = None
    for index, layer in enumerate(sample.layers):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        image = ax.imshow(
            fraction_DLE[:, index, :], vmin=0, vmax=vmax, cmap="magma_r", aspect="auto"
        )
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yticks(range(len(names)), names if index % columns == 0 else [], fontsize=8)
        ax.set_xticks(range(num_experts))
        ax.tick_params(axis="x", labelsize=6)
        if num_experts <= 16:
            for d in range(len(names)):
                for expert in range(num_experts):
                    value = fraction_DLE[d, index, expert]
                    ax.text(
                        expert,
                        d,
                        f"{value:.2f}"[1:] if value < 1 else "1",
                        ha="center",
                        va="center",
                        fontsize=5.5,
                        color="white" if value > 0.6 * vmax else "black",
                    )
        if index // columns == heat_rows - 1 or index + columns >= num_layers:
            ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(
        image, cax=fig.add_subplot(grid[:heat_rows, columns]), label="share of the domain's tokens"
    )
    ax = fig.add_subplot(grid[heat_rows, :columns])
    width = 0.8 / len(names)
    for d, name in enumerate(names):
        ax.bar(
            np.arange(num_layers) + (d - (len(names) - 1) / 2) * width,
            active_DL[d],
            width,
            label=f"{name} ({tokens_D[d]:,} tokens)",
        )
    if ROUTERS[sample.router].adaptive_l1:
        ax.axhline(
            sample.topk,
            color="black",
            ls="--",
            lw=1,
            label=f"k = {sample.topk} (the target, as a mean over layers)",
        )
    ax.set_xticks(range(num_layers), [f"layer {layer}" for layer in sample.layers], fontsize=8)
    ax.set_ylabel("average active experts")
    ax.legend(fontsize=8, ncol=len(names) + 1)
    fig.suptitle(
        f"Routing by domain (iteration {sample.iteration}): share of each domain's "
        "tokens per expert, and active experts per domain and layer",
        fontsize=10,
    )
    png = save_figure(fig, out_dir / "per_domain.png")
    return write_summary(AnalysisResult("per_domain", png, csv_path, summary), out_dir)


# ---------------------------------------------------------------------------------------------
# Expert load, dead experts, collapsed layers


def expert_load(samples: Sequence[RoutedSample], out_dir) -> AnalysisResult:
    """Each expert's share of each layer's tokens for one or several checkpoints."""
    if not samples:
        raise AnalysisError("expert_load needs at least one routed checkpoint")
    rows, per_iteration = [], []
    for sample in samples:
        mask = sample.mask_NSLE.reshape(-1, len(sample.layers), sample.mask_NSLE.shape[-1])
        load_LE = mask.mean(axis=0)
        sparsity_L = 1.0 - load_LE.mean(axis=1)
        dead_LE = load_LE < DEAD_EXPERT_SHARE
        collapsed_L = sparsity_L >= COLLAPSE_SPARSITY
        per_iteration.append((sample, load_LE, sparsity_L, dead_LE, collapsed_L))
        for index, layer in enumerate(sample.layers):
            for expert in range(load_LE.shape[1]):
                rows.append(
                    dict(
                        iteration=sample.iteration,
                        layer=layer,
                        expert=expert,
                        load=load_LE[index, expert],
                        dead=bool(dead_LE[index, expert]),
                        layer_sparsity=sparsity_L[index],
                        collapsed=bool(collapsed_L[index]),
                    )
                )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out_dir / "load.csv", rows)
    last, load_LE, sparsity_L, dead_LE, collapsed_L = per_iteration[-1]
    summary = dict(
        iteration=last.iteration,
        tokens=int(last.mask_NSLE.shape[0] * last.mask_NSLE.shape[1]),
        dead_experts={
            str(layer): [int(e) for e in np.nonzero(dead_LE[i])[0]]
            for i, layer in enumerate(last.layers)
            if dead_LE[i].any()
        },
        collapsed_layers=[int(layer) for i, layer in enumerate(last.layers) if collapsed_L[i]],
        sparsity_per_layer=[round(float(v), 4) for v in sparsity_L],
        max_load=float(load_LE.max()),
        min_load=float(load_LE.min()),
        dead_share=DEAD_EXPERT_SHARE,
        collapse_sparsity=COLLAPSE_SPARSITY,
    )

    plt = pyplot()
    several = len(per_iteration) > 1
    fig, axes = plt.subplots(
        1,
        3 if several else 2,
        figsize=(16 if several else 11, 4.8),
        gridspec_kw=dict(width_ratios=[1.4, 1, 1] if several else [1.4, 1]),
    )
    ax = axes[0]
    image = ax.imshow(load_LE, cmap="viridis", aspect="auto", vmin=0)
    for index, expert in zip(*np.nonzero(dead_LE)):
        ax.text(
            expert,
            index,
            "x",
            ha="center",
            va="center",
            color="red",
            fontsize=11,
            fontweight="bold",
        )
    ax.set_yticks(range(len(last.layers)), [f"layer {layer}" for layer in last.layers], fontsize=8)
    ax.set_xticks(range(load_LE.shape[1]))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("expert")
    ax.set_title(
        f"share of the layer's tokens (x: dead, < 1/64), iteration {last.iteration}", fontsize=9
    )
    fig.colorbar(image, ax=ax)
    ax = axes[1]
    colors = ["tab:red" if c else "tab:blue" for c in collapsed_L]
    ax.bar(range(len(last.layers)), sparsity_L, color=colors)
    ax.axhline(COLLAPSE_SPARSITY, color="red", ls=":", lw=1, label="collapse 0.99")
    if last.target_sparsity is not None:
        ax.axhline(
            last.target_sparsity,
            color="black",
            ls="--",
            lw=1,
            label=f"target {last.target_sparsity:g}",
        )
    ax.set_xticks(range(len(last.layers)), [str(layer) for layer in last.layers], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"layer sparsity; {int(dead_LE.sum())} dead experts, "
        f"{int(collapsed_L.sum())} collapsed layers",
        fontsize=9,
    )
    if several:
        ax = axes[2]
        iterations = [s.iteration for s, *_ in per_iteration]
        for index, layer in enumerate(last.layers):
            ax.plot(
                iterations, [p[2][index] for p in per_iteration], "o-", ms=3, label=f"layer {layer}"
            )
        ax2 = ax.twinx()
        ax2.plot(
            iterations,
            [int(p[3].sum()) for p in per_iteration],
            "s--",
            color="red",
            alpha=0.6,
            ms=4,
        )
        ax2.set_ylabel("dead experts (all layers)", color="red")
        ax.set_xlabel("iteration")
        ax.set_ylabel("layer sparsity")
        ax.legend(fontsize=7)
        ax.set_title("over checkpoints", fontsize=9)
    fig.tight_layout()
    png = save_figure(fig, out_dir / "load.png")
    return write_summary(AnalysisResult("load", png, csv_path, summary), out_dir)


# ---------------------------------------------------------------------------------------------
# Routing stability


def flip_counts(mask_a: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
    """Per layer: how many (token, expert) entries differ between two ``[N, S, L, E]`` masks."""
    if mask_a.shape != mask_b.shape:
        raise AnalysisError(
            f"routing masks of shapes {mask_a.shape} and {mask_b.shape} do not "
            "compare: the checkpoints differ in layers or experts"
        )
    return (mask_a != mask_b).sum(axis=(0, 1, 3))


def stability(samples: Sequence[RoutedSample], out_dir) -> AnalysisResult:
    """Flip rates between consecutive checkpoints (``samples`` in order) on the same tokens."""
    if len(samples) < 2:
        raise AnalysisError("stability needs at least two checkpoints")
    for sample in samples[1:]:
        if not np.array_equal(sample.calibration.tokens_NS, samples[0].calibration.tokens_NS):
            raise AnalysisError("stability compares masks on the same calibration tokens")
    rows, pairs = [], []
    for before, after in zip(samples, samples[1:]):
        flips_L = flip_counts(before.mask_NSLE, after.mask_NSLE)
        num_tokens = before.mask_NSLE.shape[0] * before.mask_NSLE.shape[1]
        num_experts = before.mask_NSLE.shape[3]
        rate_L = flips_L / (num_tokens * num_experts)
        total = flips_L.sum() / (len(before.layers) * num_tokens * num_experts)
        pairs.append((before.iteration, after.iteration, rate_L, float(total)))
        common = dict(
            from_iteration=before.iteration,
            to_iteration=after.iteration,
            tokens=num_tokens,
            experts=num_experts,
        )
        for index, layer in enumerate(before.layers):
            rows.append(
                dict(common, layer=layer, flips=int(flips_L[index]), flip_rate=rate_L[index])
            )
        rows.append(dict(common, layer="all", flips=int(flips_L.sum()), flip_rate=total))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out_dir / "stability.csv", rows)
    layers = samples[0].layers
    summary = dict(
        pairs=[
            dict(
                from_iteration=a,
                to_iteration=b,
                flip_rate=total,
                flip_rate_per_layer=[round(float(v), 6) for v in rate],
            )
            for a, b, rate, total in pairs
        ],
        tokens=int(samples[0].mask_NSLE.shape[0] * samples[0].mask_NSLE.shape[1]),
    )

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if len(pairs) == 1:
        a, b, rate_L, total = pairs[0]
        ax.bar(range(len(layers)), rate_L, color="tab:blue")
        ax.axhline(total, color="black", ls="--", lw=1, label=f"all layers {total:.4f}")
        ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers], fontsize=8)
        ax.set_title(f"Routing flip rate between iterations {a} and {b}", fontsize=10)
    else:
        to_iterations = [b for _, b, _, _ in pairs]
        for index, layer in enumerate(layers):
            ax.plot(
                to_iterations,
                [p[2][index] for p in pairs],
                "o-",
                ms=3,
                lw=1,
                label=f"layer {layer}",
            )
        ax.plot(
            to_iterations, [p[3] for p in pairs], "o-", color="black", lw=2.2, label="all layers"
        )
        ax.set_xlabel("iteration (against the previous checkpoint)")
        ax.set_title("Routing flip rate between consecutive checkpoints", fontsize=10)
    ax.set_ylabel(
        "flip rate: $||M_i^l - M_j^l||_1 / (T E)$ per layer,\n"
        "$\\sum_l ||M_i^l - M_j^l||_1 / (L T E)$ for all layers",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    png = save_figure(fig, out_dir / "stability.png")
    return write_summary(AnalysisResult("stability", png, csv_path, summary), out_dir)


# ---------------------------------------------------------------------------------------------
# Helpers


def _floats(values) -> np.ndarray:
    """Plot values with None (not logged) as NaN (a gap in the line)."""
    return np.array([np.nan if v is None else float(v) for v in values])


def _one_line(text: str) -> str:
    """``text`` with control characters escaped, so that its CSV row stays one line."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
