"""Hash routing math (``routing.hash_routing``) against independent loop and numpy
computations: the hash table and its balance, and sequence-parallel slicing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron.core.tensor_parallel.mappings import _split_along_first_dim

from remoe_patches.routing.hash_routing import (
    balanced_hash_table,
    hash_routing,
    sequence_parallel_slice,
)

from routing_references import reference_hash_table


# --- hash routing ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, num_experts, seed", [(128, 8, 0), (50, 8, 7), (1000, 3, 123)])
def test_hash_table_is_the_seeded_round_robin_deal(vocab_size, num_experts, seed):
    table = balanced_hash_table(vocab_size, num_experts, seed)
    assert table.dtype == torch.long and table.tolist() == reference_hash_table(
        vocab_size, num_experts, seed
    )


@pytest.mark.parametrize("vocab_size, num_experts", [(128, 8), (50, 8), (1001, 7), (5, 8)])
def test_hash_table_balances_the_vocabulary(vocab_size, num_experts):
    counts = np.bincount(
        balanced_hash_table(vocab_size, num_experts, 3).numpy(), minlength=num_experts
    )
    assert counts.sum() == vocab_size and counts.max() - counts.min() <= 1


def test_hash_table_ignores_the_global_rng():
    torch.manual_seed(1)
    first = balanced_hash_table(256, 8, seed=5)
    torch.manual_seed(2)
    torch.rand(10)
    assert torch.equal(balanced_hash_table(256, 8, seed=5), first)
    assert not torch.equal(balanced_hash_table(256, 8, seed=6), first)


def test_hash_routing_is_one_hot_in_s_major_order():
    table = balanced_hash_table(64, 4, 0)
    token_ids_SB = torch.randint(0, 64, (5, 3), generator=torch.Generator().manual_seed(0))
    probs, routing_map = hash_routing(table, token_ids_SB, 4)
    assert probs.shape == routing_map.shape == (15, 4) and routing_map.dtype == torch.bool
    for s in range(5):
        for b in range(3):
            expected = [0.0] * 4
            expected[table[token_ids_SB[s, b]].item()] = 1.0
            assert probs[s * 3 + b].tolist() == expected
    assert torch.equal(routing_map, probs > 0)


def test_sequence_parallel_slice_matches_megatrons_sequence_scatter():
    """On a fake 2-rank group: rank r's ids are the ids of the embedding rows megatron's
    scatter to the sequence-parallel region keeps on rank r, and the ranks' slices tile the
    sequence in rank order."""
    token_ids_SB = torch.arange(8 * 3).reshape(8, 3)
    embeddings_SBH = token_ids_SB[..., None].float() * torch.ones(2)  # each row carries its id
    slices = []
    for rank in range(2):
        group = SimpleNamespace(size=lambda: 2, rank=lambda rank=rank: rank)
        local = sequence_parallel_slice(token_ids_SB, rank, 2)
        assert torch.equal(local.float(), _split_along_first_dim(embeddings_SBH, group)[..., 0])
        slices.append(local)
    assert torch.equal(torch.cat(slices), token_ids_SB)
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 3"):
        sequence_parallel_slice(token_ids_SB, 0, 3)
