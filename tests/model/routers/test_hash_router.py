"""``HashRouter`` in megatron-core: routing depends on the token id alone, the ids reach the
routers through ``feed_token_ids`` in [s, b] order (and in sequence-parallel slices), a tiny
GPTModel trains with it, and missing or mismatched ids fail clearly."""

from __future__ import annotations

import pytest
import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from remoe_patches.config.model_config import ConfigError, ModelConfig
from remoe_patches.model.routers.hash_router import (
    DEFAULT_HASH_SEED,
    HashRouter,
    feed_token_ids,
    hash_router_builder,
)

from routing_references import reference_hash_table
from tiny import (
    NUM_EXPERTS,
    TINY_MODEL,
    batch,
    build_gpt,
    fake_groups,
    transformer_config,
)


def hash_router(config=None, pg_collection=None, seed=DEFAULT_HASH_SEED, **hash_type):
    return hash_router_builder(TINY_MODEL["vocab_size"], seed, **hash_type)(
        config=config or transformer_config(), pg_collection=pg_collection or fake_groups()
    )


def expected_map(token_ids_SB, seed=DEFAULT_HASH_SEED, hash_type="mod"):
    """The one-hot routing map of ``token_ids_SB`` [s, b], s-major: expert id % E (``mod``)
    or by the hand-dealt table (``random_permutation``)."""
    table = (
        reference_hash_table(TINY_MODEL["vocab_size"], NUM_EXPERTS, seed)
        if hash_type == "random_permutation"
        else [token_id % NUM_EXPERTS for token_id in range(TINY_MODEL["vocab_size"])]
    )
    ids = token_ids_SB.reshape(-1).tolist()
    routing_map = torch.zeros(len(ids), NUM_EXPERTS, dtype=torch.bool)
    for t, token_id in enumerate(ids):
        routing_map[t, table[token_id]] = True
    return routing_map


def test_routing_is_a_function_of_the_token_id_alone():
    router = hash_router()
    gen = torch.Generator().manual_seed(0)
    # ids 40..47, each twice per sequence at shuffled positions, in all three sequences
    token_ids_BS = torch.stack([torch.randperm(16, generator=gen) % 8 + 40 for _ in range(3)])
    router.token_ids_BS = token_ids_BS
    probs, routing_map = router(torch.randn(16, 3, 32, generator=gen))
    other_probs, other_map = router(torch.randn(16, 3, 32, generator=gen) * 100)
    assert torch.equal(routing_map, other_map) and torch.equal(probs, other_probs)
    assert torch.equal(routing_map, expected_map(token_ids_BS.t()))
    assert torch.equal(probs, routing_map.float())
    experts_of_id, positions_of_id = {}, {}
    for t, token_id in enumerate(token_ids_BS.t().reshape(-1).tolist()):
        experts_of_id.setdefault(token_id, set()).add(routing_map[t].nonzero().item())
        positions_of_id.setdefault(token_id, set()).add(divmod(t, 3))  # (s, b)
    assert len(experts_of_id) == 8
    assert all(len(experts) == 1 for experts in experts_of_id.values())
    # each id recurred at several positions of several sequences: the check above had work
    assert all(
        len({s for s, _ in sb}) > 1 and len({b for _, b in sb}) > 1
        for sb in positions_of_id.values()
    )


def test_the_default_routes_token_id_mod_e_as_the_paper_does(single_rank):
    """The ReMoE paper's hash: expert = token id mod E, for every id of the vocabulary, from
    the builder's default, ModelConfig's default and the flags' default."""
    token_ids_BS = torch.arange(TINY_MODEL["vocab_size"]).reshape(4, -1)
    router = hash_router()
    router.token_ids_BS = token_ids_BS
    _, routing_map = router(torch.zeros(token_ids_BS.shape[1], 4, 32))
    assert torch.equal(routing_map.long().argmax(-1), token_ids_BS.t().reshape(-1) % NUM_EXPERTS)
    assert routing_map.sum(-1).eq(1).all()
    model_config = ModelConfig(router="hash", **TINY_MODEL)
    assert model_config.router_options.hash_type == "mod"
    from remoe_patches.model.build import router_builder_for

    built = router_builder_for(model_config)(
        config=transformer_config(), pg_collection=fake_groups()
    )
    assert built.expert_of_token_V.tolist() == [
        i % NUM_EXPERTS for i in range(TINY_MODEL["vocab_size"])
    ]


def test_random_permutation_is_the_seeded_permutation_option():
    router = hash_router(seed=11, hash_type="random_permutation")
    assert router.expert_of_token_V.tolist() == reference_hash_table(
        TINY_MODEL["vocab_size"], NUM_EXPERTS, 11
    )
    assert router.expert_of_token_V.tolist() != [
        i % NUM_EXPERTS for i in range(TINY_MODEL["vocab_size"])
    ]
    with pytest.raises(ConfigError, match="hash_type must be one of mod, random_permutation"):
        hash_router_builder(TINY_MODEL["vocab_size"], 0, "balanced")


def test_the_table_follows_the_seed_and_is_not_saved():
    router = hash_router(seed=11, hash_type="random_permutation")
    assert router.expert_of_token_V.tolist() == reference_hash_table(
        TINY_MODEL["vocab_size"], NUM_EXPERTS, 11
    )
    assert "expert_of_token_V" not in router.state_dict()
    assert not router.weight.requires_grad  # the unused gate stays out of the optimizer


def test_a_tiny_gpt_model_trains_one_step(single_rank):
    model = build_gpt(hash_router_builder(TINY_MODEL["vocab_size"]))
    handles = feed_token_ids(model)
    routers = [m for m in model.modules() if isinstance(m, HashRouter)]
    assert len(routers) == 2 and len(handles) == 1
    outputs = {}
    for router in routers:
        router.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out))
    tokens, positions, labels = batch(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)

    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    routing_map = expected_map(tokens.t())  # input_ids [b, s] -> [s, b] order
    for router in routers:
        probs, router_map = outputs[router]
        assert torch.equal(router_map, routing_map) and torch.equal(probs, routing_map.float())
        assert router.weight.grad is None
    tokens_per_expert = routing_map.sum(0)
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        for expert, count in zip(layer.experts.local_experts, tokens_per_expert):
            grad = sum(p.grad.abs().sum() for p in expert.parameters() if p.grad is not None)
            assert (grad > 0) == (count > 0)
    assert (tokens_per_expert > 0).sum() >= NUM_EXPERTS - 1  # the check above saw real work

    optimizer.step()
    outputs.clear()
    with torch.no_grad():  # input_ids as a keyword reaches the routers too
        next_loss = model(
            input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels
        ).mean()
    assert torch.isfinite(next_loss) and next_loss < loss
    assert all(torch.equal(outputs[router][1], routing_map) for router in routers)


def test_without_feed_token_ids_the_router_says_what_to_call(single_rank):
    model = build_gpt(hash_router_builder(TINY_MODEL["vocab_size"]))
    tokens, positions, _ = batch(0)
    with pytest.raises(
        RuntimeError,
        match=r"call "
        r"remoe_patches\.model\.routers\.hash_router\.feed_token_ids",
    ):
        model(tokens, positions, None)


def test_ids_that_do_not_match_the_hidden_states_are_refused():
    router = hash_router()
    router.token_ids_BS = torch.zeros(3, 16, dtype=torch.long)
    expected = r"\[s, b\] = \[16, 3\] .* do not match the hidden states' \[s, b\] = \[16, 2\]"
    with pytest.raises(ValueError, match=expected):
        router(torch.zeros(16, 2, 32))
    with pytest.raises(ValueError, match="do not match"):
        router(torch.zeros(3, 16, 32))  # [b, s, h]: the ids are transposed, the states not


def test_sequence_parallel_routers_take_their_ranks_slice():
    """TP=2 with sequence parallelism, on fake groups: rank r routes positions [8r, 8r+8) of
    the 16, so its routing map is that of those ids."""
    config = transformer_config()
    config.sequence_parallel = True
    token_ids_BS = torch.randint(
        0, TINY_MODEL["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(1)
    )
    for rank in range(2):
        router = hash_router(config, fake_groups(rank, 2), hash_type="random_permutation")
        router.token_ids_BS = token_ids_BS
        _, routing_map = router(torch.zeros(8, 3, 32))
        assert torch.equal(
            routing_map,
            expected_map(token_ids_BS.t()[8 * rank : 8 * rank + 8], hash_type="random_permutation"),
        )


def test_topk_other_than_one_is_refused():
    with pytest.raises(ConfigError, match="moe_router_topk=2.*set topk=1"):
        hash_router(transformer_config(topk=2))


@pytest.mark.parametrize(
    "vocab_size, seed, field", [(0, 0, "vocab_size"), (12.5, 0, "vocab_size"), (128, "a", "seed")]
)
def test_builder_validates_its_arguments(vocab_size, seed, field):
    with pytest.raises(ConfigError, match=f"hash_router_builder: {field}"):
        hash_router_builder(vocab_size, seed)


def test_feed_token_ids_needs_a_gpt_model():
    with pytest.raises(ValueError, match="contains no megatron GPTModel"):
        feed_token_ids(torch.nn.Linear(2, 2))
