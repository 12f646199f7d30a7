"""The one place where megatron-core is taught to run on a CPU with a gloo process group.

megatron-core 0.16 is CUDA-first: it places parameters with ``torch.cuda.current_device()``,
keeps its RNG tracker in CUDA generators, allocates optimizer scalars with ``device='cuda'``,
creates CUDA streams in the alltoall token dispatcher and accepts only ``torch.cuda.*Tensor``
parameters in its mixed-precision and distributed optimizers. ``apply_cpu_shims()`` replaces
exactly those touch points with CPU equivalents, so that the GPU configuration (bf16,
``Float16Module``, the distributed optimizer, the overlap flags) runs on CPU with gloo with only
the device kernels differing. It does nothing when CUDA is available, so the GPU path never goes
through this module, and every shim is listed here so a reader can audit them all. Defects of
megatron-core that every device needs fixed live in ``megatron_fixes.py``, not here.

Call it before building a model (``remoe_patches.runtime.parallel.initialize_parallel`` does).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

_applied = False


def cpu_shims_needed() -> bool:
    """True on a machine without CUDA, where megatron-core needs the shims below."""
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Install the CPU shims once if CUDA is absent; return whether they are active."""
    global _applied
    if not cpu_shims_needed():
        return False
    if _applied:
        return True
    _place_cuda_allocations_on_cpu()
    _rng_tracker_on_cpu_generator()
    _alltoall_dispatcher_without_streams()
    _hardcoded_cuda_tensors_on_cpu()
    _uneven_collectives_on_gloo()
    _cpu_tensors_pass_cuda_type_checks()
    _persistent_checkpoint_writer_on_cpu()
    _applied = True
    return True


def _persistent_checkpoint_writer_on_cpu() -> None:
    # --use-persistent-ckpt-worker's writer is a spawned process (none of these shims) whose loop
    # first selects the GPU ``rank % device_count()``; it starts through this module instead.
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    PersistentAsyncCaller.async_loop = staticmethod(_checkpoint_writer_loop_on_cpu)


def _checkpoint_writer_loop_on_cpu(*args, **kwargs):
    """The persistent writer's loop in its own process, where the CPU is device 0."""
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async

    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None  # after staging the tensors in memory
    filesystem_async.FileSystemWriterAsync.preload_tensors = staticmethod(_copies_in_memory)
    # this process imported megatron afresh: the class holds megatron's own loop
    return async_utils.PersistentAsyncCaller.async_loop(*args, **kwargs)


def _copies_in_memory(write_buckets, non_blocking=True):
    """The writer's staging of the tensors before training goes on: on a GPU a copy to host
    memory; here the tensors already are in (shared) host memory, and training would change
    them under the writer, so they are copied."""
    return [
        (
            file_name,
            storage_key,
            (bytes_data, [(item, tensor.detach().clone()) for item, tensor in tensor_data]),
        )
        for file_name, storage_key, (bytes_data, tensor_data) in write_buckets
    ]


def _place_cuda_allocations_on_cpu() -> None:
    # Parameters, rotary tables and communication buffers are allocated on
    # torch.cuda.current_device(); on CPU that device is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda device: None
    # Checkpoint saving waits for the device before copying tensors; the CPU has nothing pending.
    torch.cuda.synchronize = lambda device=None: None
    # The distributed optimizer's by-parameter checkpoint state (--dist-ckpt-optim-fully-
    # reshardable) moves its gather buffers with .cuda(); on CPU they stay where they are.
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: self


def _rng_tracker_on_cpu_generator() -> None:
    # megatron's RNG tracker (model_parallel_cuda_manual_seed, the TP/EP forks used for weight
    # init and dropout, activation recomputation) saves and restores CUDA generator states.
    # On CPU the default generator plays that role: the tracker swaps states in and out of it.
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)

    def set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._set_cuda_rng_state = set_cpu_rng_state
    # With one generator for both roles, the tracker's "CPU RNG state changed within GPU RNG
    # context" check fires on every fork; it is expected here.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def _alltoall_dispatcher_without_streams() -> None:
    # The alltoall dispatcher copies split sizes to the host on a side CUDA stream. On CPU the
    # values already live on the host: convert them as the GPU path does, with no streams.
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()  # skips torch.cuda.Stream()

    def host_values_without_streams(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = host_values_without_streams


class _TorchWithCpuDefaultDevice(types.ModuleType):
    """The torch module, except that factory calls asking for ``device='cuda'`` get the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "empty_like", "full")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            return _cuda_to_cpu(attr)
        return attr


def _cuda_to_cpu(factory):
    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapped


def _hardcoded_cuda_tensors_on_cpu() -> None:
    # These megatron modules allocate small tensors with a literal device='cuda' (optimizer and
    # grad-clipping scalars, the default causal mask, the schedules' token counter, the aux-loss
    # tracker, data broadcast sizes, the fallback grad-norm kernel, checkpoint exchange buffers).
    # Each sees a torch whose factories put such tensors on the CPU instead.
    import importlib

    cpu_torch = _TorchWithCpuDefaultDevice()
    for name in (
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.grad_scaler",
        "megatron.core.optimizer.optimizer",
        "megatron.core.transformer.utils",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.transformer.moe.moe_utils",
        "megatron.core.tensor_parallel.data",
        "megatron.core.utils",
        "megatron.core.rerun_state_machine",
        "megatron.core.dist_checkpointing.exchange_utils",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    ):
        importlib.import_module(name).torch = cpu_torch


def _uneven_collectives_on_gloo() -> None:
    # The token dispatchers gather and reduce-scatter variable numbers of tokens per rank
    # (lists of unequal tensors). NCCL does that; gloo requires equal sizes (all_gather) or has
    # no list reduce-scatter. Unequal calls are rewritten with equal-size collectives.
    import torch.distributed as dist

    equal_all_gather = dist.all_gather
    plain_reduce_scatter = dist.reduce_scatter

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return equal_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        equal_all_gather(gathered, padded, group=group)
        for out, full in zip(tensor_list, gathered):
            out.copy_(full[: out.shape[0]])
        return _done() if async_op else None

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_backend(group) != "gloo":
            return plain_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        summed = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(summed, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(summed[start : start + output.numel()].view_as(output))
        return _done() if async_op else None

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter


class _done:
    """A finished collective's handle."""

    def wait(self):
        return True

    def is_completed(self):
        return True


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_tensors_named_like_cuda():
    """While inside, ``tensor.type()`` (no argument) names a CPU tensor as its CUDA twin."""
    original = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _named_like_cuda(function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _cpu_tensors_named_like_cuda():
            return function(*args, **kwargs)

    return wrapped


def _cpu_tensors_pass_cuda_type_checks() -> None:
    # The mixed-precision and distributed optimizers sort parameters into fp32 and 16-bit groups
    # by ``param.type() == 'torch.cuda.FloatTensor'`` (and refuse anything else), and gradient
    # clipping asserts the same of every gradient. Those three functions, and only they, see CPU
    # tensors under their CUDA names; all they do with the tensors is device-independent.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    distrib_optimizer.DistributedOptimizer.__init__ = _named_like_cuda(
        distrib_optimizer.DistributedOptimizer.__init__
    )
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _named_like_cuda(
        optimizer.Float16OptimizerWithFloat16Params.__init__
    )
    clip = _named_like_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip
