"""Router names: the model's router kinds, what sweep files call them, and their display titles.

The model (``ModelConfig.router``, checkpoints, benchmarks, analyses) names the routers by kind:
``dense``, ``topk``, ``relu`` and the Table 2 baselines ``hash``, ``expert_choice``,
``sparsemixer``, ``lory``. Sweep files name them after the config files
(``configs/<size>_<router>.yaml``): ``dense``, ``moe``, ``remoe``, ``hash``, ``ec``,
``sparsemixer``, ``lory``. Tables and plots show
``ROUTER_TITLES``.
"""

from __future__ import annotations

ROUTER_TITLES = {"dense": "Dense", "topk": "TopK MoE", "relu": "ReMoE", "hash": "Hash",
                 "expert_choice": "Expert Choice", "sparsemixer": "SparseMixer-v2",
                 "lory": "Lory"}
"""Display title of each router kind."""

SWEEP_ROUTER_KINDS = {"dense": "dense", "moe": "topk", "remoe": "relu", "hash": "hash",
                      "ec": "expert_choice", "sparsemixer": "sparsemixer", "lory": "lory"}
"""The router kind of each sweep file ``router:`` value."""


def sweep_router_title(value) -> str:
    """The display title of a sweep file's ``router:`` value (anything else as written)."""
    kind = SWEEP_ROUTER_KINDS.get(value)
    return ROUTER_TITLES[kind] if kind is not None else str(value)
