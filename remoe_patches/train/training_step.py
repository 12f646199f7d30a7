"""One training step: forward and backward through megatron-core's pipeline schedules, the
optimizer step (or a skipped one), and the step's record.

Shape suffixes: B = sequences of a micro-batch, S = sequence positions, L = transformer layers.

A batch is a dict of ``tokens_BS``, ``labels_BS``, ``loss_mask_BS`` and ``position_ids_BS``.
The LM loss is the token mean over the step's micro-batches (megatron's convention); the ReLU
routers' regularizer rides along in the backward pass through megatron's aux-loss scaler, and
their statistics come back from ``AdaptiveL1.finish_step`` as one ``RoutingStats``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.routing.regularizer import AdaptiveL1, RoutingStats


def lm_loss_func(
    loss_mask_BS: torch.Tensor,
    output_tensor: torch.Tensor,
    domains_BSD: Optional[torch.Tensor] = None,
):
    """Summed masked token losses, their count, and what to report (megatron's 3-tuple form).
    With ``domains_BSD`` (evaluation per domain) the report adds each domain's summed loss and
    token count, ``lm loss per domain`` (2, D)."""
    losses = output_tensor.float().view(-1)
    loss_mask = loss_mask_BS.reshape(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss.detach(), num_tokens.detach().float()])}
    if domains_BSD is not None:
        in_domain_TD = domains_BSD.reshape(losses.numel(), -1).float() * loss_mask[:, None]
        report["lm loss per domain"] = torch.stack(
            [losses.detach() @ in_domain_TD, in_domain_TD.sum(dim=0)]
        )
    return loss, num_tokens, report


def gpt_forward_step(data_iterator: Iterator[dict], model):
    """megatron's ``forward_step_func`` for a GPT model on a batch dict."""
    batch = next(data_iterator)
    output = model(batch["tokens_BS"], batch["position_ids_BS"], None, labels=batch["labels_BS"])
    return output, partial(
        lm_loss_func, batch["loss_mask_BS"], domains_BSD=batch.get("domains_BSD")
    )


def wrap_with_ddp(
    model: torch.nn.Module,
    config: TransformerConfig,
    *,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> DistributedDataParallel:
    """megatron's DDP: gradients accumulate in fp32 buffers (``param.main_grad``) and are
    reduced over data-parallel ranks (and over TP for sequence-parallel params) once per step.

    With ``overlap_grad_reduce`` a bucket's reduction starts in the backward pass of the step's
    last micro-batch; the schedules mark the earlier ones with ``config.no_sync_func``, which is
    set here as Megatron-LM's training loop sets it.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        config.no_sync_func = wrapped.no_sync
        config.grad_sync_func = wrapped.start_grad_sync
    return wrapped


def params_gathered_lazily(model_chunks: list) -> bool:
    """True when the distributed optimizer's all-gather of updated weights is deferred to the next
    forward pass (``--overlap-param-gather``): until then, weights owned by other data-parallel
    ranks are one step stale in this rank's model."""
    ddp_config = model_chunks[0].ddp_config
    return ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather


def sync_params(model_chunks: list) -> None:
    """Gather the weights the last optimizer step produced into every rank's model now (before a
    checkpoint or an evaluation), as Megatron-LM's ``force_param_sync`` does."""
    if params_gathered_lazily(model_chunks):
        for chunk in model_chunks:
            chunk.start_param_sync(force_sync=True)


def forward_backward(
    model_chunks: list,
    batches: Iterable[dict],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Run one step's micro-batches; return the token-mean LM loss (last stage; NaN elsewhere)
    and, for batches with ``domains_BSD``, ``lm_loss_per_domain_2D``: each domain's summed loss
    and token count over the step (all data-parallel ranks).

    Gradients land in ``param.main_grad`` (reduced over data-parallel ranks by
    ``finalize_model_grads``) unless ``forward_only``.
    """
    for chunk in model_chunks:
        if hasattr(chunk, "zero_grad_buffer") and not forward_only:
            chunk.zero_grad_buffer()
    iterator = iter(batches)
    reports = get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return {"lm_loss": torch.tensor(float("nan"))}
    group = parallel_state.get_data_parallel_group()

    def summed(key):
        total = torch.stack([report[key] for report in reports]).sum(dim=0)
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(total, group=group)
        return total

    loss = summed("lm loss")
    out = {"lm_loss": loss[0] / loss[1]}
    if "lm loss per domain" in reports[0]:
        out["lm_loss_per_domain_2D"] = summed("lm loss per domain")
    return out


@dataclass
class StepRecord:
    """What one optimizer step did; the loop adds where it stands and the evaluations."""

    lm_loss: torch.Tensor
    """Token-mean LM loss of the step (NaN off the last pipeline stage)."""
    grad_norm: float
    skipped: bool
    """The loss or the gradient was not finite: no update, and lambda kept."""
    lr: float
    global_batch_size: Optional[int] = None
    """The step's sequences: --global-batch-size, or less while --rampup-batch-size ramps."""
    routing: Optional[RoutingStats] = None
    """ReLU routing's statistics (None for dense and TopK models)."""
    aux_losses_L: dict = field(default_factory=dict)
    """The aux losses megatron's routers logged (TopK, SparseMixer: ``load_balancing_loss``,
    ``z_loss``), each per layer (zero where not MoE)."""
    iteration: int = 0
    step_seconds: float = 0.0
    val_lm_loss: Optional[float] = None
    test_lm_loss: Optional[float] = None

    @property
    def load_balancing_loss_L(self) -> Optional[torch.Tensor]:
        """The Switch loss per layer, or None where none was logged."""
        return self.aux_losses_L.get("load_balancing_loss")


def train_step(
    model_chunks: list,
    optimizer,
    scheduler,
    regularizer: Optional[AdaptiveL1],
    batches: list,
    *,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    regularizer_scope: Callable[[], ContextManager] = contextlib.nullcontext,
    timers=None,
) -> StepRecord:
    """One optimizer step on this rank's ``batches`` (its micro-batches), or a skipped one.

    ``regularizer_scope`` is the seam for observers: the regularizer's step-end work (the one
    reduction of its statistics and the lambda update) runs inside it (the benchmark counts the
    host syncs made there). ``timers``: ``step_timers.StepTimers`` to time the phases with.
    """

    def phase(name):
        return timers.phase(name) if timers is not None else contextlib.nullcontext()

    optimizer.zero_grad()
    lm_loss = forward_backward(
        model_chunks,
        batches,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )["lm_loss"]
    with phase("optimizer"):
        # The optimizer's own step() in parts, so that a non-finite gradient skips the update
        # after the norm is known, without preparing the gradients and taking the norm twice.
        # The norm is the step's one host read (as in Megatron-LM), and it decides for every
        # rank: it is reduced over all model-parallel ranks, and a non-finite loss makes every
        # gradient non-finite.
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm() or 0.0)
        finite = math.isfinite(grad_norm)
        record = StepRecord(
            lm_loss=lm_loss,
            grad_norm=grad_norm,
            skipped=not finite,
            lr=optimizer.param_groups[0]["lr"],
            global_batch_size=global_batch_size,
        )
        if finite:
            _clip_grads(optimizer, grad_norm)
            optimizer.step_with_ready_grads()
            scheduler.step(increment=global_batch_size)
    if regularizer is not None:
        with regularizer_scope(), phase("regularizer-step"):
            # A skipped step's sparsity is not trusted: it is consumed without an update.
            record.routing = regularizer.finish_step(update=finite)
    else:
        record.aux_losses_L = megatron_aux_losses(len(batches))
    return record


def _clip_grads(optimizer, grad_norm: float) -> None:
    """Clip every (chained) optimizer's gradients by the global norm, as its ``step`` does."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            # Through the module, like megatron's optimizer: a CPU run's shim replaces it there.
            clip_grads.clip_grad_by_total_norm_fp32(
                params,
                max_norm=part.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )


def megatron_aux_losses(num_microbatches: int) -> dict:
    """The step's aux losses per layer from megatron's routers (the Switch loss, the z-loss),
    which log them in megatron's global aux-loss tracker (reduced over ranks, averaged over
    micro-batches, then cleared); empty when nothing was logged (dense model, or the losses off).
    """
    tracker = get_moe_layer_wise_logging_tracker()
    names = list(tracker)
    if not names:
        return {}
    reduce_aux_losses_tracker_across_ranks(names)
    losses = {name: tracker[name]["values"].clone() / num_microbatches for name in names}
    for name in names:
        tracker[name]["values"].zero_()
    return losses
