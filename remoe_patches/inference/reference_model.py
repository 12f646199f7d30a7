"""A small, self-contained PyTorch GPT that runs checkpoints exported by
``tools/export_checkpoint.py``.

No megatron import: this file, torch and safetensors are all it needs, so an exported model runs
anywhere PyTorch does. It reproduces the megatron-core model built by ``remoe_patches.model.build``
(the paper's LLaMA recipe) to float32 rounding:

- token embedding, no position embedding, untied output layer, no biases, no dropout;
- pre-norm blocks: ``x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x))``, then a final RMSNorm;
- RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight``;
- rotary position embedding as megatron applies it: inverse frequencies
  ``base^(-2i/d)``, angles repeated as ``[f_0..f_{d/2-1}, f_0..f_{d/2-1}]`` and
  ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` (halves, not
  interleaved pairs), on every query and key head, at each token's position (0..S-1 unpadded);
- grouped-query attention with megatron's fused ``linear_qkv`` layout: the output rows are
  ``num_query_groups`` blocks, block g = [the query heads of group g, key g, value g];
  query head h uses group ``h // (heads / groups)``; causal softmax with scale ``1/sqrt(d)``;
- SwiGLU MLP: ``linear_fc1`` stacks [gate; up], ``fc2(silu(gate) * up)``;
- the MLP of each layer is one of
    * dense: one SwiGLU MLP;
    * TopK MoE (megatron's TopKRouter with softmax scores): ``logits = x W_r^T``; with
      ``pre_softmax`` the softmax over all E experts comes first and the k largest
      probabilities are the gates, otherwise the k largest logits are soft-maxed among
      themselves; gates times ``topk_scaling_factor`` when set;
    * ReLU MoE (ReMoE, Eq. 5): gates ``ReLU(x W_r^T)``, experts with a positive gate are active
      (0..E per token);
  and the output is ``sum_e gate_e * expert_e(x)``.

Parameter names are megatron's (``decoder.layers.0.self_attention.linear_qkv.weight``, ...), so
an export is a plain ``load_state_dict``. ``config.json`` holds the fields of ``GPTConfig``.

**Key/value cache and padding** (``GPT.forward(tokens, attention_mask, cache)``), for decoding:

- ``cache``: a ``KVCache`` (or a transformers ``DynamicCache``: the same ``update`` and
  ``get_seq_length``) holding every layer's keys, after RoPE, and values of the positions seen so
  far. A forward appends its positions, which continue from the cache's length, and attends over
  all of them, so decoding feeds one new token per step. This is exact because every router here
  routes a token by that token alone (dense, TopK, ReLU): a position's output cannot change when
  later tokens arrive. A router that routes a token by the other tokens of its sequence (Expert
  Choice's competition for places, Lory's segment means) would leave cached positions stale; such
  routers are not implemented here, and ``GPT`` refuses them (``ROUTERS``).
- ``attention_mask`` [B, cached + new positions], 1 for a real token and 0 for padding (as
  transformers passes it): padding is masked as a key, and each row's positions count from its
  first real token, so a left-padded row gets the logits it gets alone.

Shapes: B = batch rows, S = positions of this forward, T = all positions (cached + S), H = query
heads, G = key/value groups, d = head dim, D = hidden size, E = experts, V = vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class GPTConfig:
    vocab_size: int  # padded vocabulary (rows of the embedding and of the output layer)
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int  # megatron's kv_channels
    seq_length: int  # the context the model was trained with
    rotary_base: float
    norm_epsilon: float
    router: str  # "dense", "topk" or "relu"
    ffn_hidden_size: int  # dense MLP width
    num_experts: int = 0  # total experts (E * granularity)
    topk: int = 0  # TopK's k (k * granularity); ReLU routing ignores it
    expert_ffn_hidden_size: int = 0  # each expert's width (ffn / granularity)
    moe_router_pre_softmax: bool = True
    moe_router_topk_scaling_factor: Optional[float] = None

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float):
    """[..., head_dim] angles of integer ``positions`` [...]: megatron's RotaryEmbedding
    (non-interleaved)."""
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cat((freqs, freqs), dim=-1)


def apply_rotary(x, angles):
    """x: [B, heads, S, d]; angles: broadcastable to it ([B, 1, S, d])."""
    return x * angles.cos() + rotate_half(x) * angles.sin()


class KVCache:
    """Every layer's keys (after RoPE) and values of the positions seen so far, [B, G, T, d].

    ``GPT.forward`` appends to it. ``update`` and ``get_seq_length`` are named as in transformers'
    ``Cache``, so the model takes a transformers ``DynamicCache`` too.
    """

    def __init__(self):
        self.keys_BGTd, self.values_BGTd = [], []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys_BGTd[layer_idx].shape[2] if layer_idx < len(self.keys_BGTd) else 0

    def update(self, k_BGSd, v_BGSd, layer_idx: int):
        """Append one layer's new keys and values; return all of that layer's."""
        if layer_idx == len(self.keys_BGTd):
            self.keys_BGTd.append(k_BGSd)
            self.values_BGTd.append(v_BGSd)
        else:
            self.keys_BGTd[layer_idx] = torch.cat((self.keys_BGTd[layer_idx], k_BGSd), dim=2)
            self.values_BGTd[layer_idx] = torch.cat((self.values_BGTd[layer_idx], v_BGSd), dim=2)
        return self.keys_BGTd[layer_idx], self.values_BGTd[layer_idx]

    def select(self, rows: torch.Tensor, start: int = 0) -> None:
        """Keep these batch rows and the positions from ``start`` on: rows that finished
        decoding leave the batch, and so may columns that are padding in every row left."""
        self.keys_BGTd = [k[rows, :, start:] for k in self.keys_BGTd]
        self.values_BGTd = [v[rows, :, start:] for v in self.values_BGTd]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_index: int = 0):
        super().__init__()
        self.heads, self.groups, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_query_groups,
            cfg.head_dim,
        )
        self.layer_index = layer_index  # its entry in a cache
        qkv_width = (self.heads + 2 * self.groups) * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv_width, bias=False)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_BSD, angles_B1Sd, allowed_B1ST, cache=None):
        B, S, _ = x_BSD.shape
        heads_per_group = self.heads // self.groups
        # [B, S, G, (heads_per_group + 2) * d]: per group, its query heads, then k, then v
        qkv = self.linear_qkv(x_BSD).view(B, S, self.groups, (heads_per_group + 2) * self.head_dim)
        q, k, v = qkv.split([heads_per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q_BHSd = q.reshape(B, S, self.heads, self.head_dim).transpose(1, 2)
        k_BGSd, v_BGSd = k.transpose(1, 2), v.transpose(1, 2)
        q_BHSd, k_BGSd = apply_rotary(q_BHSd, angles_B1Sd), apply_rotary(k_BGSd, angles_B1Sd)
        k_BGTd, v_BGTd = (
            cache.update(k_BGSd, v_BGSd, self.layer_index)
            if cache is not None
            else (k_BGSd, v_BGSd)
        )
        k_BHTd = k_BGTd.repeat_interleave(heads_per_group, dim=1)  # head h reads group h // hpg
        v_BHTd = v_BGTd.repeat_interleave(heads_per_group, dim=1)
        scores_BHST = (q_BHSd @ k_BHTd.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attn_BHST = scores_BHST.masked_fill(~allowed_B1ST, float("-inf")).softmax(dim=-1)
        out_BSD = (attn_BHST @ v_BHTd).transpose(1, 2).reshape(B, S, self.heads * self.head_dim)
        return self.linear_proj(out_BSD)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)  # [gate; up]
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


def topk_gates(cfg: GPTConfig, logits):
    """TopK MoE (megatron's TopKRouter with softmax scores)."""
    k = cfg.topk
    if cfg.moe_router_pre_softmax:
        top, index = logits.softmax(dim=-1).topk(k, dim=-1)
    else:
        top, index = logits.topk(k, dim=-1)
        top = top.softmax(dim=-1)
    if cfg.moe_router_topk_scaling_factor:
        top = top * cfg.moe_router_topk_scaling_factor
    return torch.zeros_like(logits).scatter(-1, index, top)


def relu_gates(cfg: GPTConfig, logits):
    """ReMoE (Eq. 5)."""
    return F.relu(logits)


MOE_GATES = {"topk": topk_gates, "relu": relu_gates}
"""The MoE routers by ``GPTConfig.router``: ``gates(cfg, logits [T, E])`` -> gates [T, E], zero
where an expert is inactive."""
ROUTERS = ("dense", *MOE_GATES)
"""The routers implemented here (dense: no experts): each routes a token by itself alone, so the
cache is exact."""


class Router(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.gates = MOE_GATES[cfg.router]
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x):
        """x: [T, hidden] -> gates [T, E], zero where an expert is inactive."""
        return self.gates(self.cfg, x @ self.weight.t())


class Experts(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.local_experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.expert_ffn_hidden_size) for _ in range(cfg.num_experts)
        )


class MoE(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates = self.router(x)  # [T, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts.local_experts):
            tokens = torch.nonzero(gates[:, e] > 0).flatten()
            if tokens.numel():
                out[tokens] += gates[tokens, e, None] * expert(x[tokens])
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.self_attention = Attention(cfg, layer_index)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = (
            MoE(cfg) if cfg.router in MOE_GATES else SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)
        )

    def forward(self, x_BSD, angles_B1Sd, allowed_B1ST, cache=None):
        x_BSD = x_BSD + self.self_attention(
            self.input_layernorm(x_BSD), angles_B1Sd, allowed_B1ST, cache
        )
        return x_BSD + self.mlp(self.pre_mlp_layernorm(x_BSD))


class Decoder(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.router not in ROUTERS:
            raise ValueError(
                f"the reference model implements the {', '.join(ROUTERS)} routers, "
                f"not {cfg.router!r}: run the checkpoint itself (its megatron model)"
            )
        self.config = cfg
        self.embedding = Embedding(cfg)
        self.decoder = Decoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, tokens, attention_mask=None, cache=None):
        """tokens [B, S] int64 -> logits [B, S, vocab_size].

        Without ``cache`` and ``attention_mask``: positions 0..S-1. ``cache`` (``KVCache``) holds
        the earlier positions and receives these; ``attention_mask`` [B, cached + S] marks real
        tokens 1 and padding 0 (module docstring).
        """
        tokens_BS = tokens
        B, S = tokens_BS.shape
        device = tokens_BS.device
        past = cache.get_seq_length() if cache is not None else 0
        query_S = torch.arange(past, past + S, device=device)  # columns of the new positions
        key_T = torch.arange(past + S, device=device)
        allowed_ST = key_T[None, :] <= query_S[:, None]  # causal
        if attention_mask is None:
            positions_BS = query_S.expand(B, S)
            allowed_B1ST = allowed_ST[None, None]
        else:
            if tuple(attention_mask.shape) != (B, past + S):
                raise ValueError(
                    f"attention_mask is {list(attention_mask.shape)}, expected "
                    f"[batch, cached + new positions] = [{B}, {past + S}]"
                )
            real_BT = attention_mask.to(device).bool()
            positions_BS = (real_BT.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            # A padding query attends to itself alone: finite, and no real token reads it.
            itself_ST = key_T[None, :] == query_S[:, None]
            allowed_B1ST = (allowed_ST & (real_BT[:, None, :] | itself_ST))[:, None]
        angles_B1Sd = rotary_angles(positions_BS, self.config.head_dim, self.config.rotary_base)[
            :, None
        ]
        x_BSD = self.embedding.word_embeddings(tokens_BS)
        for layer in self.decoder.layers:
            x_BSD = layer(x_BSD, angles_B1Sd, allowed_B1ST, cache)
        return self.output_layer(self.decoder.final_layernorm(x_BSD))


def load_exported(directory: str, device=None) -> GPT:
    """The model saved in ``directory`` (``config.json`` + ``model.safetensors``), in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        cfg = GPTConfig.from_dict(json.load(f))
    model = GPT(cfg)
    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
    return model.to(device or "cpu").eval()
