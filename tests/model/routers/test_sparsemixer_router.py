"""``SparseMixerRouter`` in megatron-core: the router weights get GRIN's estimator (and, when on,
megatron's Switch aux loss counting the sampled experts), the outputs keep the dispatchers'
contract, settings it cannot honour are refused by name, and a tiny GPTModel trains with it and
routes deterministically in evaluation."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from remoe_patches.config.model_config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.model.build import customize_layers, decoder_block_spec
from remoe_patches.routing.sparsemixer import sparsemixer_v2
from remoe_patches.model.routers.sparsemixer_router import (
    SparseMixerRouter,
    check_config,
    sparsemixer_router_builder,
)

from routing_references import kept_experts, masked_softmax
from tiny import NUM_EXPERTS, TINY_MODEL, batch

HIDDEN = TINY_MODEL["hidden_size"]


def transformer_config(topk=1, moe_aux_loss_coeff=0.0, **overrides):
    """TINY_MODEL's TransformerConfig with a TopK MoE layout (the router slot is replaced)."""
    return ModelConfig(
        router="topk", topk=topk, moe_aux_loss_coeff=moe_aux_loss_coeff, **TINY_MODEL
    ).transformer_config(ParallelConfig(), **overrides)


def one_rank_groups():
    """A pg_collection whose groups answer rank() and size() of one rank: all a Router needs."""
    group = SimpleNamespace(rank=lambda: 0, size=lambda: 1)
    return SimpleNamespace(tp=group, cp=group, tp_cp=group, tp_dp_cp=group)


def router_and_input(topk=1, jitter_eps=0.01, **config_overrides):
    """A router whose logits are 1 plus a small spread, so several experts share the jitter band
    (at init megatron's logits are ~0.05 wide around 0 and most tokens keep one expert).
    Its forward needs the ``single_rank`` fixture (megatron's gating on CPU)."""
    config = transformer_config(topk=topk, **config_overrides)
    router = sparsemixer_router_builder(jitter_eps)(
        config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.002, generator=gen)
        router.weight[:, 0] = 1.0
    hidden_SBH = torch.randn(4, 3, HIDDEN, generator=gen)
    hidden_SBH[..., 0] = 1.0
    return router, hidden_SBH


def expected_logit_gradient(logits_TE, experts, upstream_TE, eps):
    """GRIN's estimator by loops: for each pick ``z`` of ``experts[t]`` (in pass order; pass 2
    without pass 1's pick), ``upstream[t][z] * pi_z * (1{e = z} - pi_e)`` with ``pi`` the
    masked softmax of that pass."""
    rows = logits_TE.tolist()
    grad = [[0.0] * len(rows[0]) for _ in rows]
    for t, row in enumerate(rows):
        candidates = list(range(len(row)))
        for z in experts[t]:
            pi = masked_softmax(row, kept_experts(row, candidates, eps))
            for e in range(len(row)):
                grad[t][e] += upstream_TE[t][z] * pi[z] * ((1.0 if e == z else 0.0) - pi[e])
            candidates.remove(z)
    return torch.tensor(grad, dtype=torch.float64)


def routed_pass_order(router, hidden_SBH, seed):
    """The picks per token in pass order, from the pure routing function under the same draws
    (the routing map alone does not say which pick came first)."""
    logits_TE = hidden_SBH.view(-1, HIDDEN) @ router.weight.detach().t()
    torch.manual_seed(seed)
    _, experts_TK = sparsemixer_v2(
        logits_TE, topk=router.topk, jitter_eps=router.jitter_eps, training=True
    )
    return experts_TK.tolist()


# ----- builder and refusals ---------------------------------------------------------------------


def test_builder_is_a_partial_with_jitter_eps():
    builder = sparsemixer_router_builder()
    assert isinstance(builder, functools.partial) and builder.func is SparseMixerRouter
    assert builder.keywords == {"jitter_eps": 0.01}
    router = sparsemixer_router_builder(0.05)(
        config=transformer_config(), pg_collection=one_rank_groups()
    )
    assert router.jitter_eps == 0.05 and router.topk == 1


@pytest.mark.parametrize("jitter_eps", [0.0, -0.01, float("inf"), "0.01", None])
def test_builder_refuses_a_bad_jitter_eps_by_name(jitter_eps):
    with pytest.raises(ConfigError, match="jitter_eps="):
        sparsemixer_router_builder(jitter_eps)


@pytest.mark.parametrize(
    "field, value",
    [
        ("moe_router_topk", 3),
        ("moe_router_load_balancing_type", "sinkhorn"),
        ("moe_router_load_balancing_type", ["aux_loss", "sinkhorn"]),
        ("moe_router_score_function", "sigmoid"),
        ("moe_router_enable_expert_bias", True),
        ("moe_router_num_groups", 2),
        ("moe_router_group_topk", 1),
        ("moe_router_topk_scaling_factor", 2.0),
        ("moe_expert_capacity_factor", 1.0),
        ("moe_enable_routing_replay", True),
        ("moe_router_force_load_balancing", True),
    ],
)
def test_settings_it_cannot_honour_are_refused_by_field(field, value):
    config = copy.copy(transformer_config())  # set after validation: megatron checks some itself
    check_config(config)
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=f"TransformerConfig.{field}="):
        SparseMixerRouter(config, one_rank_groups())


def test_padding_masks_are_refused(single_rank):
    router, hidden_SBH = router_and_input()
    with pytest.raises(NotImplementedError, match="padding"):
        router(hidden_SBH, padding_mask=torch.zeros(3, 4, dtype=torch.bool))


# ----- (c) the dispatchers' contract ------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2])
def test_probs_and_routing_map_contract(single_rank, topk):
    router, hidden_SBH = router_and_input(topk)
    torch.manual_seed(3)
    probs_TE, routing_map_TE = router(hidden_SBH)
    assert probs_TE.shape == routing_map_TE.shape == (12, NUM_EXPERTS)
    assert probs_TE.dtype == torch.float32 and routing_map_TE.dtype == torch.bool
    assert torch.all(routing_map_TE.sum(-1) == topk)
    assert torch.all(probs_TE[~routing_map_TE] == 0) and torch.all(probs_TE[routing_map_TE] > 0)
    if topk == 1:  # sampled: some token is not sent to its largest logit
        logits_TE = hidden_SBH.view(-1, HIDDEN) @ router.weight.detach().t()
        assert not torch.equal(routing_map_TE.int().argmax(-1), logits_TE.argmax(-1))


# ----- (b) the router-weight gradient -----------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2])
def test_router_weight_gradient_is_the_sparsemixer_v2_estimator(single_rank, topk):
    router, hidden_SBH = router_and_input(topk)
    upstream_TE = torch.randn(12, NUM_EXPERTS, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(4)
    probs_TE, routing_map_TE = router(hidden_SBH)
    (probs_TE * upstream_TE).sum().backward()

    hidden_TH = hidden_SBH.view(-1, HIDDEN).double()
    logits_TE = hidden_TH @ router.weight.detach().double().t()
    experts = routed_pass_order(router, hidden_SBH, seed=4)
    assert [sorted(picks) for picks in experts] == [
        sorted(row.nonzero().flatten().tolist()) for row in routing_map_TE
    ]
    grad_logits_TE = expected_logit_gradient(
        logits_TE, experts, upstream_TE.tolist(), router.jitter_eps
    )
    torch.testing.assert_close(
        router.weight.grad.double(), grad_logits_TE.t() @ hidden_TH, rtol=1e-4, atol=1e-6
    )
    # The case covers samples off the argmax and tokens with several experts in the band.
    assert (torch.tensor([picks[0] for picks in experts]) != logits_TE.argmax(-1)).any()
    assert router.weight.grad.abs().sum() > 0

    # TopK's straight gradient (the same picks' gates in the full softmax) is another one.
    straight_logits_TE = logits_TE.clone().requires_grad_()
    straight_probs_TE = torch.softmax(straight_logits_TE, -1) * routing_map_TE
    (straight_probs_TE * upstream_TE.double()).sum().backward()
    straight_grad_HE = straight_logits_TE.grad.t() @ hidden_TH
    assert not torch.allclose(router.weight.grad.double(), straight_grad_HE, atol=1e-3)


def test_aux_loss_is_megatrons_switch_loss_over_the_sampled_experts(single_rank):
    """``coeff E / (k T^2) sum_i count_i sum_t softmax(logits)_ti`` with ``count_i`` the SAMPLED
    picks: its gradient adds to the estimator's, and TopK's argmax counts would differ."""
    coeff, seed = 0.3, 4
    router, hidden_SBH = router_and_input(moe_aux_loss_coeff=coeff)
    assert router.config.moe_router_load_balancing_type == "aux_loss"
    upstream_TE = torch.randn(12, NUM_EXPERTS, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(seed)
    probs_TE, routing_map_TE = router(hidden_SBH)
    (probs_TE * upstream_TE).sum().backward()

    hidden_TH = hidden_SBH.view(-1, HIDDEN).double()
    logits_TE = hidden_TH @ router.weight.detach().double().t()
    experts = routed_pass_order(router, hidden_SBH, seed)
    estimator_TE = expected_logit_gradient(
        logits_TE, experts, upstream_TE.tolist(), router.jitter_eps
    )

    def aux_gradient(counts_E):
        aux_logits_TE = logits_TE.clone().requires_grad_()
        scores_TE = torch.softmax(aux_logits_TE, -1)
        num_tokens = logits_TE.shape[0]
        aux = coeff * NUM_EXPERTS / num_tokens**2 * (scores_TE.sum(0) * counts_E).sum()
        aux.backward()
        return aux_logits_TE.grad

    sampled_counts_E = torch.bincount(
        torch.tensor([p[0] for p in experts]), minlength=NUM_EXPERTS
    ).double()
    argmax_counts_E = torch.bincount(logits_TE.argmax(-1), minlength=NUM_EXPERTS).double()
    assert not torch.equal(sampled_counts_E, argmax_counts_E)
    expected_HE = (estimator_TE + aux_gradient(sampled_counts_E)).t() @ hidden_TH
    torch.testing.assert_close(router.weight.grad.double(), expected_HE, rtol=1e-4, atol=1e-6)
    topk_counted_HE = (estimator_TE + aux_gradient(argmax_counts_E)).t() @ hidden_TH
    assert not torch.allclose(router.weight.grad.double(), topk_counted_HE, rtol=1e-3, atol=1e-5)


def test_evaluation_routes_to_the_argmax_whatever_the_rng(single_rank):
    router, hidden_SBH = router_and_input()
    router.eval()
    torch.manual_seed(0)
    probs_TE, routing_map_TE = router(hidden_SBH)
    torch.manual_seed(1)
    other_probs_TE, other_map_TE = router(hidden_SBH)
    assert torch.equal(routing_map_TE, other_map_TE) and torch.equal(probs_TE, other_probs_TE)
    logits_TE = (hidden_SBH.view(-1, HIDDEN) @ router.weight.detach().t()).double()
    assert torch.equal(routing_map_TE.int().argmax(-1), logits_TE.argmax(-1))
    for t, row in enumerate(logits_TE.tolist()):
        z = max(range(NUM_EXPERTS), key=lambda e: row[e])
        pi = masked_softmax(row, kept_experts(row, range(NUM_EXPERTS), router.jitter_eps))
        assert probs_TE[t, z].item() == pytest.approx(pi[z], rel=1e-5)


# ----- (d) a tiny GPTModel -------------------------------------------------------------------


def build_gpt(topk, jitter_eps, moe_aux_loss_coeff):
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    config = transformer_config(topk=topk, moe_aux_loss_coeff=moe_aux_loss_coeff)
    spec = customize_layers(
        decoder_block_spec(config), router_builder=sparsemixer_router_builder(jitter_eps)
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=TINY_MODEL["vocab_size"],
        max_sequence_length=TINY_MODEL["seq_length"],
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def routed_forward(model, seed):
    """(output logits, [routing_map_TE per MoE layer], [argmax of the router logits per layer])."""
    maps, argmaxes = [], []

    def hook(router, inputs, outputs):
        maps.append(outputs[1])
        hidden_TH = inputs[0].reshape(-1, HIDDEN)
        argmaxes.append((hidden_TH @ router.weight.t()).argmax(-1))

    routers = [m for m in model.modules() if isinstance(m, SparseMixerRouter)]
    handles = [router.register_forward_hook(hook) for router in routers]
    torch.manual_seed(seed)
    tokens, positions, labels = batch()
    output = model(tokens, positions, None, labels=labels)
    for handle in handles:
        handle.remove()
    return output, maps, argmaxes


@pytest.mark.parametrize(
    "topk, jitter_eps, moe_aux_loss_coeff",
    [
        (1, 0.5, 0.0),  # a wide band: the LM loss alone reaches the router weights
        (2, 0.5, 0.0),
        (1, 0.01, 0.01),  # GRIN's jitter_eps with the Switch aux loss
    ],
)
def test_tiny_gpt_trains_a_step_and_routes_deterministically_in_eval(
    single_rank, topk, jitter_eps, moe_aux_loss_coeff
):
    model = build_gpt(topk, jitter_eps, moe_aux_loss_coeff)
    routers = [m for m in model.modules() if isinstance(m, SparseMixerRouter)]
    assert len(routers) == TINY_MODEL["num_layers"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss, maps, _ = routed_forward(model, seed=0)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.all(m.sum(-1) == topk) for m in maps)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
    before = [r.weight.detach().clone() for r in routers]
    optimizer.step()
    assert all(not torch.equal(b, r.weight) for b, r in zip(before, routers))

    model.eval()
    with torch.no_grad():
        output, maps, argmaxes = routed_forward(model, seed=0)
        other_output, other_maps, _ = routed_forward(model, seed=1)
    assert torch.equal(output, other_output)
    assert all(torch.equal(a, b) for a, b in zip(maps, other_maps))
    assert all(m.gather(-1, a[:, None]).all() for m, a in zip(maps, argmaxes))
