"""What the routing analyses write: a PNG plot, its CSV and a summary JSON each, and
``write_report``'s HTML page that shows every plot of a directory.

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from remoe_patches.analysis.routing_capture import AnalysisError

DPI = 110

# The report's caption of each plot (by file stem), and the order of the plots on the page.
DESCRIPTIONS = {
    "stages": "Training stages (from metrics.jsonl): sparsity per layer and its mean against the "
    "target 1 - k/E, the adaptive L1 coefficient (log scale), the regularization loss "
    "and the LM loss. Stage I: dense warm-up (the routing gets denser while lambda is "
    "tiny); stage II: lambda grows until the sparsity climbs to the target; stage III: "
    "sparsity held at the target.",
    "per_token": "Per-token allocation: average active experts (per MoE layer) of each "
    "vocabulary id against how often it occurs in the calibration set; the line is "
    "the mean in frequency bins. ReLU routing gives rare tokens more experts.",
    "per_domain": "Per-domain routing: for each layer, the fraction of each domain's tokens "
    "routed to each expert, and the average active experts per domain and layer.",
    "load": "Expert load: each expert's share of each layer's tokens (dead: under 1/64), and "
    "each layer's sparsity (collapsed: >= 0.99).",
    "stability": "Routing stability: the flip rate sum_l ||M_i - M_j||_1 / (L T E) of the routing "
    "masks between checkpoints on the same calibration tokens, per layer and overall.",
}
REPORT_ORDER = ("stages", "per_token", "per_domain", "load", "stability")


@dataclass
class AnalysisResult:
    """What an analysis wrote, and its headline numbers."""

    name: str
    png: Path
    csv: Path
    summary: dict = field(default_factory=dict)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_summary(result: AnalysisResult, out_dir: Path) -> AnalysisResult:
    """Write ``<name>.json``, the result's summary, next to its plot; the result back."""
    (Path(out_dir) / f"{result.name}.json").write_text(
        json.dumps(result.summary, indent=2, default=json_default) + "\n"
    )
    return result


def json_default(value):
    """``json.dumps``'s ``default`` for the numpy scalars in summaries."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"{type(value)} is not JSON serializable")


def write_report(directory, title: Optional[str] = None) -> Path:
    """``index.html`` in ``directory`` showing all its plots (embedded), summaries and CSVs."""
    directory = Path(directory)
    pngs = sorted(directory.glob("*.png"))
    if not pngs:
        raise AnalysisError(f"{directory} holds no plots (*.png); run the analyses first")
    order = {name: i for i, name in enumerate(REPORT_ORDER)}
    pngs.sort(key=lambda p: (order.get(p.stem, len(order)), p.stem))
    title = title or f"Routing analysis: {directory.resolve().parent.name}"
    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:.6em;"
        "font-size:12px;overflow-x:auto}nav a{margin-right:1em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<nav>"
        + "".join(f"<a href='#{p.stem}'>{p.stem.replace('_', '-')}</a>" for p in pngs)
        + "</nav>",
    ]
    for png in pngs:
        name = png.stem
        encoded = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<h2 id='{name}'>{html.escape(name.replace('_', '-'))}</h2>")
        if name in DESCRIPTIONS:
            parts.append(f"<p>{html.escape(DESCRIPTIONS[name])}</p>")
        parts.append(f"<img alt='{name}' src='data:image/png;base64,{encoded}'>")
        data = png.with_suffix(".csv")
        if data.is_file():
            parts.append(
                f"<p>Data: <a href='{html.escape(data.name)}'>{html.escape(data.name)}</a></p>"
            )
        summary = png.with_suffix(".json")
        if summary.is_file():
            parts.append(f"<pre>{html.escape(summary.read_text())}</pre>")
    parts.append("</body></html>")
    path = directory / "index.html"
    path.write_text("\n".join(parts) + "\n")
    return path
