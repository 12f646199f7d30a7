"""Build a megatron-core GPTModel: dense, TopK MoE or ReMoE, with the paper's LLaMA recipe.

The layer spec is megatron-core's own GPT decoder spec (transformer-engine layers when TE is
importable, megatron-core's local layers otherwise); for ReMoE only the ``router`` slot of each
MoE layer's ``MoESubmodules`` is swapped for ``ReLURouter``. Nothing of megatron-core is copied.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.config import ModelConfig, ParallelConfig
from remoe_patches.regularizer import AdaptiveL1
from remoe_patches.router import relu_router_builder

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built from megatron's norm arguments, usable with sequence parallelism.

    megatron-core's local norm (``WrappedTorchNorm``) refuses sequence parallelism because its
    weight lacks the ``sequence_parallel`` mark that makes megatron all-reduce the weight's
    gradient over tensor-parallel ranks (each rank normalises only its slice of the sequence).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(
            hidden_size, eps=eps, dtype=config.params_dtype, device=torch.cuda.current_device()
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def customize_layers(
    block_spec: TransformerBlockSubmodules, *, router_builder=None, norm=None
) -> TransformerBlockSubmodules:
    """A copy of ``block_spec`` with the MoE layers' router and/or every RMSNorm replaced."""
    block_spec = copy.copy(block_spec)
    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        changes = {}
        mlp_spec = layer_spec.submodules.mlp
        is_moe = isinstance(mlp_spec, ModuleSpec) and isinstance(mlp_spec.submodules, MoESubmodules)
        if router_builder is not None and is_moe:
            moe_submodules = dataclasses.replace(mlp_spec.submodules, router=router_builder)
            changes["mlp"] = dataclasses.replace(mlp_spec, submodules=moe_submodules)
        if norm is not None:
            changes.update(input_layernorm=norm, pre_mlp_layernorm=norm)
        layer_specs.append(
            dataclasses.replace(
                layer_spec, submodules=dataclasses.replace(layer_spec.submodules, **changes)
            )
        )
    block_spec.layer_specs = layer_specs
    if norm is not None:
        block_spec.layer_norm = norm
    return block_spec


def decoder_block_spec(
    transformer_config: TransformerConfig,
    regularizer: Optional[AdaptiveL1] = None,
    load_balancing: bool = True,
    use_transformer_engine: bool = HAVE_TE,
) -> TransformerBlockSubmodules:
    """megatron-core's GPT decoder spec for this pipeline stage; ReLU routers if ``regularizer``.

    Without transformer-engine the norms are ``RMSNorm`` above, so that sequence parallelism
    works on megatron-core's local layers too.
    """
    block_spec = get_gpt_decoder_block_spec(
        transformer_config,
        use_transformer_engine=use_transformer_engine,
        normalization=transformer_config.normalization,
    )
    return customize_layers(
        block_spec,
        router_builder=(
            relu_router_builder(regularizer, load_balancing) if regularizer is not None else None
        ),
        norm=None if use_transformer_engine else RMSNorm,
    )


def build_regularizer(model_config: ModelConfig, device=None) -> Optional[AdaptiveL1]:
    """The model-wide adaptive L1 coefficient (ReMoE only)."""
    if model_config.router != "relu":
        return None
    if device is None:
        device = torch.cuda.current_device()
    return AdaptiveL1(
        target_sparsity=model_config.target_sparsity,
        num_layers=model_config.num_layers,
        num_experts=model_config.total_experts,
        init_coeff=model_config.relu_l1_coeff_init,
        multiplier=model_config.relu_l1_coeff_multiplier,
        device=device,
    )


@dataclass
class BuiltModel:
    """A model chunk for this rank, with the config it was built from and its regularizer."""

    model: GPTModel
    transformer_config: TransformerConfig
    regularizer: Optional[AdaptiveL1]


def build_model(
    model_config: ModelConfig,
    parallel: ParallelConfig,
    *,
    bf16: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    regularizer: Optional[AdaptiveL1] = None,
    use_transformer_engine: bool = HAVE_TE,
    **transformer_overrides,
) -> BuiltModel:
    """Build this rank's GPTModel (megatron's parallel groups must be initialized).

    ``regularizer`` lets several pipeline chunks share one coefficient; by default a ReMoE
    model gets a new one.
    """
    transformer_config = model_config.transformer_config(parallel, bf16=bf16, **transformer_overrides)
    if regularizer is None:
        regularizer = build_regularizer(model_config)
    spec = decoder_block_spec(
        transformer_config, regularizer, load_balancing=model_config.relu_load_balancing,
        use_transformer_engine=use_transformer_engine,
    )
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=model_config.vocab_size,
        max_sequence_length=model_config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=model_config.rotary_base,
    )
    return BuiltModel(model=model, transformer_config=transformer_config, regularizer=regularizer)
