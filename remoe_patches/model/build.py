"""Build a megatron-core GPTModel: dense, TopK MoE or ReMoE, with the paper's LLaMA recipe.

The layer spec is megatron-core's own GPT decoder spec; the ``router`` slot of each MoE layer's
``MoESubmodules`` holds the model's router, as its ``router_registry`` entry builds it:
megatron's ``TopKRouter``, ReMoE's ``ReLURouter``, or a Table 2 baseline (Hash, Expert Choice,
SparseMixer-v2). Lory rewrites the spec instead (``LoryMLP``: merged experts). With
transformer-engine importable that is megatron-core's TE spec (fused attention, TE grouped GEMM
for the experts with ``moe_grouped_gemm``). Without it, megatron-core's local spec with three
slots filled from ``local_layers``: PyTorch's scaled-dot-product attention, torch grouped-GEMM
experts (with ``moe_grouped_gemm``) and a sequence-parallel-aware RMSNorm. Nothing of
megatron-core is copied.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional


from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE, get_gpt_decoder_block_spec
from megatron.core.tensor_parallel.layers import (
    _grad_accum_fusion_available as HAVE_WGRAD_FUSION,
)
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.config.model_config import ModelConfig, ParallelConfig
from remoe_patches.model.local_layers import GroupedGemmExperts, RMSNorm, SDPAttention
from remoe_patches.runtime.parallel import local_device
from remoe_patches.routing.regularizer import AdaptiveL1
from remoe_patches.config.run_config import LayerOptions
from remoe_patches.model.token_dispatch import use_sorted_token_path

# megatron-core's own probes, so that what we select is what megatron-core can build: HAVE_TE
# is true only when transformer-engine and megatron's TE extension both import (a broken TE
# install selects the local layers); HAVE_WGRAD_FUSION when apex's fused_weight_gradient_mlp_cuda
# imports, which megatron's own ColumnParallelLinear needs for gradient_accumulation_fusion.


def transformer_impl_in_use(requested: str) -> str:
    """The layers a run asking for ``requested`` gets here: 'transformer_engine' only where
    transformer-engine imports, else 'local' (what the checkpoint's RunConfig records)."""
    return "transformer_engine" if HAVE_TE and requested == "transformer_engine" else "local"


def customize_layers(
    block_spec: TransformerBlockSubmodules,
    *,
    router_builder=None,
    experts: Optional[ModuleSpec] = None,
    core_attention: Optional[type] = None,
    norm: Optional[type] = None,
) -> TransformerBlockSubmodules:
    """A copy of ``block_spec`` with slots replaced; ``None`` leaves a slot as it is.

    ``router_builder`` and ``experts`` go into every MoE layer's ``MoESubmodules``,
    ``core_attention`` into every self-attention, ``norm`` into every norm slot.
    """
    block_spec = copy.copy(block_spec)
    layer_specs = []
    for layer_spec in block_spec.layer_specs:
        changes = {}
        mlp_spec = layer_spec.submodules.mlp
        is_moe = isinstance(mlp_spec, ModuleSpec) and isinstance(mlp_spec.submodules, MoESubmodules)
        moe_changes = {}
        if router_builder is not None:
            moe_changes["router"] = router_builder
        if experts is not None:
            moe_changes["experts"] = experts
        if is_moe and moe_changes:
            moe_submodules = dataclasses.replace(mlp_spec.submodules, **moe_changes)
            changes["mlp"] = dataclasses.replace(mlp_spec, submodules=moe_submodules)
        attention_spec = layer_spec.submodules.self_attention
        if core_attention is not None and isinstance(attention_spec, ModuleSpec):
            attention_submodules = dataclasses.replace(
                attention_spec.submodules, core_attention=core_attention
            )
            changes["self_attention"] = dataclasses.replace(
                attention_spec, submodules=attention_submodules
            )
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


def router_builder_for(model: ModelConfig, regularizer: Optional[AdaptiveL1] = None):
    """The ``MoESubmodules.router`` builder of ``model.router``; None keeps megatron's
    ``TopKRouter`` (and suits dense models and Lory, which have no router slot)."""
    return model.kind.build_router(model, regularizer)


def decoder_block_spec(
    transformer_config: TransformerConfig,
    router_builder=None,
    use_transformer_engine: bool = HAVE_TE,
) -> TransformerBlockSubmodules:
    """megatron-core's GPT decoder spec for this pipeline stage, with ``router_builder`` in every
    MoE layer's router slot (None: megatron's TopKRouter).

    With transformer-engine: megatron-core's TE spec as it is (plus the routers). Without it:
    megatron-core's local spec with ``local_layers``' attention, norm and (when
    ``transformer_config.moe_grouped_gemm``) grouped-GEMM experts.
    """
    with warnings.catch_warnings():
        # The local spec warns that its grouped GEMM (GroupedMLP) is legacy; it is replaced below.
        warnings.filterwarnings("ignore", message="The legacy GroupedMLP")
        block_spec = get_gpt_decoder_block_spec(
            transformer_config,
            use_transformer_engine=use_transformer_engine,
            normalization=transformer_config.normalization,
        )
    if use_transformer_engine:
        return customize_layers(block_spec, router_builder=router_builder)
    grouped = transformer_config.num_moe_experts and transformer_config.moe_grouped_gemm
    return customize_layers(
        block_spec,
        router_builder=router_builder,
        experts=ModuleSpec(module=GroupedGemmExperts) if grouped else None,
        core_attention=SDPAttention,
        norm=RMSNorm,
    )


def build_regularizer(model_config: ModelConfig, device=None) -> Optional[AdaptiveL1]:
    """The model-wide adaptive L1 coefficient (ReMoE only)."""
    if not model_config.kind.adaptive_l1:
        return None
    if device is None:
        device = local_device()
    return AdaptiveL1(
        target_sparsity=model_config.target_sparsity,
        num_layers=model_config.num_layers,
        num_experts=model_config.total_experts,
        l1_coeff_init=model_config.router_options.l1_coeff_init,
        multiplier=model_config.router_options.l1_coeff_multiplier,
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
    transformer_config = model_config.transformer_config(
        parallel, bf16=bf16, **transformer_overrides
    )
    if regularizer is None:
        regularizer = build_regularizer(model_config)
    spec = decoder_block_spec(
        transformer_config,
        router_builder_for(model_config, regularizer),
        use_transformer_engine=use_transformer_engine,
    )
    spec = model_config.kind.rewrite_block_spec(spec, model_config)
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
    if model_config.is_moe and model_config.token_dispatcher == "sorted":
        use_sorted_token_path(model)
    model_config.kind.prepare(model)
    return BuiltModel(model=model, transformer_config=transformer_config, regularizer=regularizer)


def build_model_for_run(
    model_config: ModelConfig,
    parallel: ParallelConfig,
    layers: LayerOptions,
    *,
    cuda_available: bool,
    bf16: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    regularizer: Optional[AdaptiveL1] = None,
) -> BuiltModel:
    """``build_model`` with a run's layer options as this machine can honour them: the layer
    implementation it has (``transformer_impl_in_use``) and only the fused kernels that run
    here (``LayerOptions.transformer_overrides``). Training and inference build through it."""
    use_te = transformer_impl_in_use(layers.transformer_impl) == "transformer_engine"
    return build_model(
        model_config,
        parallel,
        bf16=bf16,
        pre_process=pre_process,
        post_process=post_process,
        regularizer=regularizer,
        use_transformer_engine=use_te,
        **layers.transformer_overrides(
            is_moe=model_config.is_moe,
            cuda_available=cuda_available,
            transformer_engine_available=use_te,
            wgrad_fusion_available=HAVE_WGRAD_FUSION,
        ),
    )
