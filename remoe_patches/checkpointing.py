"""Checkpoints with megatron-core's distributed checkpointing, written atomically.

Layout (Megatron-LM's names)::

    <save>/iter_0000100/                   megatron dist-checkpoint (torch_dist format)
    <save>/latest_checkpointed_iteration.txt

A checkpoint is written into ``iter_XXXXXXX.partial`` and renamed into place only when every
rank has finished; then the ``latest`` file is replaced (write a temporary file, ``os.replace``).
A crash mid-write therefore leaves the previous checkpoint and the pointer untouched, and the
next save removes the stale ``.partial`` directory.

What is saved: the model (all parallel shards, reloadable under another TP/PP/EP/DP layout),
the optimizer, the LR scheduler, the ReMoE coefficient, the iteration, the consumed samples,
each rank's RNG states and the run's arguments.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

LATEST_FILE = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """The iteration the ``latest`` pointer names, or None when ``root`` holds no checkpoint."""
    if not root:
        return None
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} should hold an iteration number, found {text!r}") from None


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sizes, ranks) over PP, TP, DP and EP: one RNG shard per rank."""
    sizes = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    ranks = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return sizes, ranks


def _sharded_state(model_chunks, optimizer, *, is_loading: bool, rng: Optional[dict]) -> dict:
    model_state = {}
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        model_state[key] = _unwrap(chunk).sharded_state_dict()
    state = dict(model_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            _merged(model_state), is_loading=is_loading
        )
    sizes, ranks = _layout()
    state["rng_state"] = ShardedObject("rng_state", rng, sizes, ranks, replica_id=0)
    return state


def _merged(model_state: dict) -> dict:
    if len(model_state) == 1:
        return next(iter(model_state.values()))
    merged = {}
    for value in model_state.values():
        merged.update(value)
    return merged


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: list,
    optimizer,
    scheduler,
    *,
    consumed_samples: int,
    regularizer=None,
    args: Optional[dict] = None,
) -> str:
    """Write checkpoint ``iteration`` under ``root`` atomically; return its directory."""
    final = checkpoint_dir(root, iteration)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()

    state = _sharded_state(model_chunks, optimizer, is_loading=False, rng=_rng_state())
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        regularizer=regularizer.state_dict() if regularizer is not None else None,
        args=args,
    )
    dist_checkpointing.save(state, partial)
    dist.barrier()

    if dist.get_rank() == 0:
        if os.path.exists(final):  # saving the same iteration again
            shutil.rmtree(final)
        os.replace(partial, final)
        pointer = os.path.join(root, LATEST_FILE)
        with open(pointer + ".tmp", "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
    dist.barrier()
    return final


def load_checkpoint(
    root: str,
    model_chunks: list,
    optimizer,
    scheduler,
    *,
    regularizer=None,
    load_optimizer: bool = True,
    load_rng: bool = True,
    load_training_state: bool = True,
) -> Optional[dict]:
    """Restore the latest checkpoint under ``root`` into the given objects.

    ``load_training_state=False`` restores the weights but not the LR schedule nor the ReMoE
    coefficient (a new run from these weights).

    Returns ``{"iteration", "consumed_samples", "args", "rng_restored"}``, or None when ``root``
    holds no checkpoint (a fresh run). RNG states are restored only under the same parallel
    layout they were saved with.
    """
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    directory = checkpoint_dir(root, iteration)
    if not os.path.isdir(directory):
        raise ValueError(
            f"{os.path.join(root, LATEST_FILE)} names iteration {iteration}, but {directory} is "
            "missing; point --load at a complete checkpoint directory"
        )
    common = dist_checkpointing.load_common_state_dict(directory)
    saved_args = common.get("args") or {}
    same_layout = _same_layout(saved_args)
    rng_wanted = load_rng and same_layout
    template = _sharded_state(
        model_chunks, optimizer if load_optimizer else None, is_loading=True, rng=None
    )
    if not rng_wanted:
        del template["rng_state"]
    state = dist_checkpointing.load(template, directory)

    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        _unwrap(chunk).load_state_dict(state[key])
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if load_training_state and scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if load_training_state and regularizer is not None and state.get("regularizer") is not None:
        regularizer.load_state_dict(state["regularizer"])
    if rng_wanted:
        _set_rng_state(state["rng_state"].data if hasattr(state["rng_state"], "data")
                       else state["rng_state"])
    return dict(
        iteration=state["iteration"],
        consumed_samples=state["consumed_samples"],
        args=saved_args,
        rng_restored=rng_wanted,
    )


def _same_layout(saved_args: dict) -> bool:
    sizes, _ = _layout()
    saved = (
        saved_args.get("pipeline_model_parallel_size"),
        saved_args.get("tensor_model_parallel_size"),
        saved_args.get("data_parallel_size"),
    )
    return saved == sizes
