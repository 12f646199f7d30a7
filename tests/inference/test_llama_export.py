"""The Llama layout of a dense model (``remoe_patches/inference/llama_export.py``).

transformers' own ``LlamaForCausalLM``, given the split and renamed weights, computes the
reference model's logits (the reference model equals megatron's, ``test_export.py``), with
weights drawn large (std 0.3) so that attention is far from uniform and a wrong rotary layout
shows; the same weights permuted as HF's conversion of Meta's interleaved-rotary checkpoints does
give other logits, so no permutation is the right one. The split is also checked row by row
against megatron's fused layout, and mapping back gives the weights exactly.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from remoe_patches.inference.llama_export import (
    llama_config,
    llama_state,
    reference_config_from_llama,
    reference_state_from_llama,
)
from remoe_patches.inference.reference_model import GPT, GPTConfig

HEADS, GROUPS, HEAD_DIM, FFN = 4, 2, 16, 96
CONFIG = GPTConfig(
    vocab_size=96,
    num_layers=2,
    hidden_size=HEADS * HEAD_DIM,
    num_attention_heads=HEADS,
    num_query_groups=GROUPS,
    head_dim=HEAD_DIM,
    seq_length=24,
    rotary_base=10000.0,
    norm_epsilon=1e-5,
    router="dense",
    ffn_hidden_size=FFN,
)


def reference_model(seed=0) -> GPT:
    model = GPT(CONFIG).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "layernorm" in name else 0.3 * noise)
    return model


def transformers_llama(state: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(llama_config(asdict(CONFIG), "float32"))
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def tokens(seed=1):
    return torch.randint(
        0, CONFIG.vocab_size, (3, CONFIG.seq_length), generator=torch.Generator().manual_seed(seed)
    )


def test_transformers_llama_computes_the_reference_logits():
    reference = reference_model()
    llama = transformers_llama(llama_state(dict(reference.state_dict()), asdict(CONFIG)))
    assert (
        llama.config.num_key_value_heads,
        llama.config.head_dim,
        llama.config.rope_parameters["rope_theta"],
    ) == (GROUPS, HEAD_DIM, 10000.0)
    x = tokens()
    with torch.no_grad():
        expected, got = reference(x), llama(x).logits
    scale = float(expected.abs().max())
    assert float(expected.std()) > 1.0  # far from the near-uniform logits of a fresh init
    assert float((got - expected).abs().max()) <= 1e-5 * scale


def test_a_rotary_permutation_would_change_the_logits():
    # HF's convert_llama_weights_to_hf permutes Meta's query/key rows (interleaved pairs to
    # halves); megatron already rotates halves, so that permutation must not be applied
    def permute(w, heads):
        return w.view(heads, HEAD_DIM // 2, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)

    reference = reference_model()
    state = llama_state(dict(reference.state_dict()), asdict(CONFIG))
    for layer in range(CONFIG.num_layers):
        for proj, heads in (("q_proj", HEADS), ("k_proj", GROUPS)):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            state[name] = permute(state[name], heads)
    x = tokens()
    with torch.no_grad():
        expected, got = reference(x), transformers_llama(state)(x).logits
    assert float((got - expected).abs().max()) > 0.5 * float(expected.abs().max())


def test_the_split_follows_megatrons_fused_rows_and_maps_back_exactly():
    reference_state = dict(reference_model().state_dict())
    state = llama_state(reference_state, asdict(CONFIG))
    qkv = reference_state["decoder.layers.1.self_attention.linear_qkv.weight"]
    per_group = HEADS // GROUPS
    block = (per_group + 2) * HEAD_DIM  # megatron: per group, its query heads, then k, then v

    def rows(tensor, index):
        return tensor[index * HEAD_DIM : (index + 1) * HEAD_DIM]

    for head in range(HEADS):
        group, within = divmod(head, per_group)
        assert torch.equal(
            rows(state["model.layers.1.self_attn.q_proj.weight"], head),
            rows(qkv[group * block :], within),
        )
    for group in range(GROUPS):
        assert torch.equal(
            rows(state["model.layers.1.self_attn.k_proj.weight"], group),
            rows(qkv[group * block :], per_group),
        )
        assert torch.equal(
            rows(state["model.layers.1.self_attn.v_proj.weight"], group),
            rows(qkv[group * block :], per_group + 1),
        )
    fc1 = reference_state["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(state["model.layers.0.mlp.gate_proj.weight"], fc1[:FFN])
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], fc1[FFN:])
    assert torch.equal(
        state["model.layers.0.post_attention_layernorm.weight"],
        reference_state["decoder.layers.0.pre_mlp_layernorm.weight"],
    )
    assert torch.equal(state["lm_head.weight"], reference_state["output_layer.weight"])

    back = reference_state_from_llama(state, asdict(CONFIG))
    assert sorted(back) == sorted(reference_state)
    assert all(torch.equal(back[name], value) for name, value in reference_state.items())
    assert (
        GPTConfig.from_dict(reference_config_from_llama(llama_config(asdict(CONFIG), "bfloat16")))
        == CONFIG
    )


def test_a_weight_without_a_llama_place_is_named():
    state = dict(reference_model().state_dict())
    state["decoder.layers.0.mlp.router.weight"] = torch.zeros(8, HEADS * HEAD_DIM)
    with pytest.raises(
        ValueError,
        match=r"^decoder\.layers\.0\.mlp\.router\.weight has no place "
        r"in LlamaForCausalLM",
    ):
        llama_state(state, asdict(CONFIG))
