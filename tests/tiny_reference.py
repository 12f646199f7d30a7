"""A tiny ``reference_model.GPT`` built in process, no checkpoint: weights drawn at std 0.3, so
attention is far from uniform and the routers pick different experts for different tokens (the
cache and generation tests check it)."""

from __future__ import annotations

import torch

from remoe_patches.inference.reference_model import GPT, GPTConfig

VOCAB = 96


def tiny_model(router: str, seed: int = 0, seq_length: int = 64) -> GPT:
    config = GPTConfig(
        vocab_size=VOCAB,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=8,
        seq_length=seq_length,
        rotary_base=1e4,
        norm_epsilon=1e-5,
        router=router,
        ffn_hidden_size=64,
        num_experts=4,
        topk=2,
        expert_ffn_hidden_size=16,
        moe_router_pre_softmax=False,
    )
    model = GPT(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def random_rows(*lengths, seed=1) -> list:
    """Token id tensors of these lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]
