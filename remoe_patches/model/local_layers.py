"""Fast layers for megatron-core's local (non-transformer-engine) GPT spec, built on PyTorch.

Shape suffixes: S = sequence positions, B = sequences, H = query heads, G = key/value heads,
D = head dim, T = tokens routed to this rank's experts, E = local experts, h = hidden size.

megatron-core's local spec computes attention with two batched GEMMs around a softmax that
materialises the S x S scores, keeps a norm that refuses sequence parallelism, and needs the
separate ``grouped_gemm`` package for grouped expert GEMMs. Where transformer-engine is not
installed, ``build.decoder_block_spec`` puts these in their place:

- ``SDPAttention``: ``torch.nn.functional.scaled_dot_product_attention`` (flash or
  memory-efficient kernels on GPUs, a fused kernel on CPU), grouped-query attention native.
- ``GroupedGemmExperts``: all local experts as two ``torch.nn.functional.grouped_mm`` calls
  (CUTLASS grouped GEMM on Hopper; a loop elsewhere), in megatron's ``GroupedMLP`` weight layout
  and with its ``sharded_state_dict``, so checkpoints load into ``SequentialMLP`` models and back.
- ``RMSNorm``: ``torch.nn.RMSNorm`` (fused on GPUs), usable with sequence parallelism.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parameter import Parameter

from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.runtime.parallel import local_device

# Public from torch 2.10; the device machines' 2.x builds before that only have the private name.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built from megatron's norm arguments, usable with sequence parallelism.

    megatron-core's local norm (``WrappedTorchNorm``) refuses sequence parallelism because its
    weight lacks the ``sequence_parallel`` mark that makes megatron all-reduce the weight's
    gradient over tensor-parallel ranks (each rank normalises only its slice of the sequence).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype, device=local_device())
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class SDPAttention(MegatronModule):
    """Causal core attention through ``scaled_dot_product_attention``; a drop-in for
    megatron-core's ``DotProductAttention`` (same arguments, same ``[S, B, H * D]`` output)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        unsupported = [
            (config.context_parallel_size != 1, "context parallelism"),
            (config.window_size is not None, "sliding-window attention"),
            (config.softmax_type != "vanilla", f"softmax_type={config.softmax_type!r}"),
            (
                attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding),
                f"attn_mask_type={attn_mask_type}",
            ),
        ]
        for refused, what in unsupported:
            if refused:
                raise ValueError(f"SDPAttention does not support {what}; use transformer-engine")
        self.is_causal = attn_mask_type == AttnMaskType.causal
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(config.kv_channels)
        if config.apply_query_key_layer_scaling:
            softmax_scale /= max(1, layer_number)
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query_SBHD: torch.Tensor,
        key_SBGD: torch.Tensor,
        value_SBGD: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        query_BHSD, key_BGSD, value_BGSD = (
            t.permute(1, 2, 0, 3) for t in (query_SBHD, key_SBGD, value_SBGD)
        )
        # megatron's masks are True where attention is NOT allowed; SDPA's boolean masks are
        # True where it is. Without a mask the causal structure is the kernel's own.
        mask = None if attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else _nothing():
            context_BHSD = F.scaled_dot_product_attention(
                query_BHSD,
                key_BGSD,
                value_BGSD,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=self.is_causal and mask is None,
                scale=self.softmax_scale,
                enable_gqa=query_BHSD.shape[1] != key_BGSD.shape[1],
            )
        seq, batch = query_SBHD.shape[:2]
        return context_BHSD.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class GroupedGemmExperts(MegatronModule):
    """The local experts of an MoE layer as two grouped GEMMs (``torch.nn.functional.grouped_mm``).

    Parameters and checkpoints are those of megatron-core's ``GroupedMLP``: ``weight1`` is
    ``[h, E * ffn * 2 / TP]`` and ``weight2`` ``[E * ffn / TP, h]``, viewed per expert as
    ``[E, h, 2 * ffn / TP]`` and ``[E, ffn / TP, h]``; ``sharded_state_dict`` is GroupedMLP's, which
    maps them onto SequentialMLP's per-expert tensors.
    """

    sharded_state_dict = GroupedMLP.sharded_state_dict

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None):
        super().__init__(config=config)
        if grouped_mm is None:
            raise ValueError(
                "GroupedGemmExperts needs torch.nn.functional.grouped_mm (torch >= 2.8); "
                "turn --moe-grouped-gemm off"
            )
        if config.add_bias_linear:
            raise ValueError("GroupedGemmExperts has no biases; pass --disable-bias-linear")
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("GroupedGemmExperts implements SwiGLU experts only (--swiglu)")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        expert_parallel = config.expert_model_parallel_size > 1
        tp_size = self.tp_group.size()
        fc1_width = divide(2 * config.moe_ffn_hidden_size * num_local_experts, tp_size)
        fc2_width = divide(config.moe_ffn_hidden_size * num_local_experts, tp_size)
        device = local_device()
        dtype = config.params_dtype
        self.weight1 = Parameter(
            torch.empty(config.hidden_size, fc1_width, device=device, dtype=dtype)
        )
        self.weight2 = Parameter(
            torch.empty(fc2_width, config.hidden_size, device=device, dtype=dtype)
        )
        if config.perform_initialization:
            _initialize_affine_weight_gpu(
                self.weight1, config.init_method, partition_dim=1, is_expert=True
            )
            _initialize_affine_weight_gpu(
                self.weight2, config.output_layer_init_method, partition_dim=0, is_expert=True
            )
        # Expert weights are reduced over the expert-data-parallel group, not all DP ranks.
        for weight in (self.weight1, self.weight2):
            setattr(weight, "allreduce", not expert_parallel)
        self.register_load_state_dict_post_hook(_ignore_sequential_extra_state)

    def forward(
        self,
        permuted_hidden_Th: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        permuted_probs_T: torch.Tensor,
    ):
        hidden = self.config.hidden_size
        w1_Ehf = self.weight1.view(self.num_local_experts, hidden, -1)
        w2_Efh = self.weight2.view(self.num_local_experts, -1, hidden)
        if permuted_hidden_Th.shape[0] == 0:
            # No token for these experts: a dense product of the (empty) input still gives every
            # weight a (zero) gradient, as megatron's experts do, so DDP's buckets fill.
            fc1_Tf = permuted_hidden_Th @ self.weight1
            out_Th = _swiglu_with_probs(fc1_Tf, permuted_probs_T[:, None]) @ self.weight2
            return out_Th, None
        # Row offsets where each expert's tokens end. The dispatcher may hand the counts over
        # on the host; moving them is a copy, not a wait.
        offsets_E = tokens_per_expert_E.to(
            device=permuted_hidden_Th.device, dtype=torch.int32, non_blocking=True
        ).cumsum(0, dtype=torch.int32)
        fc1_Tf = grouped_mm(permuted_hidden_Th, w1_Ehf, offs=offsets_E)
        intermediate_Tf = _swiglu_with_probs(fc1_Tf, permuted_probs_T[:, None])
        out_Th = grouped_mm(intermediate_Tf, w2_Efh, offs=offsets_E)
        return out_Th, None

    def backward_dw(self):
        """Nothing deferred: weight gradients are computed in the ordinary backward."""


def _ignore_sequential_extra_state(module, incompatible_keys) -> None:
    # GroupedMLP's sharded_state_dict carries SequentialMLP's per-expert ``_extra_state`` entries
    # for checkpoint compatibility; this module has nowhere to put them (GroupedMLP does the same).
    for key in list(incompatible_keys.unexpected_keys):
        if key.endswith("_extra_state"):
            incompatible_keys.unexpected_keys.remove(key)


def _swiglu_with_probs(fc1_Tf: torch.Tensor, probs_T1: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(fc1_Tf, 2, dim=-1)
    return (F.silu(gate) * up * probs_T1).to(fc1_Tf.dtype)
