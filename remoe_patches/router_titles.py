"""Router names: the model's router kinds, what sweep files call them, and their display titles.

The model (``ModelConfig.router``, checkpoints, benchmarks, analyses) names the three routers by
kind: ``dense``, ``topk``, ``relu``. Sweep files name them after the paper's config files
(``configs/<size>_<router>.yaml``): ``dense``, ``moe``, ``remoe``. Tables and plots show
``ROUTER_TITLES``.
"""

from __future__ import annotations

ROUTER_TITLES = {"dense": "Dense", "topk": "TopK MoE", "relu": "ReMoE"}
"""Display title of each router kind."""

SWEEP_ROUTER_KINDS = {"dense": "dense", "moe": "topk", "remoe": "relu"}
"""The router kind of each sweep file ``router:`` value."""


def sweep_router_title(value) -> str:
    """The display title of a sweep file's ``router:`` value (anything else as written)."""
    kind = SWEEP_ROUTER_KINDS.get(value)
    return ROUTER_TITLES[kind] if kind is not None else str(value)
