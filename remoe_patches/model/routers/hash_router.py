"""``HashRouter``: Hash Layers routing (Roller et al. 2021, arXiv 2106.04426) as a megatron-core
Router for ``MoESubmodules.router``; a baseline of the paper's Table 2.

Shape suffixes: S = sequence positions, B = sequences, T = S*B tokens (s-major), E = experts.

Every token goes to one fixed expert chosen by its vocabulary id, k=1, with gate 1.0: the
expert's output is used as it is, as in the paper. Nothing is learned and there is no
load-balancing loss. The map (``hash_routing.hash_table``) is ``hash_type``: ``mod``
(expert = token id mod E, the ReMoE paper's setting and the default) or ``random_permutation``
(a seeded random permutation of the vocabulary dealt round-robin to the experts).

Token ids: megatron's MoE layer hands its router only hidden states. ``feed_token_ids(model)``
registers a forward pre-hook on the GPTModel that gives the micro-batch's ``input_ids`` [b, s]
to every ``HashRouter`` of that model (an attribute of each router, no module global). The
router transposes them to the hidden states' [s, b] order and, with sequence parallelism, keeps
its tensor-parallel rank's slice of the sequence. (With context parallelism megatron's data path
already hands the model this rank's part of each sequence, so ids and hidden states agree.)
Every MoE layer built by one builder uses the same table, as the reference implementation's
single fixed map does: a token goes to the same expert index in every layer.

Limitation: the ids a router holds are those of the model's LAST forward. With activation
recomputation of MoE layers (``moe_layer_recompute`` or full/selective recomputation that
covers them) under pipeline parallelism, the recomputed forward of micro-batch i runs in its
backward pass, after micro-batch i+1's forward has replaced the ids, and would route with the
wrong ids (the shapes agree, so nothing would notice). That combination must be refused by the
caller's config validation. Without pipeline parallelism every micro-batch's backward follows
its own forward, so recomputation is safe.

The base Router's ``weight`` (the learned gate of other routers) is kept, so checkpoints,
parameter counts and the global RNG's draws at initialisation are those of a TopK model, but
frozen (``requires_grad=False``): megatron's DDP and optimizer skip it, so it costs no gradient
buffer or optimizer state and stays at its initial value.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.routing.hash_routing import (
    HASH_TYPES,
    hash_routing,
    hash_table,
    sequence_parallel_slice,
)
from remoe_patches.config.model_config import ConfigError
from remoe_patches.runtime.parallel import local_device

DEFAULT_HASH_SEED = 0
"""The hash's seed when none is given: every run, rank and resume gets the same table."""


class HashRouter(Router):
    """Route each token to the expert its vocabulary id hashes to (k=1, gate 1.0).

    Args:
        config: the model's TransformerConfig (``num_moe_experts`` experts, ``moe_router_topk``
            must be 1).
        pg_collection: megatron-core process groups (given by MoELayer).
        vocab_size: the model's (padded) vocabulary size; ids must be below it.
        seed: the ``random_permutation`` hash's seed; the table depends only on
            (vocab_size, experts, hash_type, seed).
        hash_type: ``mod`` (expert = id mod E, the default) or ``random_permutation``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        *,
        vocab_size: int,
        seed: int = DEFAULT_HASH_SEED,
        hash_type: str = "mod",
    ):
        if config.moe_router_topk != 1:
            raise ConfigError(
                f"HashRouter: moe_router_topk={config.moe_router_topk}, but hash routing sends "
                "each token to exactly one expert; set topk=1 (and granularity=1)"
            )
        super().__init__(config=config, pg_collection=pg_collection)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.vocab_size = vocab_size
        self.seed = seed
        self.hash_type = hash_type
        # Derived from the arguments, so not saved: a resume rebuilds the same table.
        self.register_buffer(
            "expert_of_token_V",
            hash_table(vocab_size, self.num_experts, hash_type, seed).to(local_device()),
            persistent=False,
        )
        self.token_ids_BS: Optional[torch.Tensor] = None
        """The current micro-batch's ``input_ids`` [b, s], set by ``feed_token_ids``' hook."""

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``(probs_TE, routing_map_TE)`` for hidden states ``input`` [s, b, h].

        ``padding_mask`` is not needed: a token's expert depends on its id alone, and there is
        no load statistic for padding to distort.
        """
        token_ids_SB = self.local_token_ids(input.shape[:2])
        return self.routing(token_ids_SB)

    def local_token_ids(self, hidden_shape_SB: torch.Size) -> torch.Tensor:
        """The ids of the tokens whose hidden states this router sees, in [s, b] order."""
        if self.token_ids_BS is None:
            raise RuntimeError(
                f"HashRouter (layer {self.layer_number}) has no token ids: call "
                "remoe_patches.model.routers.hash_router.feed_token_ids(model) on the GPTModel "
                "after building "
                "it, and pass input_ids to its forward"
            )
        token_ids_SB = self.token_ids_BS.transpose(0, 1)
        tp_size = self.tp_group.size()
        if self.config.sequence_parallel and tp_size > 1:
            token_ids_SB = sequence_parallel_slice(token_ids_SB, self.tp_group.rank(), tp_size)
        if token_ids_SB.shape != hidden_shape_SB:
            raise ValueError(
                f"HashRouter (layer {self.layer_number}): token ids of shape [s, b] = "
                f"{list(token_ids_SB.shape)} (from input_ids [b, s] = "
                f"{list(self.token_ids_BS.shape)}) do not match the hidden states' "
                f"[s, b] = {list(hidden_shape_SB)}; the model's input_ids must be the tokens "
                "of the hidden states the MoE layers route"
            )
        return token_ids_SB

    def routing(self, token_ids_SB: torch.Tensor):
        """One-hot gates of each token's hashed expert."""
        if self.expert_of_token_V.device != token_ids_SB.device:
            self.expert_of_token_V = self.expert_of_token_V.to(token_ids_SB.device)
        return hash_routing(self.expert_of_token_V, token_ids_SB, self.num_experts)


def hash_router_builder(vocab_size: int, seed: int = DEFAULT_HASH_SEED, hash_type: str = "mod"):
    """A RouterBuilder for ``MoESubmodules.router``: ``HashRouter`` over ``vocab_size`` ids."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(
            f"hash_router_builder: vocab_size must be a positive int (the model's padded "
            f"vocabulary size), got {vocab_size!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"hash_router_builder: seed must be an int, got {seed!r}")
    if hash_type not in HASH_TYPES:
        raise ConfigError(
            f"hash_router_builder: hash_type must be one of "
            f"{', '.join(HASH_TYPES)}, got {hash_type!r}"
        )
    return functools.partial(HashRouter, vocab_size=vocab_size, seed=seed, hash_type=hash_type)


def router_builder_for(model, regularizer=None):
    """The registry's builder (``router_registry``): Hash routers over ``model``'s vocabulary."""
    options = model.router_options
    return hash_router_builder(model.vocab_size, options.seed, options.hash_type)


def feed_token_ids(model: torch.nn.Module) -> list:
    """Give every ``HashRouter`` of ``model`` the token ids of each forward.

    Registers a forward pre-hook on each GPTModel in ``model`` (the model itself or the one a
    wrapper holds; call it once per pipeline model chunk) that stores the forward's
    ``input_ids`` [b, s] on the HashRouters inside that GPTModel. Returns the hook handles
    (``handle.remove()`` undoes it). A GPTModel without HashRouters gets no hook.
    """
    gpt_models = [module for module in model.modules() if isinstance(module, GPTModel)]
    if not gpt_models:
        raise ValueError(
            f"feed_token_ids: {type(model).__name__} contains no megatron GPTModel; pass the "
            "built GPTModel (or a wrapper holding it)"
        )
    handles = []
    for gpt_model in gpt_models:
        routers = [module for module in gpt_model.modules() if isinstance(module, HashRouter)]
        if routers:
            handles.append(
                gpt_model.register_forward_pre_hook(
                    functools.partial(_hand_token_ids, routers), with_kwargs=True
                )
            )
    return handles


def _hand_token_ids(routers: list, module, args, kwargs):
    token_ids_BS = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
    for router in routers:
        router.token_ids_BS = token_ids_BS
