"""Reading a run's metrics: the iteration the sparsity settled at."""

from __future__ import annotations

from remoe_patches.runs import run_metrics


def test_settle_iteration():
    records = [
        dict(iteration=i, sparsity=s)
        for i, s in enumerate([0.3, 0.2, 0.6, 0.87, 0.95, 0.88, 0.874, 0.876], start=1)
    ]
    assert run_metrics.settle_iteration(records, 0.875, tolerance=0.02) == 6
    assert run_metrics.settle_iteration(records[:5], 0.875, tolerance=0.02) is None
