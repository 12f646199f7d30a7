"""``LoryMLP`` in megatron-core: the layer against the independent computation of ``test_lory``,
a tiny GPTModel built with ``lory_block_spec`` (causal end to end, trains a step, as many
parameters as the TopK MoE it replaces), the refused
settings, and a dist_checkpointing save and load that reproduces the model's output."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer

from remoe_patches.config.model_config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.model.routers.lory_layer import LoryMLP, lory_block_spec
from remoe_patches.model.build import decoder_block_spec
from routing_references import reference_lory
from tiny import TINY_MODEL, batch

SEGMENT = 4  # TINY_MODEL's 16-token sequences in 4 segments


def tiny_config(**overrides):
    return ModelConfig(router="topk", moe_aux_loss_coeff=0.0, **TINY_MODEL).transformer_config(
        ParallelConfig(), **overrides
    )


def lory_gpt(first_segment="own_detached"):
    config = tiny_config()
    spec = lory_block_spec(decoder_block_spec(config), SEGMENT, first_segment)
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


def logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    return model(tokens, positions, None)


@pytest.mark.parametrize("first_segment", ["own_detached", "uniform"])
def test_layer_is_the_merged_ffn_of_its_parameters(single_rank, first_segment):
    config = tiny_config()
    layer = LoryMLP(config, segment_length=SEGMENT, first_segment=first_segment)
    experts, hidden, width = 8, TINY_MODEL["hidden_size"], config.moe_ffn_hidden_size
    assert layer.router_weight.shape == (experts, hidden)
    assert layer.fc1_weight.shape == (experts, hidden, 2 * width)
    assert layer.fc2_weight.shape == (experts, width, hidden)
    # megatron's initialisation: std 0.01, the output matrix scaled by 1/sqrt(2 * layers)
    std = config.init_method_std
    assert layer.fc1_weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.router_weight.std().item() == pytest.approx(std, rel=0.1)
    assert layer.fc2_weight.std().item() == pytest.approx(
        std / math.sqrt(2 * TINY_MODEL["num_layers"]), rel=0.05
    )
    gen = torch.Generator().manual_seed(0)
    hidden_SBh = torch.randn(TINY_MODEL["seq_length"], 3, hidden, generator=gen)
    # Weights far from the tiny init, so that routing and merging matter in the comparison.
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.3, generator=gen)
    output, bias = layer(hidden_SBh)
    assert bias is None and output.shape == hidden_SBh.shape
    expected = reference_lory(
        hidden_SBh.double(),
        layer.router_weight.double(),
        layer.fc1_weight.double(),
        layer.fc2_weight.double(),
        SEGMENT,
        first_segment,
    )
    np.testing.assert_allclose(output.detach().numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first_segment", ["own_detached", "uniform"])
def test_gpt_with_lory_layers_trains_a_step(single_rank, first_segment):
    torch.manual_seed(0)
    model = lory_gpt(first_segment)
    layers = model.decoder.layers
    assert [type(layer.mlp) for layer in layers] == [LoryMLP] * TINY_MODEL["num_layers"]
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert all(layer.mlp.layer_number == i + 1 for i, layer in enumerate(layers))
    # Same parameters as the TopK MoE it replaces: an [E, h] router and E SwiGLU experts.
    topk_moe = ModelConfig(router="topk", moe_aux_loss_coeff=0.0, **TINY_MODEL)
    assert sum(p.numel() for p in model.parameters()) == topk_moe.num_parameters()
    tokens, positions, labels = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for layer in layers:
        for e in range(8):
            assert layer.mlp.fc1_weight.grad[e].abs().sum() > 0, f"expert {e} has no gradient"
    optimizer.step()
    with torch.no_grad():
        assert model(tokens, positions, None, labels=labels).mean() < loss


@pytest.mark.parametrize("first_segment", ["own_detached", "uniform"])
def test_no_logit_depends_on_a_later_token(single_rank, first_segment):
    torch.manual_seed(1)
    model = lory_gpt(first_segment).eval()
    tokens = batch()[0]
    with torch.no_grad():
        reference = logits(model, tokens)
        for t in (1, SEGMENT - 1, SEGMENT, 2 * SEGMENT + 1, TINY_MODEL["seq_length"] - 1):
            changed = tokens.clone()
            changed[:, t:] = (changed[:, t:] + 1) % TINY_MODEL["vocab_size"]
            earlier_unchanged = torch.allclose(
                logits(model, changed)[:, :t], reference[:, :t], rtol=0, atol=1e-6
            )
            # Lory's first segment is merged by its own mean (stop-gradient, as the paper).
            assert earlier_unchanged == (first_segment == "uniform" or t >= SEGMENT), t


REFUSED = [
    ("tensor_model_parallel_size", 2),
    ("sequence_parallel", True),
    ("expert_model_parallel_size", 2),
    ("expert_tensor_parallel_size", 2),
    ("context_parallel_size", 2),
    ("mlp_chunks_for_prefill", 2),
    ("add_bias_linear", True),
    ("gated_linear_unit", False),
    ("activation_func", F.gelu),
    ("num_moe_experts", None),
    ("moe_ffn_hidden_size", None),
]


@pytest.mark.parametrize("field, value", REFUSED)
def test_unsupported_settings_are_refused_by_name(single_rank, field, value):
    config = copy.copy(tiny_config())
    # Set after construction: megatron's own checks would refuse some of these first.
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=f"TransformerConfig.{field}"):
        LoryMLP(config, segment_length=SEGMENT)


def test_a_sequence_ending_in_a_short_segment(single_rank):
    """Evaluation and generation feed sequences of any length. Strictly causal routing
    (``uniform``): the outputs of a sequence cut anywhere are the first outputs of the whole
    one. Lory's own rule: a sequence shorter than a segment is routed by its own mean, as a
    layer whose segments are exactly that long routes it."""
    torch.manual_seed(3)
    hidden = torch.randn(16, 2, TINY_MODEL["hidden_size"])
    causal = LoryMLP(tiny_config(), segment_length=5, first_segment="uniform")
    whole, _ = causal(hidden)
    for cut in (3, 5, 7, 11):
        part, _ = causal(hidden[:cut])
        torch.testing.assert_close(part, whole[:cut])
    paper = LoryMLP(tiny_config(), segment_length=8)
    exact = LoryMLP(tiny_config(), segment_length=6)
    exact.load_state_dict(paper.state_dict())
    torch.testing.assert_close(paper(hidden[:6])[0], exact(hidden[:6])[0])
    assert not torch.allclose(paper(hidden[:6])[0], paper(hidden[:8])[0][:6])


def test_bad_segment_settings_are_refused(single_rank):
    spec = decoder_block_spec(tiny_config())
    with pytest.raises(ConfigError, match="segment_length=0"):
        lory_block_spec(spec, 0)
    with pytest.raises(ConfigError, match="first_segment='last'"):
        lory_block_spec(spec, SEGMENT, "last")


def test_dist_checkpoint_round_trip_reproduces_the_output(single_rank, tmp_path):
    torch.manual_seed(2)
    saved = lory_gpt().eval()
    tokens = batch()[0]
    with torch.no_grad():
        expected = logits(saved, tokens)
    sharded = saved.sharded_state_dict()
    for layer in range(TINY_MODEL["num_layers"]):
        for name in ("router_weight", "fc1_weight", "fc2_weight"):
            assert f"decoder.layers.{layer}.mlp.{name}" in sharded
    dist_checkpointing.save(sharded, str(tmp_path))

    torch.manual_seed(3)
    loaded = lory_gpt().eval()
    with torch.no_grad():
        assert not torch.allclose(logits(loaded, tokens), expected)
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(logits(loaded, tokens), expected)


# --- Lory's dense warm-up ---------------------------------------------------------------------


def test_dense_warmup_is_expert_0s_ffn_then_every_expert_starts_as_its_copy(single_rank):
    """During the warm-up a LoryMLP is the SwiGLU FFN of expert 0 (the merged FFN of routing
    weights one-hot on expert 0), every parameter gets a gradient (zero but for expert 0's);
    after ``start_experts_from_the_dense_ffn`` every expert is expert 0 and the model computes
    what the dense model did (the merged weights sum to the FFN), and routing is back on."""
    from remoe_patches.routing import lory
    from remoe_patches.model.routers.lory_layer import (
        dense_warmup_steps,
        lory_layers,
        set_dense_warmup,
        start_experts_from_the_dense_ffn,
    )

    torch.manual_seed(2)
    model = lory_gpt()
    layers = lory_layers(model)
    assert len(layers) == TINY_MODEL["num_layers"] and not any(m.dense_warmup for m in layers)
    set_dense_warmup(model, True)
    tokens, positions, labels = batch()
    inputs = {}
    for layer in layers:
        layer.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, (args[0], out[0])))
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    for layer in layers:
        hidden, output = inputs[layer]
        one_hot = torch.zeros(hidden.shape[1], 1, 8)
        one_hot[..., 0] = 1.0
        merged = lory.merged_swiglu_ffn(
            hidden, one_hot.expand(-1, 1, -1), layer.fc1_weight, layer.fc2_weight
        )
        torch.testing.assert_close(output, merged)
        assert layer.router_weight.grad is not None and not layer.router_weight.grad.any()
        for weight in (layer.fc1_weight, layer.fc2_weight):
            assert weight.grad[0].abs().sum() > 0 and not weight.grad[1:].any()
    model.eval()
    with torch.no_grad():
        dense_logits = logits(model, tokens)
        assert not torch.equal(layers[0].fc1_weight[1], layers[0].fc1_weight[0])
        start_experts_from_the_dense_ffn(model)
        for layer in layers:
            assert not layer.dense_warmup
            for weight in (layer.fc1_weight, layer.fc2_weight):
                assert all(torch.equal(weight[e], weight[0]) for e in range(8))
        torch.testing.assert_close(logits(model, tokens), dense_logits, rtol=1e-5, atol=1e-5)
    assert dense_warmup_steps(0.05, 60000) == 3000 and dense_warmup_steps(0.0, 100) == 0


@pytest.mark.parametrize("extra", [[], ["--bf16"], ["--bf16", "--use-distributed-optimizer"]])
def test_the_optimizer_follows_the_experts_copied_from_the_dense_ffn(single_rank, extra):
    """With megatron's optimizers (fp32; bf16 with fp32 main copies; the distributed one): after
    the copy the next step starts every expert from expert 0's weights, not from the main
    parameters' old random experts; whole-tensor Adam moments are copied too."""
    from remoe_patches.model.routers.lory_layer import (
        lory_layers,
        set_dense_warmup,
        start_experts_from_the_dense_ffn,
    )
    from remoe_patches.train.training_step import train_step
    from tiny_training import make_batch, step_kwargs, training_objects

    config, objects = training_objects(
        "dense",
        "--num-experts",
        "8",
        "--moe-router-topk",
        "1",
        "--moe-router-type",
        "lory",
        "--moe-lory-segment-length",
        "4",
        "--lr",
        "1e-4",
        *extra,
    )
    assert config.model.router_options.dense_warmup_fraction == 0.05  # the paper's default
    chunks, optimizer = objects.model_chunks, objects.optimizer
    set_dense_warmup(chunks, True)

    def run(seed):
        return train_step(
            chunks,
            optimizer,
            objects.scheduler,
            objects.regularizer,
            [make_batch(seed), make_batch(seed + 1)],
            **step_kwargs(config),
        )

    assert not run(1).skipped
    layers = lory_layers(chunks)
    spread = max(
        float((w[1:] - w[:1]).abs().max())
        for layer in layers
        for w in (layer.fc1_weight, layer.fc2_weight)
    )
    assert spread > 1e-2  # independent random experts before the copy
    start_experts_from_the_dense_ffn(chunks, optimizer)
    if "--use-distributed-optimizer" not in extra:
        inner = (
            optimizer.chained_optimizers[0]
            if hasattr(optimizer, "chained_optimizers")
            else optimizer
        )
        main_of = {
            id(p): q
            for g, h in zip(
                getattr(inner, "float16_groups", []), getattr(inner, "fp32_from_float16_groups", [])
            )
            for p, q in zip(g, h)
        }
        for layer in layers:
            for weight in (layer.fc1_weight, layer.fc2_weight):
                main = main_of.get(id(weight), weight)
                assert all(torch.equal(main[e], main[0]) for e in range(8))
                moments = [
                    v
                    for v in inner.optimizer.state[main].values()
                    if torch.is_tensor(v) and v.shape == weight.shape
                ]
                assert len(moments) == 2
                assert all(torch.equal(m[e], m[0]) for m in moments for e in range(8))
    record = run(3)
    assert not record.skipped and torch.isfinite(record.lm_loss)
    after = max(
        float((w[1:] - w[:1]).abs().max())
        for layer in layers
        for w in (layer.fc1_weight, layer.fc2_weight)
    )
    assert after < 2e-3, after  # one small step apart, not the old random experts
