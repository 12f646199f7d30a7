"""A dense model in Hugging Face's Llama layout, so that transformers' own ``LlamaForCausalLM``
runs a dense export without remote code.

The dense model of the paper's recipe *is* the Llama architecture (pre-norm RMSNorm blocks,
rotary embedding, grouped-query attention, SwiGLU MLP, untied output layer, no biases); only the
parameter layout differs. Per layer ``i`` (megatron's names as ``reference_model`` uses them):

    megatron                                     HF Llama (``model.layers.i.`` ...)
    input_layernorm.weight                       input_layernorm.weight
    self_attention.linear_qkv.weight             self_attn.q_proj / k_proj / v_proj.weight
    self_attention.linear_proj.weight            self_attn.o_proj.weight
    pre_mlp_layernorm.weight                     post_attention_layernorm.weight
    mlp.linear_fc1.weight                        mlp.gate_proj / up_proj.weight
    mlp.linear_fc2.weight                        mlp.down_proj.weight

and ``embedding.word_embeddings`` -> ``model.embed_tokens``, ``decoder.final_layernorm`` ->
``model.norm``, ``output_layer`` -> ``lm_head``. ``linear_qkv``'s rows are ``num_query_groups``
blocks, block g = [the query heads of group g, key g, value g]; HF keeps the query heads in
order and query head h reads key/value head ``h // (heads / groups)``, as megatron does.
``linear_fc1`` stacks [gate; up]. No row permutation is needed for RoPE: megatron rotates halves
(``x * cos + rotate_half(x) * sin``, inverse frequencies ``base^(-2i/d)``), as HF Llama does
(HF's conversion of Meta's checkpoints permutes only because Meta's code rotates interleaved
pairs, which the export refuses). ``tests/inference/test_llama_export.py`` checks the logits
numerically.
"""

from __future__ import annotations

import re

import torch

LLAMA_FORMAT = "remoe-hf-llama"

# megatron layer-local name -> HF layer-local name, for the tensors that are only renamed
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


def llama_config(reference: dict, dtype: str) -> dict:
    """config.json's ``LlamaConfig`` fields for a dense model's reference config
    (``hf_export.reference_config``); ``dtype`` is the weights' ``torch_dtype`` name."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": reference["vocab_size"],  # the padded vocabulary: the rows of lm_head
        "hidden_size": reference["hidden_size"],
        "intermediate_size": reference["ffn_hidden_size"],
        "num_hidden_layers": reference["num_layers"],
        "num_attention_heads": reference["num_attention_heads"],
        "num_key_value_heads": reference["num_query_groups"],
        "head_dim": reference["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": reference["seq_length"],
        "rms_norm_eps": reference["norm_epsilon"],
        "rope_theta": reference["rotary_base"],
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def reference_config_from_llama(config: dict) -> dict:
    """The reference model's (``reference_model.GPTConfig``) fields of a Llama config.json."""
    return dict(
        router="dense",
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        seq_length=config["max_position_embeddings"],
        rotary_base=float(config["rope_theta"]),
        norm_epsilon=float(config["rms_norm_eps"]),
        ffn_hidden_size=config["intermediate_size"],
    )


def _qkv_blocks(reference: dict) -> tuple:
    """(groups, query heads per group, head dim)."""
    groups = reference["num_query_groups"]
    return groups, reference["num_attention_heads"] // groups, reference["head_dim"]


def llama_state(state: dict, reference: dict) -> dict:
    """Megatron's dense weights (reference-model names) under HF Llama's names, split."""
    groups, per_group, head_dim = _qkv_blocks(reference)
    out = {}
    for name, value in state.items():
        if name in _GLOBAL_RENAMES:
            out[_GLOBAL_RENAMES[name]] = value
            continue
        match = _LAYER.match(name)
        prefix, local = (f"model.layers.{match.group(1)}.", match.group(2)) if match else ("", "")
        if local == _QKV:
            blocks = value.view(groups, per_group + 2, head_dim, value.shape[-1])
            out[prefix + "self_attn.q_proj.weight"] = (
                blocks[:, :per_group].reshape(groups * per_group * head_dim, -1).contiguous()
            )
            out[prefix + "self_attn.k_proj.weight"] = (
                blocks[:, per_group].reshape(groups * head_dim, -1).contiguous()
            )
            out[prefix + "self_attn.v_proj.weight"] = (
                blocks[:, per_group + 1].reshape(groups * head_dim, -1).contiguous()
            )
        elif local == _FC1:
            gate, up = value.chunk(2, dim=0)
            out[prefix + "mlp.gate_proj.weight"] = gate.contiguous()
            out[prefix + "mlp.up_proj.weight"] = up.contiguous()
        elif local in _LAYER_RENAMES:
            out[prefix + _LAYER_RENAMES[local]] = value
        else:
            # reference_config refuses what the recipe does not build, so only a new weight
            # of the dense recipe itself can get here: it needs its row in the tables above
            raise ValueError(
                f"{name} has no place in LlamaForCausalLM; add it to "
                "remoe_patches/inference/llama_export.py's name tables"
            )
    return out


def reference_state_from_llama(state: dict, reference: dict) -> dict:
    """The inverse of ``llama_state``: HF Llama weights under the reference model's names."""
    groups, per_group, head_dim = _qkv_blocks(reference)
    out = {old: state[new] for old, new in _GLOBAL_RENAMES.items()}
    for layer in range(reference["num_layers"]):
        hf, ours = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for old, new in _LAYER_RENAMES.items():
            out[ours + old] = state[hf + new]
        q, k, v = (state[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv")
        hidden = q.shape[-1]
        out[ours + _QKV] = torch.cat(
            [
                q.view(groups, per_group, head_dim, hidden),
                k.view(groups, 1, head_dim, hidden),
                v.view(groups, 1, head_dim, hidden),
            ],
            dim=1,
        ).reshape(-1, hidden)
        out[ours + _FC1] = torch.cat(
            [state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]]
        )
    return out
