"""Routing health: dead experts and collapsed layers, their thresholds, and the training log's
reporting of them.

Shape suffixes: L = all transformer layers (index = layer number - 1), E = experts. Layers and
experts in the reported sets are numbered as in the logs: layers from 1, experts from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

DEAD_EXPERT_SHARE = 1.0 / 64
"""An expert receiving under this share of its layer's tokens is dead."""
COLLAPSE_SPARSITY = 0.99
"""A layer whose mean sparsity reaches this has collapsed (almost no token gets an expert)."""


def dead_experts(fraction_LE: torch.Tensor) -> set:
    """``{(layer, expert)}`` under ``DEAD_EXPERT_SHARE``; NaN rows (non-MoE layers) never count."""
    return {
        (layer + 1, expert)
        for layer, expert in torch.nonzero(fraction_LE < DEAD_EXPERT_SHARE).tolist()
    }


def collapsed_layers(sparsity_L: torch.Tensor) -> set:
    """Layers (from 1) whose sparsity is at least ``COLLAPSE_SPARSITY``; NaN never counts."""
    collapsed = torch.nonzero(sparsity_L >= COLLAPSE_SPARSITY).flatten().tolist()
    return {layer + 1 for layer in collapsed}


@dataclass
class RoutingHealth:
    """Which experts are dead (under 1/64 of their layer's tokens) and which layers collapsed
    (mean sparsity >= 0.99), judged per log window; it speaks when that changes, and at the end.

    Near the target sparsity an expert's share of a 20-step window moves around 1/64 by chance,
    so a state counts as changed only after ``persist`` windows in a row say so: a dead expert
    is reported once it has been starved that long, and back once it has been fed that long.
    """

    persist: int = 5
    dead: set = field(default_factory=set)  # (layer, expert), layers numbered from 1
    collapsed: set = field(default_factory=set)  # layers
    ever_dead: set = field(default_factory=set)
    ever_collapsed: set = field(default_factory=set)
    _streaks: dict = field(default_factory=dict)  # item -> windows in a row against its state

    def update(self, iteration: int, dead: set, collapsed: set, steps: int) -> list:
        span = f"in {self.persist} windows of {steps} steps in a row"
        lines = []
        started, ended = self._changes(self.dead, dead, kind="expert")
        if started:
            lines.append(
                f" WARNING: experts dead at iteration {iteration} (under 1/64 of their "
                f"layer's tokens {span}): {_by_layer(started)}"
            )
        if ended:
            lines.append(
                f" note: experts active again at iteration {iteration}: {_by_layer(ended)}"
            )
        started, ended = self._changes(self.collapsed, collapsed, kind="layer")
        if started:
            lines.append(
                f" WARNING: layers collapsed at iteration {iteration} (mean sparsity "
                f">= {COLLAPSE_SPARSITY} {span}): " + ", ".join(map(str, sorted(started)))
            )
        if ended:
            lines.append(
                f" note: layers routing again at iteration {iteration}: "
                + ", ".join(map(str, sorted(ended)))
            )
        self.ever_dead |= self.dead
        self.ever_collapsed |= self.collapsed
        return lines

    def _changes(self, state: set, now: set, kind: str) -> tuple[set, set]:
        """Update ``state`` in place from this window's ``now``; the items that entered, left."""
        entered, left = set(), set()
        counting = {item for k, item in self._streaks if k == kind}
        for item in state | now | counting:
            key = (kind, item)
            if (item in now) == (item in state):
                self._streaks.pop(key, None)
                continue
            self._streaks[key] = self._streaks.get(key, 0) + 1
            if self._streaks[key] >= self.persist:
                del self._streaks[key]
                (entered if item in now else left).add(item)
        state |= entered
        state -= left
        return entered, left

    def summary(self) -> Optional[str]:
        """The end state, if anything was ever wrong."""
        if not self.ever_dead and not self.ever_collapsed:
            return None
        parts = [
            f"{len(self.dead)} dead experts at the end"
            + (f" ({_by_layer(self.dead)})" if self.dead else ""),
            f"{len(self.ever_dead)} dead at some point",
        ]
        if self.ever_collapsed:
            parts.append(
                f"collapsed layers: {sorted(self.collapsed) or 'none'} at the end, "
                f"{sorted(self.ever_collapsed)} at some point"
            )
        return " routing health: " + "; ".join(parts) + " (per window: metrics.jsonl)"


def _by_layer(pairs: set) -> str:
    layers = sorted({layer for layer, _ in pairs})
    return "; ".join(
        f"layer {layer}: expert "
        + ", ".join(str(e) for pair_layer, e in sorted(pairs) if pair_layer == layer)
        for layer in layers
    )
