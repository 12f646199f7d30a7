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
   c. Loading a ``fully_reshardable`` checkpoint (--dist-ckpt-optim-fully-reshardable) copies
      every entry of each parameter's Adam state from the checkpoint's, which holds the moments
      but not torch's per-parameter ``step``: ``KeyError: 'step'``. The step is kept out of
      that copy (``_set_states_but_the_step``); ``restore_adam_steps`` then sets it.
3. The gradient norm without apex or transformer-engine: megatron's stand-in for the fused L2
   norm, ``utils.local_multi_tensor_l2_norm``, builds ``torch.tensor(list of norms)`` and then
   ``float()``s the result: one host read per gradient tensor plus one (157 per step at 182M on
   an H200), where the fused kernel reads none. ``device_l2_norm`` computes the same values in
   the same order on the device; ``get_grad_norm_fp32`` then reads the norm once, as it does
   with the fused kernel.
"""

from __future__ import annotations

import torch

from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def apply_megatron_fixes() -> None:
    """Install the module-level fixes (idempotent); call before building a model."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = device_l2_norm
    setter = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(setter, "keeps_the_step", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_but_the_step(setter)


def _set_states_but_the_step(set_states):
    """``set_states`` (defect 2c) with torch Adam's per-parameter ``step`` left out of the copy
    when the checkpoint's tensors have none."""

    def set_states_but_the_step(self, model_param, tensors):
        adam = self.optimizer
        if "step" in tensors or not isinstance(adam, (torch.optim.Adam, torch.optim.AdamW)):
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = adam.state[adam.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    set_states_but_the_step.keeps_the_step = True
    return set_states_but_the_step


def device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``local_multi_tensor_l2_norm``'s result (defect 3), computed without leaving the device:
    the L2 norm over the per-tensor L2 norms, as a float32 tensor of shape [1]."""
    norms = [torch.norm(tensor) for tensor_list in tensor_lists for tensor in tensor_list]
    if not norms:  # no gradient on this rank (as the original: a zero on the device)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return torch.zeros(1, dtype=torch.float, device=device), None
    total = torch.norm(torch.stack(norms).float())
    return total.reshape(1), None


def _distributed_torch_adams(optimizer):
    """The (DistributedOptimizer, torch Adam) pairs inside a megatron optimizer."""
    members = (
        optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    )
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
