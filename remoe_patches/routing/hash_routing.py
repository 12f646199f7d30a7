"""Hash Layers routing (Roller et al. 2021, arXiv 2106.04426), a baseline of the paper's Table 2,
in plain torch: a fixed map of token ids to experts.

Shape suffixes: S = sequence positions, B = sequences of the micro-batch, T = S*B tokens in
s-major order (megatron's ``hidden_states.view(-1, h)``), E = experts, V = vocabulary ids.

The megatron router that uses these functions is ``model/routers/hash_router.py``; nothing here
imports megatron.
"""

from __future__ import annotations

import torch

# The options' values live with the options (router_registry, torch-free).
from remoe_patches.config.router_registry import HASH_TYPES


def mod_hash_table(vocab_size: int, num_experts: int) -> torch.Tensor:
    """``expert_of_token_V``: expert = token id mod E, the ReMoE paper's hash (its §4.2)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return torch.arange(vocab_size, dtype=torch.long) % num_experts


def hash_table(
    vocab_size: int, num_experts: int, hash_type: str = "mod", seed: int = 0
) -> torch.Tensor:
    """``expert_of_token_V`` of ``hash_type`` (one of ``HASH_TYPES``; ``seed`` is used by
    ``random_permutation`` only)."""
    if hash_type == "mod":
        return mod_hash_table(vocab_size, num_experts)
    if hash_type == "random_permutation":
        return balanced_hash_table(vocab_size, num_experts, seed)
    raise ValueError(f"hash_type {hash_type!r} is not one of {', '.join(HASH_TYPES)}")


def balanced_hash_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """``expert_of_token_V``: a fixed random permutation of the vocabulary dealt to the experts
    (hash type ``random_permutation``; not Roller et al.'s "balanced" hash, which balances the
    experts' shares of the training corpus's token frequencies).

    A seeded random permutation of the ids is dealt round-robin to the experts, so the experts'
    vocabulary shares differ by at most one id. The permutation comes from its own generator,
    so the table depends only on the arguments, never on the global RNG state.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    permutation_V = torch.randperm(vocab_size, generator=generator)
    expert_of_token_V = torch.empty(vocab_size, dtype=torch.long)
    expert_of_token_V[permutation_V] = torch.arange(vocab_size) % num_experts
    return expert_of_token_V


def hash_routing(
    expert_of_token_V: torch.Tensor,
    token_ids_SB: torch.Tensor,
    num_experts: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs_TE, routing_map_TE)``: each token to its id's expert with gate 1.0 (k=1).

    ``token_ids_SB`` is in the hidden states' [s, b] order, so row t of the result is token
    ``t = s * B + b``, as megatron's router outputs are.
    """
    expert_T = expert_of_token_V[token_ids_SB.reshape(-1)]
    routing_map_TE = torch.nn.functional.one_hot(expert_T, num_experts).bool()
    return routing_map_TE.to(dtype), routing_map_TE


def sequence_parallel_slice(token_ids_SB: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of ``token_ids_SB`` under sequence parallelism.

    megatron scatters the sequence dimension of the embeddings into ``world_size`` equal,
    contiguous chunks in rank order (``scatter_to_sequence_parallel_region``); the ids follow.
    """
    seq_length = token_ids_SB.shape[0]
    if seq_length % world_size:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by the tensor-parallel size "
            f"{world_size}; sequence parallelism needs a multiple of it"
        )
    chunk = seq_length // world_size
    return token_ids_SB[rank * chunk : (rank + 1) * chunk]
