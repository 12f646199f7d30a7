"""What a run directory's ``metrics.jsonl`` and settings say: its records, the iteration the
ReMoE sparsity settled at, and the target sparsity ``1 - k/E``.

Cheap to import (no torch, megatron-core or matplotlib): ``tools/sweep.py --collect`` and the
``stages`` analysis both read runs through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from remoe_patches.runs.run_directory import config_path, latest_pointer_path, metrics_path

SETTLE_TOLERANCE = 0.02


def read_metrics(path) -> list:
    """The records of ``metrics.jsonl`` (``path`` may be the file or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = Path(metrics_path(path))
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    return records


def settle_iteration(
    records: Sequence[dict], target: float, tolerance: float = SETTLE_TOLERANCE
) -> Optional[int]:
    """The first logged iteration from which the sparsity stays within ``tolerance`` of
    ``target`` to the end of the run (the end of stage II); None if it never does."""
    settled = None
    for record in records:
        if "sparsity" not in record:
            continue
        if abs(record["sparsity"] - target) <= tolerance:
            if settled is None:
                settled = record["iteration"]
        else:
            settled = None
    return settled


def target_from_flags(flags: dict) -> Optional[float]:
    """ReMoE's target sparsity ``1 - k/E`` from pretrain_gpt.py flags written with underscores
    (a sweep run's ``config.yaml``), with the parser's default k; None unless ReLU routed."""
    if not flags.get("moe_relu_routing") or not flags.get("num_experts"):
        return None
    from remoe_patches.cli.arguments import build_parser

    topk = flags.get("moe_router_topk") or build_parser().get_default("moe_router_topk")
    return 1.0 - int(topk) / int(flags["num_experts"])


def _run_target(run_dir: Path) -> Optional[float]:
    """The target sparsity of a run directory: its sweep config.yaml, else its checkpoint."""
    import yaml

    config = Path(config_path(run_dir))
    if config.is_file():
        flags = yaml.safe_load(config.read_text()) or {}
        if isinstance(flags, dict) and flags.get("moe_relu_routing"):
            return target_from_flags(flags)
    if os.path.isfile(latest_pointer_path(run_dir)):
        from remoe_patches.train.checkpointing import read_run_config

        model = read_run_config(str(run_dir)).model
        return model.target_sparsity if model.kind.adaptive_l1 else None
    return None
