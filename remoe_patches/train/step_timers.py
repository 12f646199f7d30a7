"""Timers at ``--timing-log-level`` 1 or 2, as Megatron-LM's: megatron-core's ``Timers`` object
handed to the model's and the optimizer's configs (so megatron-core's schedules, gradient
reduction and optimizer time themselves), plus the phases only this project's loop knows.

Level 1: ``forward-backward`` (megatron's schedule), ``optimizer`` (gradient preparation, norm,
clipping and update), ``regularizer-step`` (ReMoE's one statistics reduction and lambda
update), megatron's gradient all-reduces and optimizer parts. Level 2 adds ``batch-generator``
(the step's batches to the device), megatron's ``forward-compute``/``backward-compute`` and
pipeline sends/receives, and, inside every MoE layer's forward, ``moe-router``, ``moe-dispatch``
(from the router's output to the experts' input: permutation and all-to-all), ``moe-experts``
and ``moe-combine`` (back to the layer's output). Every timer synchronizes the device when it
starts and stops, so level 2 slows training down: it is for finding where the time goes.

Reported per log window, in ms per step: the maximum over ranks (``timers_ms`` in
metrics.jsonl; tensorboard ``<name>-time`` with --log-timers-to-tensorboard) and on the console
as --timing-log-option says (``max``, ``minmax`` or ``all`` ranks).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.timers import Timers
from megatron.core.utils import get_model_config

# Timers this project starts itself, with their levels.
OWN_TIMERS = {
    "optimizer": 1,
    "regularizer-step": 1,
    "batch-generator": 2,
    "moe-router": 2,
    "moe-dispatch": 2,
    "moe-experts": 2,
    "moe-combine": 2,
}

# What the log reports, in this order: ours and those megatron-core starts (schedules, gradient
# reduction, optimizer). A name no rank timed in the window is left out.
REPORTED = (
    "forward-backward",
    "forward-compute",
    "backward-compute",
    "batch-generator",
    "moe-router",
    "moe-dispatch",
    "moe-experts",
    "moe-combine",
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-forward-recv",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
    "all-grads-sync",
    "non-tensor-parallel-grads-all-reduce",
    "embedding-grads-all-reduce",
    "optimizer",
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "params-all-gather",
    "regularizer-step",
)


class StepTimers(Timers):
    """megatron-core's Timers, with the project's phases and a per-window report."""

    def __init__(self, log_level: int, log_option: str = "minmax"):
        super().__init__(log_level, log_option)
        self.log_level, self.log_option = log_level, log_option

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as ``name`` (at its level in ``OWN_TIMERS``)."""
        timer = self(name, log_level=OWN_TIMERS[name])
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def window(self, steps: int, device: torch.device) -> tuple[dict, str]:
        """The window's ms per step of every reported timer: ``{name: max over ranks}`` and the
        console's lines; the timers restart. Every rank must call (one all-gather)."""
        local = torch.tensor(
            [
                self._timers[name].elapsed(reset=True) if name in self._timers else 0.0
                for name in REPORTED
            ],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(ranks, local)
            per_rank_RN = torch.stack(ranks).cpu()
        else:
            per_rank_RN = local.cpu().unsqueeze(0)
        per_rank_RN = per_rank_RN * 1000.0 / steps
        timed = [i for i, name in enumerate(REPORTED) if (per_rank_RN[:, i] > 0).any()]
        max_ms = {REPORTED[i]: float(per_rank_RN[:, i].max()) for i in timed}
        return max_ms, self._console(per_rank_RN, timed)

    def _console(self, per_rank_RN: torch.Tensor, timed: list) -> str:
        if not timed:
            return ""
        if self.log_option == "all":
            lines = ["times across ranks (ms):"]
            for i in timed:
                lines.append(f"  {REPORTED[i]}:")
                lines += [
                    f"     rank {rank:2d}: {value:.2f}"
                    for rank, value in enumerate(per_rank_RN[:, i].tolist())
                    if value > 0
                ]
            return "\n".join(lines)
        max_only = self.log_option == "max"
        lines = [
            "max time across ranks (ms):" if max_only else "(min, max) time across ranks (ms):"
        ]
        for i in timed:
            times = per_rank_RN[:, i]
            times = times[times > 0]
            label = (REPORTED[i] + " ").ljust(48, ".")
            lines.append(
                f"    {label}: {float(times.max()):.2f}"
                if max_only
                else f"    {label}: ({float(times.min()):.2f}, {float(times.max()):.2f})"
            )
        return "\n".join(lines)


def build_timers(log_level: int, log_option: str) -> Optional[StepTimers]:
    """The run's timers, or None at level 0 (nothing timed: the step is as without timers)."""
    return StepTimers(log_level, log_option) if log_level > 0 else None


def install(timers: StepTimers, model_chunks: list, optimizer) -> list:
    """Hand ``timers`` to megatron-core (the model's config: schedules and gradient reduction;
    the optimizers' configs) and, at level 2, time the parts of every MoE layer's forward.
    Returns the hook handles."""
    get_model_config(model_chunks[0]).timers = timers
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        part.config.timers = timers
    if timers.log_level < 2:
        return []
    return _time_moe_layers(timers, model_chunks)


def _time_moe_layers(timers: StepTimers, model_chunks: list) -> list:
    """Hooks that time a MoE layer's forward in four consecutive parts: router, dispatch (up to
    the experts' input), experts, combine (to the layer's output)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    def switch(stop: Optional[str], start: Optional[str]):
        def hook(module, *unused):
            if not module.training:  # evaluation is not part of the step
                return
            if stop is not None:
                timers(stop, log_level=2).stop()
            if start is not None:
                timers(start, log_level=2).start()

        return hook

    handles = []
    for chunk in model_chunks:
        for layer in chunk.modules():
            if isinstance(layer, MoELayer):
                handles += [
                    layer.router.register_forward_pre_hook(switch(None, "moe-router")),
                    layer.router.register_forward_hook(switch("moe-router", "moe-dispatch")),
                    layer.experts.register_forward_pre_hook(switch("moe-dispatch", "moe-experts")),
                    layer.experts.register_forward_hook(switch("moe-experts", "moe-combine")),
                    layer.register_forward_hook(switch("moe-combine", None)),
                ]
    return handles
