"""The tiny model that the CPU tests build in process: its ``ModelConfig`` fields, a batch of
random tokens for it, and a GPTModel of it with a given router in every MoE layer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from remoe_patches.config.model_config import ModelConfig, ParallelConfig
from remoe_patches.model.build import customize_layers, decoder_block_spec

TINY_MODEL = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=128,
    seq_length=16,
)
TINY_RELU_MODEL = {**TINY_MODEL, "router": "relu"}
NUM_EXPERTS = 8  # ModelConfig's default


def batch(seed=0, batch_size=3, cfg=TINY_MODEL):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg["vocab_size"], (batch_size, cfg["seq_length"] + 1), generator=gen)
    positions = torch.arange(cfg["seq_length"]).expand(batch_size, -1)
    return tokens[:, :-1], positions, tokens[:, 1:]


def transformer_config(**model_fields):
    """TINY_MODEL's TransformerConfig with a topk MoE layout (the router slot is replaced)."""
    return ModelConfig(
        router="topk", moe_aux_loss_coeff=0.0, **{**TINY_MODEL, **model_fields}
    ).transformer_config(ParallelConfig())


def build_gpt(router_builder, **model_fields):
    """A TINY_MODEL GPTModel with ``router_builder`` in every MoE layer (megatron's TopK if
    None)."""
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    config = transformer_config(**model_fields)
    spec = customize_layers(decoder_block_spec(config), router_builder=router_builder)
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


def fake_groups(rank=0, size=1):
    """A pg_collection whose groups only answer rank() and size(), all the Router needs."""
    group = SimpleNamespace(rank=lambda: rank, size=lambda: size)
    return SimpleNamespace(tp=group, cp=group, tp_cp=group, tp_dp_cp=group)
