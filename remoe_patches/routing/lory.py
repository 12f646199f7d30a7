"""Lory's expert merging and causal segment routing (arXiv 2405.03133, Sec. 3), in plain torch.

Shape suffixes: S = sequence positions, B = sequences, N = segments per sequence, L = tokens per
segment (``segment_length``), E = experts, h = hidden size, f = expert FFN width (``2f``: the
gate and up halves of a SwiGLU's first matrix side by side, gate first, as megatron's ``fc1``).

Lory does not route tokens to experts. For each segment of ``L`` consecutive tokens of a
sequence it merges the experts in parameter space, ``W = sum_e g_e W_e`` for every matrix of the
SwiGLU FFN, and runs every token of the segment through that one merged FFN. The routing weights
``g = softmax(W_router h_bar)`` come from ``h_bar``, the mean of the layer's input over the
PREVIOUS segment of the same sequence, so no token sees a later token (causal segment routing).

The first segment has no previous segment. Lory (Algorithm 1 of the paper) routes it with its
own mean under a stop-gradient: ``first_segment="own_detached"``, the default. Its forward pass
therefore lets a token of the first segment depend on later tokens of that segment through the
E routing weights (no gradient reaches that path, so the model is not trained to use it).
``first_segment="uniform"`` merges the first segment with weights 1/E instead, which makes every
output depend only on the tokens at or before it, exactly.

Everything here is differentiable: the gradient reaches every expert and the router (except
through the first segment's routing, as above).

Training sequences are a whole number of segments. A sequence of any other length (evaluation
batches, generation's growing context) ends in a shorter segment: ``lory_ffn`` zero-pads it to a
whole segment, takes its mean over its real tokens only and drops the padding's outputs, so the
real tokens' outputs do not depend on the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from remoe_patches.config.router_registry import LORY_FIRST_SEGMENT_RULES as FIRST_SEGMENT_RULES


def num_segments(seq_length: int, segment_length: int) -> int:
    """Segments in a sequence of ``seq_length`` tokens; ``segment_length`` must divide it."""
    if segment_length < 1:
        raise ValueError(f"segment_length={segment_length}: must be a positive number of tokens")
    if seq_length % segment_length:
        raise ValueError(
            f"segment_length={segment_length} does not divide the sequence length {seq_length}: "
            "choose a segment_length that divides --seq-length (or a --seq-length that is a "
            "multiple of it), and right-pad evaluation batches to a multiple of segment_length"
        )
    return seq_length // segment_length


def segments(hidden_SBh: torch.Tensor, segment_length: int) -> torch.Tensor:
    """The tokens of each segment, ``[B * N, L, h]``, sequence-major (row ``b * N + n``)."""
    seq_length, batch, hidden = hidden_SBh.shape
    count = num_segments(seq_length, segment_length)
    hidden_NLBh = hidden_SBh.reshape(count, segment_length, batch, hidden)
    return hidden_NLBh.permute(2, 0, 1, 3).reshape(batch * count, segment_length, hidden)


def unsegment(segments_XLh: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of ``segments``: ``[B * N, L, h]`` back to ``[S, B, h]``."""
    total, segment_length, hidden = segments_XLh.shape
    count = total // batch
    segments_BNLh = segments_XLh.reshape(batch, count, segment_length, hidden)
    return segments_BNLh.permute(1, 2, 0, 3).reshape(count * segment_length, batch, hidden)


def segment_means(
    hidden_SBh: torch.Tensor, segment_length: int, real_length: int | None = None
) -> torch.Tensor:
    """``h_bar``: each segment's mean input, ``[B, N, h]``, in at least float32. With
    ``real_length`` (< S), positions from it on are zero padding: the last segment's mean is
    taken over its real tokens."""
    batch, hidden = hidden_SBh.shape[1], hidden_SBh.shape[-1]
    # bf16 sums of hundreds of tokens lose precision; the router reads these means.
    sums_BNh = (
        segments(hidden_SBh, segment_length)
        .to(_at_least_fp32(hidden_SBh.dtype))
        .sum(dim=1)
        .reshape(batch, -1, hidden)
    )
    tokens_N = torch.full(
        (sums_BNh.shape[1],), float(segment_length), device=sums_BNh.device, dtype=sums_BNh.dtype
    )
    if real_length is not None and real_length < hidden_SBh.shape[0]:
        tokens_N[-1] = real_length - (sums_BNh.shape[1] - 1) * segment_length
    return sums_BNh / tokens_N[:, None]


def causal_segment_weights(
    segment_logits_BNE: torch.Tensor, first_segment: str = "own_detached"
) -> torch.Tensor:
    """Routing weights ``[B, N, E]`` of each segment from the router logits of each segment's mean.

    Segment ``n > 0`` gets ``softmax(logits[n - 1])``; segment 0 gets ``first_segment``'s rule.
    The logits of a sequence's last segment route nothing (no segment follows it).
    """
    if first_segment not in FIRST_SEGMENT_RULES:
        raise ValueError(
            f"first_segment={first_segment!r}: choose one of {', '.join(FIRST_SEGMENT_RULES)}"
        )
    weights_BNE = torch.softmax(segment_logits_BNE, dim=-1)
    if first_segment == "own_detached":
        first_B1E = weights_BNE[:, :1].detach()
    else:
        first_B1E = torch.full_like(weights_BNE[:, :1], 1.0 / weights_BNE.shape[-1])
    return torch.cat([first_B1E, weights_BNE[:, :-1]], dim=1)


def merge_experts(weights_BNE: torch.Tensor, expert_params_E: torch.Tensor) -> torch.Tensor:
    """``sum_e g_e W_e`` for every segment: ``[B, N, E]`` x ``[E, ...]`` -> ``[B, N, ...]``."""
    batch, count, experts = weights_BNE.shape
    merged = weights_BNE.reshape(batch * count, experts).to(expert_params_E.dtype) @ (
        expert_params_E.reshape(experts, -1)
    )
    return merged.reshape(batch, count, *expert_params_E.shape[1:])


def swiglu(fc1_out_2f: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a first-matrix output whose last dimension is ``[gate | up]``."""
    gate, up = torch.chunk(fc1_out_2f, 2, dim=-1)
    return F.silu(gate) * up


def merged_swiglu_ffn(
    hidden_SBh: torch.Tensor,
    weights_BNE: torch.Tensor,
    fc1_Eh2f: torch.Tensor,
    fc2_Efh: torch.Tensor,
) -> torch.Tensor:
    """Every token through its segment's merged SwiGLU FFN, ``[S, B, h]``.

    This is the FFN with merged weights, not the weighted sum of the experts' outputs (SwiGLU is
    not linear in its weights, so the two differ).
    """
    batch = hidden_SBh.shape[1]
    count = weights_BNE.shape[1]
    segment_length = hidden_SBh.shape[0] // count
    fc1_Xh2f = merge_experts(weights_BNE, fc1_Eh2f).flatten(0, 1)
    fc2_Xfh = merge_experts(weights_BNE, fc2_Efh).flatten(0, 1)
    tokens_XLh = segments(hidden_SBh, segment_length)
    intermediate_XLf = swiglu(torch.bmm(tokens_XLh, fc1_Xh2f))
    return unsegment(torch.bmm(intermediate_XLf, fc2_Xfh), batch)


def lory_routing_weights(
    hidden_SBh: torch.Tensor,
    router_Eh: torch.Tensor,
    segment_length: int,
    first_segment: str = "own_detached",
    real_length: int | None = None,
) -> torch.Tensor:
    """Each segment's routing weights ``[B, N, E]`` (float32 or wider) for the layer input
    (``real_length``: see ``segment_means``)."""
    means_BNh = segment_means(hidden_SBh, segment_length, real_length)
    logits_BNE = means_BNh @ router_Eh.to(means_BNh.dtype).t()
    return causal_segment_weights(logits_BNE, first_segment)


def lory_ffn(
    hidden_SBh: torch.Tensor,
    router_Eh: torch.Tensor,
    fc1_Eh2f: torch.Tensor,
    fc2_Efh: torch.Tensor,
    segment_length: int,
    first_segment: str = "own_detached",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Lory layer: ``(output [S, B, h], routing weights [B, N, E])``; a sequence that is not a
    whole number of segments ends in a shorter one (see the module docstring)."""
    seq_length = hidden_SBh.shape[0]
    if segment_length < 1:
        num_segments(seq_length, segment_length)  # its error
    padding = -seq_length % segment_length
    padded_SBh = F.pad(hidden_SBh, (0, 0, 0, 0, 0, padding)) if padding else hidden_SBh
    weights_BNE = lory_routing_weights(
        padded_SBh, router_Eh, segment_length, first_segment, real_length=seq_length
    )
    output_SBh = merged_swiglu_ffn(padded_SBh, weights_BNE, fc1_Eh2f, fc2_Efh)
    return output_SBh[:seq_length], weights_BNE


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
