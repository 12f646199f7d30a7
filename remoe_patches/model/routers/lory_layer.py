"""``LoryMLP``: a Lory layer (arXiv 2405.03133) for the ``mlp`` slot of megatron-core's
TransformerLayer, and ``lory_block_spec`` to put it into every layer of a GPT decoder spec.

Shape suffixes: S = sequence positions, B = sequences, N = segments per sequence, E = experts,
h = hidden size, f = expert FFN width.

The math is ``remoe_patches.routing.lory``'s: E SwiGLU experts merged in parameter space per segment
of ``segment_length`` tokens, with weights routed from the previous segment's mean input.

What is not reproduced from the paper:
- Similarity-based data batching (Lory packs similar documents into one training sequence, so
  that adjacent segments share a domain): the data pipeline is the project's own.
Lory's dense warm-up (its App. G.3 calls it crucial) is reproduced: for the first
``lory_dense_warmup_fraction`` of the steps (the paper's 5%) every LoryMLP is a dense SwiGLU FFN,
expert 0's weights (``LoryMLP.dense_warmup``; the router and the other experts get zero
gradients), and then ``start_experts_from_the_dense_ffn`` copies the trained FFN into every
expert (with its Adam moments where the optimizer holds whole tensors) before routing starts.
- Inference-time routing: Lory decodes with one routing decision made from the whole prompt
  and keeps that merged FFN for every generated token. Here evaluation and generation run the
  training-time segment routing on the full (recomputed) context; sequence lengths must be a
  multiple of ``segment_length`` there too (right-pad; padding only reaches later segments,
  except within the first segment under ``first_segment="own_detached"``).
Lory trains with the language-modelling loss only (no load-balancing loss); so does this layer,
and the MoE aux-loss settings of the config are ignored.

Refused: tensor, sequence, context and expert parallelism (merging needs every expert's full
weights, and a segment's routing needs the previous segment, on the same rank), biases, and
anything but SwiGLU experts (the project's LLaMA recipe).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parameter import Parameter
from torch.utils.hooks import RemovableHandle

from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.routing import lory
from remoe_patches.config.model_config import ConfigError
from remoe_patches.runtime.parallel import local_device

DEFAULT_SEGMENT_LENGTH = 256
"""The paper's segment length (for its 4096-token sequences)."""


class LoryMLP(MegatronModule):
    """E SwiGLU experts merged per segment by causal segment routing; returns ``(output, None)``.

    Parameters (plain tensors, saved by MegatronModule's default ``sharded_state_dict`` as
    replicated tensors): ``router_weight`` ``[E, h]``, ``fc1_weight`` ``[E, h, 2f]`` (each
    expert's gate and up matrices side by side, gate first) and ``fc2_weight`` ``[E, f, h]``,
    with E = ``config.num_moe_experts`` and f = ``config.moe_ffn_hidden_size``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules=None,
        segment_length: int = DEFAULT_SEGMENT_LENGTH,
        first_segment: str = "own_detached",
        pg_collection=None,
        tp_group=None,
        layer_number: Optional[int] = None,
    ):
        super().__init__(config=config)
        check_lory_config(config)
        if not isinstance(segment_length, int) or segment_length < 1:
            raise ConfigError(f"LoryMLP.segment_length={segment_length!r}: must be an int >= 1")
        if first_segment not in lory.FIRST_SEGMENT_RULES:
            raise ConfigError(
                f"LoryMLP.first_segment={first_segment!r}: choose one of "
                f"{', '.join(lory.FIRST_SEGMENT_RULES)}"
            )
        self.segment_length = segment_length
        self.first_segment = first_segment
        self.layer_number = layer_number
        self._routing_observers = collections.OrderedDict()  # (RemovableHandle needs one)
        if pg_collection is not None and tp_group is None:
            tp_group = getattr(pg_collection, "tp", None)
        if tp_group is not None:
            # MegatronModule.sharded_state_dict reads the TP group from here when it exists.
            self.tp_group = tp_group
        experts, hidden, width = (
            config.num_moe_experts,
            config.hidden_size,
            config.moe_ffn_hidden_size,
        )
        device, dtype = local_device(), config.params_dtype
        self.router_weight = Parameter(torch.empty(experts, hidden, device=device, dtype=dtype))
        self.fc1_weight = Parameter(
            torch.empty(experts, hidden, 2 * width, device=device, dtype=dtype)
        )
        self.fc2_weight = Parameter(torch.empty(experts, width, hidden, device=device, dtype=dtype))
        if config.perform_initialization:
            # As megatron's Router (default generator) and its linear layers' GPU path (the
            # model-parallel RNG stream), so every data-parallel rank starts identical.
            config.init_method(self.router_weight)
            with get_cuda_rng_tracker().fork():
                config.init_method(self.fc1_weight)
                config.output_layer_init_method(self.fc2_weight)

    def set_layer_number(self, layer_number: int) -> None:
        """TransformerLayer tells its mlp which layer it is (1-based)."""
        self.layer_number = layer_number

    def routing_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The routing weights ``[B, N, E]`` (float32) each segment is merged with."""
        return lory.lory_routing_weights(
            hidden_states, self.router_weight, self.segment_length, self.first_segment
        )

    def observe_routing(self, observer) -> RemovableHandle:
        """Call ``observer(layer_number, weight_E, unrouted_tokens, num_tokens)`` after each
        training forward (not in the dense warm-up): ``weight_E`` is each expert's routing weight
        summed over the micro-batch's tokens (Lory routes every token to all experts, so
        ``unrouted_tokens`` is 0). The handle's ``remove()`` stops it."""
        handle = RemovableHandle(self._routing_observers)
        self._routing_observers[handle.id] = observer
        return handle

    dense_warmup = False
    """Lory's dense warm-up: the layer is the dense SwiGLU FFN of expert 0's weights (set by
    ``set_dense_warmup``)."""

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        """``hidden_states`` ``[S, B, h]`` -> ``(output [S, B, h], None)``.

        ``padding_mask`` is accepted and ignored: megatron passes it to mlp slots for MoE
        aux-loss bookkeeping, and Lory has no aux loss.
        """
        if self.dense_warmup:
            output_SBh = lory.swiglu(hidden_states @ self.fc1_weight[0]) @ self.fc2_weight[0]
            # The router and the other experts join with factor 0: every parameter gets a
            # (zero) gradient, as megatron's DDP gradient hooks expect.
            unused_weights = (
                self.router_weight.sum() + self.fc1_weight[1:].sum() + self.fc2_weight[1:].sum()
            )
            return (output_SBh + 0.0 * unused_weights).to(hidden_states.dtype), None
        output_SBh, weights_BNE = lory.lory_ffn(
            hidden_states,
            self.router_weight,
            self.fc1_weight,
            self.fc2_weight,
            self.segment_length,
            self.first_segment,
        )
        if self._routing_observers and self.training and torch.is_grad_enabled():
            num_tokens = hidden_states.shape[0] * hidden_states.shape[1]
            weight_E = weights_BNE.detach().float().mean(dim=(0, 1)) * num_tokens
            unrouted = torch.zeros((), device=weight_E.device)
            for observer in self._routing_observers.values():
                observer(self.layer_number, weight_E, unrouted, num_tokens)
        return output_SBh.to(hidden_states.dtype), None


def lory_layers(model_chunks) -> list:
    """Every ``LoryMLP`` of the model chunks (a module or a list of them)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoryMLP)]


def dense_warmup_steps(fraction: float, train_iters: int) -> int:
    """The steps of Lory's dense warm-up: ``round(fraction * train_iters)``."""
    return int(round(fraction * train_iters))


def set_dense_warmup(model_chunks, dense: bool) -> None:
    """Put every LoryMLP into (or out of) the dense warm-up."""
    for layer in lory_layers(model_chunks):
        layer.dense_warmup = dense


@torch.no_grad()
def start_experts_from_the_dense_ffn(model_chunks, optimizer=None) -> None:
    """End Lory's dense warm-up: copy expert 0 (the trained dense FFN) into every expert of
    every LoryMLP, leave the warm-up, and make ``optimizer`` (a megatron optimizer) follow:
    its main parameters (fp32 copies or shards) are reloaded from the model, and where it holds
    a whole tensor's Adam moments (not the distributed optimizer's shards, whose other experts
    keep their moments) expert 0's moments are copied too."""
    layers = lory_layers(model_chunks)
    params = []
    for layer in layers:
        for weight in (layer.fc1_weight, layer.fc2_weight):
            weight[1:] = weight[0]
            params.append(weight)
        layer.dense_warmup = False
    if optimizer is None:
        return
    optimizer.reload_model_params()
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        main_of = {}
        for model_group, main_group in zip(
            getattr(inner, "float16_groups", []), getattr(inner, "fp32_from_float16_groups", [])
        ):
            main_of.update({id(p): q for p, q in zip(model_group, main_group)})
        state = getattr(getattr(inner, "optimizer", None), "state", {})
        for weight in params:
            main = main_of.get(id(weight), weight)
            for value in state.get(main, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value[1:] = value[0]


def check_lory_config(config: TransformerConfig) -> None:
    """Raise ``ConfigError`` naming the field when ``config`` cannot run a Lory layer."""
    if not config.num_moe_experts or config.num_moe_experts < 1:
        raise ConfigError("TransformerConfig.num_moe_experts: Lory needs the number of experts")
    if not config.moe_ffn_hidden_size:
        raise ConfigError("TransformerConfig.moe_ffn_hidden_size: Lory needs the expert width")
    why = "merging needs every expert's full weights on the rank"
    refused = [
        ("tensor_model_parallel_size", config.tensor_model_parallel_size > 1, why, "1"),
        (
            "sequence_parallel",
            config.sequence_parallel,
            "a segment's routing needs the whole previous segment on the rank",
            "False",
        ),
        ("expert_model_parallel_size", config.expert_model_parallel_size > 1, why, "1"),
        ("expert_tensor_parallel_size", (config.expert_tensor_parallel_size or 1) > 1, why, "1"),
        (
            "context_parallel_size",
            config.context_parallel_size > 1,
            "a segment's routing needs the previous segment on the rank",
            "1",
        ),
        (
            "mlp_chunks_for_prefill",
            config.mlp_chunks_for_prefill > 1,
            "chunks along the sequence would cut segments apart",
            "1",
        ),
        ("add_bias_linear", config.add_bias_linear, "Lory's experts have no biases", "False"),
        (
            "gated_linear_unit",
            not config.gated_linear_unit,
            "Lory's experts are SwiGLU FFNs",
            "True (--swiglu)",
        ),
        (
            "activation_func",
            config.activation_func is not F.silu,
            "Lory's experts are SwiGLU FFNs",
            "torch.nn.functional.silu (--swiglu)",
        ),
    ]
    for field, is_refused, reason, fix in refused:
        if is_refused:
            raise ConfigError(
                f"TransformerConfig.{field}={getattr(config, field)!r}: LoryMLP does not support "
                f"it ({reason}); set it to {fix}"
            )


def lory_block_spec(
    block_spec: TransformerBlockSubmodules,
    segment_length: int = DEFAULT_SEGMENT_LENGTH,
    first_segment: str = "own_detached",
) -> TransformerBlockSubmodules:
    """A copy of a GPT decoder ``block_spec`` with every layer's ``mlp`` a ``LoryMLP``.

    The config the block is built with must carry ``num_moe_experts`` and
    ``moe_ffn_hidden_size`` (e.g. a TopK MoE model's), and pass ``check_lory_config``.
    TransformerLayer logs "Unknown MLP type ... Using default kwargs" for each layer: it passes
    only ``config``, which is all ``LoryMLP`` needs.
    """
    if not isinstance(segment_length, int) or segment_length < 1:
        raise ConfigError(f"segment_length={segment_length!r}: must be an int >= 1")
    if first_segment not in lory.FIRST_SEGMENT_RULES:
        raise ConfigError(
            f"first_segment={first_segment!r}: choose one of {', '.join(lory.FIRST_SEGMENT_RULES)}"
        )
    mlp_spec = ModuleSpec(
        module=LoryMLP, params={"segment_length": segment_length, "first_segment": first_segment}
    )
    block_spec = copy.copy(block_spec)
    block_spec.layer_specs = [
        dataclasses.replace(
            layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp_spec)
        )
        for layer_spec in block_spec.layer_specs
    ]
    return block_spec


def block_spec_for(block_spec: TransformerBlockSubmodules, model) -> TransformerBlockSubmodules:
    """The registry's spec rewrite (``router_registry``): Lory layers with ``model``'s options."""
    options = model.router_options
    return lory_block_spec(block_spec, options.segment_length, options.first_segment)
