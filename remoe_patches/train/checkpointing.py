"""Checkpoints with megatron-core's distributed checkpointing, written atomically.

Checkpoints go into the run directory under Megatron-LM's names (``iter_0000100/``, pointed at
by ``latest_checkpointed_iteration.txt``; see ``run_directory``), each a megatron dist-checkpoint
(torch_dist format).

A checkpoint is written into ``iter_XXXXXXX.partial`` and renamed into place only when every
rank has finished; then the ``latest`` file is replaced (write a temporary file, ``os.replace``).
A crash mid-write therefore leaves the previous checkpoint and the pointer untouched, and the
next save removes the stale ``.partial`` directory. A checkpoint damaged after the fact (a file
truncated or lost on a shared filesystem) is found before loading, from the sizes its
``.metadata`` records: resuming then falls back to the newest checkpoint that is whole, and says
so; when none is, one line names each checkpoint and its bad file.

What is saved: the model (all parallel shards, reloadable under another TP/PP/EP/DP layout),
the optimizer, the LR scheduler, the ReMoE coefficient, the iteration, the consumed samples,
each rank's RNG states and the run's configuration (``RunConfig.to_dict()``).

Like Megatron-LM, a checkpoint records how its sharded state was laid out ("content metadata",
``megatron.core.dist_checkpointing.load_content_metadata``) and is read back with the same
layout. With the distributed optimizer that layout is ``dp_reshardable``: each rank saves its
own slice of the optimizer state, which loads under another data-parallel size but not under
other TP/PP/EP sizes (give ``--no-load-optim`` for those). The optimizer's state of a checkpoint
saved with the other ``--use-distributed-optimizer`` setting does not load either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from torch.distributed.checkpoint.api import CheckpointException

from remoe_patches.train import megatron_lm_checkpoints
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.runtime.megatron_fixes import restore_adam_steps
from remoe_patches.config.run_config import RunConfig
from remoe_patches.runs.run_directory import (
    CHECKPOINT_METADATA,
    LATEST_FILE,
    PARTIAL_SUFFIX,
    checkpoint_dir,
    is_checkpoint_dir,
    latest_iteration,
    latest_pointer_path,
    saved_iterations,
    write_latest_iteration,
)
from remoe_patches.train.training_step import sync_params

_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] [^:;\n]+")

# The one tensor the two layer implementations save under different names: an MoE layer's
# pre-MLP norm is a separate TENorm in megatron's TE spec, while its local spec maps the norm
# onto the fused TE name that dense layers use. Everything else (the attention norm as
# linear_qkv.layer_norm_weight, the experts, the _extra_state objects) is named alike, so a
# checkpoint of either implementation loads into the other once this name is matched.
_ALIASES = {
    "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
}

# Model fields that shape the weights, with the flag that sets each.
_SHAPE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "dense_ffn_hidden_size": "--ffn-hidden-size",
    "vocab_size": "the padded vocabulary (--vocab-file/--tokenizer-model, "
    "--make-vocab-size-divisible-by)",
    "is_moe": "--num-experts (dense vs MoE)",
    "total_experts": "--num-experts x --moe-granularity",
    "expert_ffn_hidden_size": "--moe-granularity",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and what is wrong, in one line."""


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written (a full disk, a directory that became unwritable);
    the message says which and that the previous checkpoint is still the latest, in one line."""


def check_writer_dependencies() -> None:
    """Refuse, before anything runs, a save that would hang: megatron-core's checkpoint writer
    imports psutil in each forked writer process, outside its error handling, so without it the
    writer dies and the trainer waits for it forever (megatron-core 0.16.1 does not declare the
    dependency)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise CheckpointError(
            "--save needs psutil, which megatron-core's checkpoint writer imports (without it "
            "every save hangs): pip install psutil (an offline GPU machine: its wheel, see the "
            "README's 'GPU acceptance')"
        ) from None


def resolve_checkpoint_dir(load_dir: str) -> str:
    """``<save>`` (follows ``latest_checkpointed_iteration.txt``) or ``<save>/iter_XXXXXXX``."""
    load_dir = os.fspath(load_dir)
    if is_checkpoint_dir(load_dir):
        return load_dir
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
    iteration = latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(
            f"{load_dir} holds no checkpoint: expected {LATEST_FILE} (a pretrain_gpt.py --save "
            "directory) or a megatron distributed checkpoint (iter_XXXXXXX with metadata.json)"
        )
    directory = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{latest_pointer_path(load_dir)} names iteration {iteration}, but {directory} "
            "is missing"
        )
    return directory


def read_checkpoint_state(directory: str) -> dict:
    """The checkpoint's common (non-sharded) state: ``run_config``, ``iteration``, ..."""
    common = dist_checkpointing.load_common_state_dict(directory)
    if not common.get("run_config"):
        raise CheckpointError(
            f"{directory} has no saved run configuration ('run_config' in its common state): it "
            "was not written by this version of pretrain_gpt.py"
        )
    return common


def read_run_config(load_dir: str) -> RunConfig:
    """The ``RunConfig`` a checkpoint was trained with (``load_dir`` as in
    ``resolve_checkpoint_dir``)."""
    state = read_checkpoint_state(resolve_checkpoint_dir(load_dir))
    return RunConfig.from_dict(state["run_config"])


def checkpoint_problem(directory: str) -> Optional[str]:
    """Why the checkpoint in ``directory`` cannot load, or None: a missing directory or file, a
    shard file shorter than its ``.metadata`` says, an unreadable ``common.pt``."""
    if not os.path.isdir(directory):
        return "the directory is missing"
    for name in (CHECKPOINT_METADATA, "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(directory, name)):
            return f"{name} is missing"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(directory).read_metadata().storage_data
    except Exception as error:  # any damage to the pickled metadata
        return f".metadata does not read ({type(error).__name__})"
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) < size:
            return f"{name} is truncated ({os.path.getsize(path):,} of {size:,} bytes)"
    try:
        dist_checkpointing.load_common_state_dict(directory)
    except Exception as error:
        return f"common.pt does not read ({type(error).__name__})"
    return None


def match_saved_names(sharded_state: dict, directory: str) -> dict:
    """``sharded_state`` (a load template) with each tensor the checkpoint in ``directory`` holds
    under the other layer implementation's name renamed to it (see ``_ALIASES``); in place."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = set(dist_checkpointing.load_tensors_metadata(directory))
    for item in nested_values(sharded_state):
        if isinstance(item, ShardedTensor) and item.key not in saved:
            alias = _ALIASES.get(item.key)
            if alias in saved:
                item.key = alias
    return sharded_state


def check_same_architecture(directory: str, saved_model: dict, model: ModelConfig) -> None:
    """One line naming each flag whose value gives this run other weight shapes than the
    checkpoint's (``saved_model``: its ``RunConfig.to_dict()['model']``)."""
    if not saved_model:  # a checkpoint without a saved RunConfig: megatron's own check decides
        return
    try:
        saved = ModelConfig(**saved_model)
    except TypeError:  # fields of another version: leave it to the shape check
        return
    differ = [
        f"{flag}: checkpoint {getattr(saved, name)}, this run {getattr(model, name)}"
        for name, flag in _SHAPE_FLAGS.items()
        if getattr(saved, name) != getattr(model, name)
    ]
    if differ:
        raise CheckpointError(
            f"{directory} holds another model than this run builds ({'; '.join(differ)}); give "
            "the flags the checkpoint was trained with, or --load another checkpoint"
        )


def _check_same_fields(directory: str, saved: dict, model: ModelConfig) -> None:
    """``check_same_architecture`` for the ModelConfig fields a Megatron-LM checkpoint's args
    give (``saved``)."""
    differ = [
        f"{_SHAPE_FLAGS[name]}: checkpoint {value}, this run {getattr(model, name)}"
        for name, value in saved.items()
        if getattr(model, name) != value
    ]
    if differ:
        raise CheckpointError(
            f"{directory} holds another model than this run builds ({'; '.join(differ)}); give "
            "the flags the checkpoint was trained with (or --use-checkpoint-args), or --load "
            "another checkpoint"
        )


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


def content_metadata(model_chunks, fully_reshardable: bool = False) -> dict:
    """How this run lays out its sharded state: Megatron-LM's choices for megatron-core 0.16.

    Without it megatron-core falls back to the deprecated ``fully_sharded_model_space`` format
    for the distributed optimizer, which cannot be saved at all (``flattened_range``).
    ``fully_reshardable`` (--dist-ckpt-optim-fully-reshardable): the distributed optimizer's
    state is saved by parameter, like the weights, so that it loads under any layout.
    """
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    if ddp_config is not None and ddp_config.use_distributed_optimizer:
        if fully_reshardable:
            metadata["distrib_optim_sharding_type"] = "fully_reshardable"
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
        else:
            metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    return metadata


def _with_groups(metadata: dict) -> dict:
    """The metadata as sharded_state_dict() wants it: with the process group it cannot save."""
    return {
        **metadata,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def _sharded_state(
    model_chunks,
    optimizer,
    *,
    is_loading: bool,
    rng: Optional[dict],
    metadata: dict,
    directory: Optional[str] = None,
) -> dict:
    """The sharded state to save, or with ``directory`` the template to load it from."""
    metadata = _with_groups(metadata)
    model_state = {}
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        model_state[key] = _unwrap(chunk).sharded_state_dict(metadata=metadata)
    if directory is not None:  # before the optimizer's keys are derived from the model's
        match_saved_names(model_state, directory)
    state = dict(model_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            _merged(model_state), is_loading=is_loading, metadata=metadata
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
    run_config: Optional[dict] = None,
    data_parallel_size: Optional[int] = None,
    fully_parallel: bool = False,
    fully_reshardable: bool = False,
    async_saves: Optional["AsyncSaves"] = None,
) -> str:
    """Write checkpoint ``iteration`` under ``root`` atomically; return its directory.

    ``run_config`` is ``RunConfig.to_dict()`` (plain data); with ``data_parallel_size`` it tells
    a later load the layout the checkpoint was written with. ``fully_parallel``: replicated
    tensors are written by all data-parallel ranks, each a part. ``fully_reshardable``: see
    ``content_metadata``.

    With ``async_saves`` the tensors are written in the background: this returns once they are
    staged in host memory, and the checkpoint is renamed into place (and becomes the latest)
    when ``async_saves.finalize`` finds every rank's writer done; until then it is only a
    ``.partial`` directory, which a crash leaves behind like a synchronous save's.

    SIGTERM and Ctrl-C wait until the checkpoint is complete (``exit_signals.signals_held``).
    A write that fails for the machine's reasons (``OSError``: a full disk, ...) removes the
    partial checkpoint and raises ``CheckpointSaveError``; the previous checkpoint stays the
    latest.
    """
    from remoe_patches.train.exit_signals import signals_held

    final = checkpoint_dir(root, iteration)
    if async_saves is not None:  # one background save at a time: the latest pointer only grows
        async_saves.finalize(blocking=True)
    with signals_held(f"checkpoint {final} is written"), _save_errors(root, final):
        _write_checkpoint(
            root,
            final,
            iteration,
            model_chunks,
            optimizer,
            scheduler,
            consumed_samples=consumed_samples,
            regularizer=regularizer,
            run_config=run_config,
            data_parallel_size=data_parallel_size,
            fully_parallel=fully_parallel,
            fully_reshardable=fully_reshardable,
            async_saves=async_saves,
        )
    return final


@contextlib.contextmanager
def _save_errors(root: str, final: str):
    """A write that fails for the machine's reasons: the partial checkpoint removed, and
    ``CheckpointSaveError`` saying the previous checkpoint is still the latest."""
    try:
        yield
    except (Exception, CheckpointException) as error:  # megatron's is a BaseException
        cause = _machine_error(error)
        if cause is None:
            raise
        if dist.get_rank() == 0:
            shutil.rmtree(final + PARTIAL_SUFFIX, ignore_errors=True)
        latest = latest_iteration(root)
        kept = (
            f"{checkpoint_dir(root, latest)} is still the latest"
            if latest is not None
            else "no earlier checkpoint exists"
        )
        raise CheckpointSaveError(
            f"writing checkpoint {final} failed ({cause}); {kept}. Free space under {root} "
            "(or give another --save) and resume with --load"
        ) from error


class AsyncSaves:
    """Checkpoints being written in the background (--async-save): megatron-core's
    ``AsyncCallsQueue``, whose writer is a process forked per save, or with ``persistent`` one
    process for the whole run (--use-persistent-ckpt-worker)."""

    def __init__(self, persistent: bool = False):
        self.queue = AsyncCallsQueue(persistent=persistent)
        self.pending: list = []  # (root, final) of the scheduled saves

    def schedule(self, request, root: str, final: str) -> None:
        self.queue.schedule_async_request(request)
        self.pending.append((root, final))

    def finalize(self, blocking: bool = False) -> list:
        """Put the saves whose writers are done on every rank into place (every rank must call;
        ``blocking``: wait for all). Returns their directories."""
        if not self.pending:
            return []
        root, final = self.pending[0]
        with _save_errors(root, final):
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        finished, self.pending = self.pending[: len(done)], self.pending[len(done) :]
        return [final for _root, final in finished]

    def close(self) -> None:
        """Wait for the saves still being written and put them into place."""
        self.finalize(blocking=True)
        self.queue.close()


def _machine_error(error: BaseException) -> Optional[str]:
    """The OSError behind a failed write, as ``[Errno 28] No space left on device``, or None.

    megatron-core reports its writer processes' errors as a ``CheckpointException`` holding
    each rank's exception (on the coordinator; the other ranks learn only that a write failed).
    """
    if isinstance(error, CheckpointException):
        if not error.failures:
            return "another rank's write failed"
        found = [_machine_error(exc) for exc, _trace in error.failures.values()]
        return next((cause for cause in found if cause), None)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            if error.errno is not None and error.strerror:
                return f"[Errno {error.errno}] {error.strerror}"
            return f"{type(error).__name__}: {error}"
        # A writer's OSError reaches the coordinator as 'Worker failure: [Errno 28] ...' text
        # (the gather pickles the exception without its cause).
        found = _ERRNO_TEXT.search(str(error))
        if found and int(found[1]) in errno.errorcode:
            return found[0]
        error = error.__cause__ or error.__context__
    return None


def _write_checkpoint(
    root,
    final,
    iteration,
    model_chunks,
    optimizer,
    scheduler,
    *,
    consumed_samples,
    regularizer,
    run_config,
    data_parallel_size,
    fully_parallel=False,
    fully_reshardable=False,
    async_saves=None,
) -> None:
    partial = final + PARTIAL_SUFFIX
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()

    # With --overlap-param-gather the last step's weights reach the other ranks' shards only in
    # the next forward pass; gather them now or another rank's shards are saved one step stale.
    sync_params(model_chunks)
    metadata = content_metadata(model_chunks, fully_reshardable)
    state = _sharded_state(
        model_chunks, optimizer, is_loading=False, rng=_rng_state(), metadata=metadata
    )
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        regularizer=regularizer.state_dict() if regularizer is not None else None,
        run_config=run_config,
        data_parallel_size=data_parallel_size,
        optimizer_saved=optimizer is not None,
    )
    strategy = get_default_save_sharded_strategy()
    if fully_parallel:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    request = dist_checkpointing.save(
        state,
        partial,
        sharded_strategy=strategy,
        content_metadata=metadata,
        async_sharded_save=async_saves is not None,
    )

    def put_into_place():
        dist.barrier()
        if dist.get_rank() == 0:
            if os.path.exists(final):  # saving the same iteration again
                shutil.rmtree(final)
            os.replace(partial, final)
            write_latest_iteration(root, iteration)
        dist.barrier()

    if async_saves is None:
        put_into_place()
    else:
        request.add_finalize_fn(put_into_place)
        async_saves.schedule(request, root, final)


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
    model_config: Optional[ModelConfig] = None,
    fully_parallel: bool = False,
) -> Optional[dict]:
    """Restore the newest whole checkpoint under ``root`` into the given objects.

    ``load_training_state=False`` restores the weights but not the LR schedule nor the ReMoE
    coefficient (a new run from these weights). With ``model_config`` (the model the chunks
    were built from), a checkpoint of another architecture is refused in one line naming the
    flags that differ.

    Returns ``{"iteration", "consumed_samples", "run_config", "rng_restored", "directory",
    "skipped"}`` (``skipped``: the newer checkpoints that were damaged, with the reason), or None
    when ``root`` holds no checkpoint (a fresh run). RNG states are restored only under the same
    parallel layout they were saved with. Raises CheckpointError when no checkpoint is whole.
    ``fully_parallel``: each data-parallel rank reads a part of the replicated tensors, and the
    ranks exchange them.
    """
    latest = latest_iteration(root)
    candidates = saved_iterations(root)
    if latest is not None:  # the pointer's checkpoint first, then the older ones
        candidates = [latest] + [i for i in candidates if i < latest]
    skipped = []
    for iteration in candidates:
        directory = checkpoint_dir(root, iteration)
        problem = checkpoint_problem(directory)
        if problem is None:
            restored = _load(
                directory,
                model_chunks,
                optimizer,
                scheduler,
                regularizer=regularizer,
                load_optimizer=load_optimizer,
                load_rng=load_rng,
                load_training_state=load_training_state,
                model_config=model_config,
                fully_parallel=fully_parallel,
            )
            return {**restored, "directory": directory, "skipped": skipped}
        skipped.append((directory, problem))
    if skipped:
        raise CheckpointError(
            f"no checkpoint under {root} loads: "
            + "; ".join(f"{directory}: {problem}" for directory, problem in skipped)
        )
    return None


def _load(
    directory,
    model_chunks,
    optimizer,
    scheduler,
    *,
    regularizer,
    load_optimizer,
    load_rng,
    load_training_state,
    model_config=None,
    fully_parallel=False,
) -> dict:
    common = dist_checkpointing.load_common_state_dict(directory)
    megatron_lm = megatron_lm_checkpoints.is_megatron_lm_state(common)
    run_config = common.get("run_config") or {}
    if megatron_lm:  # (megatron_lm_checkpoints: the common state, said otherwise)
        saved = megatron_lm_checkpoints.training_state(
            common, regularizer.target_sparsity if regularizer is not None else None
        )
        args = common["args"]
        saved_parallel = {
            name: getattr(args, name, 1)
            for name in (
                "tensor_model_parallel_size",
                "pipeline_model_parallel_size",
                "expert_model_parallel_size",
            )
        }
        optimizer_saved = common.get("optimizer") is not None
        if model_config is not None:
            _check_same_fields(
                directory, megatron_lm_checkpoints.model_fields(common), model_config
            )
    else:
        saved = {
            key: common.get(key)
            for key in ("iteration", "consumed_samples", "scheduler", "regularizer")
        }
        saved_parallel = run_config.get("parallel") or {}
        optimizer_saved = common.get("optimizer_saved")
        if model_config is not None:
            check_same_architecture(directory, run_config.get("model"), model_config)
    # (Megatron-LM's RNG states are laid out per PP x TP rank: not restored)
    rng_wanted = (
        load_rng
        and not megatron_lm
        and _same_layout(saved_parallel, common.get("data_parallel_size"))
    )
    # Checkpoints written before content metadata existed used megatron's defaults ({}).
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    load_optimizer = load_optimizer and optimizer is not None and optimizer_saved
    if load_optimizer:
        _check_optimizer_layout(directory, metadata, content_metadata(model_chunks), saved_parallel)
        _check_optimizer_count(directory, common.get("optimizer"), optimizer)
    template = _sharded_state(
        model_chunks,
        optimizer if load_optimizer else None,
        is_loading=True,
        rng=None,
        metadata=metadata,
        directory=directory,
    )
    if not rng_wanted:
        del template["rng_state"]
    strategy = None
    if fully_parallel:
        strategy = FullyParallelLoadStrategyWrapper(
            get_default_load_sharded_strategy(directory),
            parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
    state = dist_checkpointing.load(template, directory, sharded_strategy=strategy)

    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        state[key].pop("moe_relu_l1_reg_coeff", None)  # the fork's lambda: saved["regularizer"]
        _unwrap(chunk).load_state_dict(state[key])
    if load_optimizer:
        # Without grad mode: an fp32 model under the distributed optimizer has main weights that
        # are views of the parameters, which megatron-core then copies into in place.
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        restore_adam_steps(optimizer)
    elif optimizer is not None:
        # The fp32 main weights of a bf16 or distributed optimizer are copies of the model's;
        # refresh them from the weights just loaded (Megatron-LM does the same).
        optimizer.reload_model_params()
    if load_training_state and scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if load_training_state and regularizer is not None and saved["regularizer"] is not None:
        regularizer.load_state_dict(saved["regularizer"])
    if rng_wanted:
        _set_rng_state(
            state["rng_state"].data if hasattr(state["rng_state"], "data") else state["rng_state"]
        )
    return dict(
        iteration=saved["iteration"],
        consumed_samples=saved["consumed_samples"],
        run_config=run_config,
        rng_restored=rng_wanted,
        megatron_lm=megatron_lm,
    )


def _check_optimizer_layout(
    directory: str, saved: dict, current: dict, saved_parallel: dict
) -> None:
    """One clear error when the saved optimizer state cannot load into this run's optimizer."""
    saved_type = saved.get("distrib_optim_sharding_type")
    current_type = current.get("distrib_optim_sharding_type")
    if saved and bool(saved_type) != bool(current_type):
        how = "with" if saved_type else "without"
        raise ValueError(
            f"{directory} holds optimizer state saved {how} --use-distributed-optimizer; resume "
            f"{how} it, or load the weights alone with --no-load-optim"
        )
    if saved_type == "dp_reshardable":
        layout = (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        )
        now = _model_parallel_sizes()
        before = tuple(saved_parallel.get(name, 1) for name in layout)
        if before != now:
            raise ValueError(
                f"{directory} holds distributed-optimizer state for TP/PP/EP {before}, this run is "
                f"{now}; this distributed-optimizer state only moves to another data-parallel "
                "size (save with --dist-ckpt-optim-fully-reshardable for any layout). Load the "
                "weights alone with --no-load-optim, or resume with the saved layout"
            )


def _check_optimizer_count(directory: str, saved: Optional[dict], optimizer) -> None:
    """One clear error when the checkpoint's optimizer is chained otherwise than this run's:
    megatron-core loads a state only into as many (chained) optimizers as saved it."""
    if not isinstance(saved, dict):
        return
    saved_count = len(saved) if saved and all(isinstance(key, int) for key in saved) else 1
    count = len(getattr(optimizer, "chained_optimizers", [optimizer]))
    if saved_count != count:
        raise ValueError(
            f"{directory} holds the state of {saved_count} optimizer(s), this run has {count}: "
            "expert parallelism (EP > 1) gives the expert parameters an optimizer of their own, "
            "and megatron-core moves optimizer state only between runs that both have it or both "
            "have not. Resume with an EP on the same side of 1, or load the weights alone with "
            "--no-load-optim"
        )


def _model_parallel_sizes() -> tuple[int, int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )


def _same_layout(saved_parallel: dict, data_parallel_size: Optional[int]) -> bool:
    sizes, _ = _layout()
    saved = (
        saved_parallel.get("pipeline_model_parallel_size"),
        saved_parallel.get("tensor_model_parallel_size"),
        data_parallel_size,
    )
    return saved == sizes
