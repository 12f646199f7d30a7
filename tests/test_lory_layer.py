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

from remoe_patches.config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.lory_layer import LoryMLP, lory_block_spec
from remoe_patches.model import decoder_block_spec
from test_lory import reference_lory
from test_model import TINY, batch

SEGMENT = 4  # TINY's 16-token sequences in 4 segments


def tiny_config(**overrides):
    return ModelConfig(router="topk", moe_aux_loss_coeff=0.0, **TINY).transformer_config(
        ParallelConfig(), **overrides
    )


def lory_gpt(first_segment="own_detached"):
    config = tiny_config()
    spec = lory_block_spec(decoder_block_spec(config), SEGMENT, first_segment)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=TINY["vocab_size"],
        max_sequence_length=TINY["seq_length"], pre_process=True, post_process=True,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
    )


def logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    return model(tokens, positions, None)


@pytest.mark.parametrize("first_segment", ["own_detached", "uniform"])
def test_layer_is_the_merged_ffn_of_its_parameters(single_rank, first_segment):
    config = tiny_config()
    layer = LoryMLP(config, segment_length=SEGMENT, first_segment=first_segment)
    experts, hidden, width = 8, TINY["hidden_size"], config.moe_ffn_hidden_size
    assert layer.router_weight.shape == (experts, hidden)
    assert layer.fc1_weight.shape == (experts, hidden, 2 * width)
    assert layer.fc2_weight.shape == (experts, width, hidden)
    # megatron's initialisation: std 0.01, the output matrix scaled by 1/sqrt(2 * layers)
    std = config.init_method_std
    assert layer.fc1_weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.router_weight.std().item() == pytest.approx(std, rel=0.1)
    assert layer.fc2_weight.std().item() == pytest.approx(
        std / math.sqrt(2 * TINY["num_layers"]), rel=0.05)
    gen = torch.Generator().manual_seed(0)
    hidden_SBh = torch.randn(TINY["seq_length"], 3, hidden, generator=gen)
    # Weights far from the tiny init, so that routing and merging matter in the comparison.
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.3, generator=gen)
    output, bias = layer(hidden_SBh)
    assert bias is None and output.shape == hidden_SBh.shape
    expected = reference_lory(hidden_SBh.double(), layer.router_weight.double(),
                              layer.fc1_weight.double(), layer.fc2_weight.double(), SEGMENT,
                              first_segment)
    np.testing.assert_allclose(output.detach().numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first_segment", ["own_detached", "uniform"])
def test_gpt_with_lory_layers_trains_a_step(single_rank, first_segment):
    torch.manual_seed(0)
    model = lory_gpt(first_segment)
    layers = model.decoder.layers
    assert [type(layer.mlp) for layer in layers] == [LoryMLP] * TINY["num_layers"]
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert all(layer.mlp.layer_number == i + 1 for i, layer in enumerate(layers))
    # Same parameters as the TopK MoE it replaces: an [E, h] router and E SwiGLU experts.
    topk_moe = ModelConfig(router="topk", moe_aux_loss_coeff=0.0, **TINY)
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
        for t in (1, SEGMENT - 1, SEGMENT, 2 * SEGMENT + 1, TINY["seq_length"] - 1):
            changed = tokens.clone()
            changed[:, t:] = (changed[:, t:] + 1) % TINY["vocab_size"]
            earlier_unchanged = torch.allclose(logits(model, changed)[:, :t], reference[:, :t],
                                               rtol=0, atol=1e-6)
            # Lory's first segment is merged by its own mean (stop-gradient, as the paper).
            assert earlier_unchanged == (first_segment == "uniform" or t >= SEGMENT), t


REFUSED = [
    ("tensor_model_parallel_size", 2), ("sequence_parallel", True),
    ("expert_model_parallel_size", 2), ("expert_tensor_parallel_size", 2),
    ("context_parallel_size", 2), ("mlp_chunks_for_prefill", 2), ("add_bias_linear", True),
    ("gated_linear_unit", False), ("activation_func", F.gelu), ("num_moe_experts", None),
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
    hidden = torch.randn(16, 2, TINY["hidden_size"])
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
    for layer in range(TINY["num_layers"]):
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
