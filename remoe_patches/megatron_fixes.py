"""Workarounds for defects of megatron-core 0.16.1 that every device needs, CPU and GPU alike.

``cpu_compat.py`` teaches megatron-core to run without CUDA and is never applied on a GPU; this
module is the other half: places where the released megatron-core is wrong on any device. Each
fix names the defect and is a no-op once megatron-core no longer has it.

1. Router gating without transformer-engine: ``moe_utils.router_gating_linear`` tests
   ``te_general_gemm is not None``, but the name is only bound when transformer-engine imports,
   so every MoE forward ends in ``NameError`` (fixed upstream after 0.16.1).
   ``apply_megatron_fixes`` binds it to None, which selects the plain ``torch.mm`` path.
2. ``DistributedOptimizer`` around PyTorch's Adam/AdamW (no transformer-engine or apex fused Adam):
   a. ``state_dict()`` asserts that all parameters share one Adam ``step``; a fresh optimizer has
      no state at all, so building the load template (or saving before the first step) fails.
      ``initialize_adam_state`` creates the state torch would create lazily at the first step.
   b. Loading a ``dp_reshardable`` checkpoint restores the step into one tensor shared by every
      parameter, then overwrites it with the template's step (a non-persistent entry of the param
      state). Adam's bias correction restarts, and torch's foreach AdamW adds 1 to that shared
      tensor once per parameter per step. ``restore_adam_steps`` gives every parameter its own
      step tensor holding the saved step (which ``load_state_dict`` left in the param groups).
"""

from __future__ import annotations

import torch

from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def apply_megatron_fixes() -> None:
    """Install the module-level fixes (idempotent); call before building a model."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _distributed_torch_adams(optimizer):
    """The (DistributedOptimizer, torch Adam) pairs inside a megatron optimizer."""
    members = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for member in members:
        inner = getattr(member, "optimizer", None)
        if isinstance(member, DistributedOptimizer) and isinstance(
            inner, (torch.optim.Adam, torch.optim.AdamW)
        ):
            yield member, inner


def initialize_adam_state(optimizer) -> None:
    """Give a distributed optimizer's torch Adam the state of its first step now (defect 2a).

    The values are those torch's Adam creates lazily (step 0, zero moments), so training is
    unchanged; only ``state_dict()`` works from the start.
    """
    for _, adam in _distributed_torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if state:
                    continue
                state["step"] = _step_tensor(0.0, group, param)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )


def restore_adam_steps(optimizer) -> None:
    """After ``optimizer.load_state_dict``: one step tensor per parameter, holding the saved step
    (defect 2b). The step comes from the param groups, where megatron stores it on save."""
    for _, adam in _distributed_torch_adams(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if "step" in adam.state[param]:
                    adam.state[param]["step"] = _step_tensor(float(group["step"]), group, param)


def _step_tensor(value: float, group: dict, param: torch.Tensor) -> torch.Tensor:
    # Where torch's Adam keeps it: on the parameter's device for capturable or fused Adam,
    # on the host otherwise.
    on_device = group.get("capturable") or group.get("fused")
    return torch.tensor(value, dtype=torch.float32, device=param.device if on_device else "cpu")
