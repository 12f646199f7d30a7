"""Start and stop torch.distributed and megatron-core's model-parallel groups.

Works under torchrun (reads RANK, WORLD_SIZE, MASTER_ADDR, ...), from a test that spawns
processes, and in a plain single process (a one-rank group). NCCL on GPUs, gloo on CPU. The
fixes for megatron-core's own defects are applied on every device, the CPU shims only on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from remoe_patches.config.model_config import ParallelConfig
from remoe_patches.runtime.cpu_compat import apply_cpu_shims
from remoe_patches.runtime.megatron_fixes import apply_megatron_fixes


def local_device() -> torch.device:
    """This process's device: its current GPU, or the CPU where there is none. Our own modules
    and tensors are placed with it, so they never depend on the CPU shims of ``torch.cuda``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_parallel(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_minutes: int = 10,
) -> None:
    """Initialize the process group and megatron's TP/PP/EP/DP groups, then seed every RNG.

    ``rank``/``world_size`` default to torchrun's environment, or a single process.
    """
    apply_megatron_fixes()
    on_cpu = apply_cpu_shims()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if "MASTER_PORT" in os.environ:
            init_method = "env://"
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        elif world_size == 1:
            # A lone process gets a private port; the environment stays untouched, so that
            # processes it starts do not inherit an address that is already taken.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            raise RuntimeError("MASTER_PORT must be set when several processes start together")
        if not on_cpu:
            local_rank = os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())
            torch.cuda.set_device(int(local_rank))
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel.validate_world(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Seed torch's generator and megatron's model-parallel RNG tracker (weight init, dropout)."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
