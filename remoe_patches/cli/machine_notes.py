"""What this machine and launcher do to a run that the flags cannot show (``machine_notes``):
``pretrain_gpt.py`` prints each as a one-line note at start-up, where a GPU user would otherwise
find out hours later.

- torchrun SIGKILLs its ranks 30 s after it forwards a SIGTERM unless
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says otherwise (torch >= 2.12; the launchers set it), so
  ``--exit-signal-handler``'s last step and save can be cut short at 978M.
- The GPU's memory against the weights, gradients and optimizer state the run keeps there
  (Megatron-LM's estimate): refused in one line when they alone cannot fit (978M on one GPU),
  a note when they fill much of it, since ReMoE's stage I (routing still dense) then adds the
  run's largest activations on top (469M on one 80 GB card).
- Below sm90 (an A100, the paper's hardware) torch's ``grouped_mm`` has no fused kernel: the
  grouped-GEMM experts fall back to one GEMM per expert after a host read of the offsets, as
  megatron's SequentialMLP does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import torch

from remoe_patches.config.model_config import ConfigError

TORCHRUN_DEFAULT_GRACE_S = 30
GRACE_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def machine_notes(
    config,
    *,
    environ: Mapping[str, str] = os.environ,
    transformer_engine: bool = False,
    world_size: int = 1,
    gpu_memory_bytes: Optional[int] = None,
) -> list:
    """The notes for ``config`` (a RunConfig) on this machine, each one line; ConfigError when
    the run cannot fit (``gpu_memory_bytes``: one GPU's, None on CPU)."""
    notes = []
    if gpu_memory_bytes:
        note = memory_note(config, world_size, gpu_memory_bytes)
        if note:
            notes.append(note)
    if config.training.exit_signal_handler:
        note = torchrun_grace_note(environ)
        if note:
            notes.append(note)
    if config.model.is_moe and config.model.moe_grouped_gemm and not transformer_engine:
        note = grouped_mm_note()
        if note:
            notes.append(note)
    return notes


def torchrun_can_wait_longer() -> bool:
    """Whether this torch's torchrun reads ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (torch >= 2.12)."""
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}


def torchrun_grace_note(environ: Mapping[str, str]) -> Optional[str]:
    """A note when the ranks run under torchrun with its 30 s grace after a SIGTERM."""
    if "TORCHELASTIC_RUN_ID" not in environ:  # not under torchrun: the signal reaches the rank
        return None
    if not torchrun_can_wait_longer():
        return (
            f"--exit-signal-handler: torchrun of torch {torch.__version__} SIGKILLs the "
            f"ranks {TORCHRUN_DEFAULT_GRACE_S} s after it forwards a SIGTERM, so the last "
            f"step and its save must fit in that; torch >= 2.12 reads {GRACE_ENV}, or "
            "signal the ranks (pkill -TERM -f pretrain_gpt.py) rather than torchrun"
        )
    if not environ.get(GRACE_ENV):
        return (
            f"--exit-signal-handler: torchrun SIGKILLs the ranks "
            f"{TORCHRUN_DEFAULT_GRACE_S} s after it forwards a SIGTERM, which can cut the "
            f"last save short; export {GRACE_ENV}=300 (the launchers in scripts/ do)"
        )
    return None


def grouped_mm_note() -> Optional[str]:
    """A note on a CUDA device without a fused grouped GEMM (compute capability below 9.0)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if major >= 9:
        return None
    return (
        f"--moe-grouped-gemm on {torch.cuda.get_device_name()} (sm{major}{minor}): torch's "
        "grouped_mm has no fused kernel below sm90 and runs one GEMM per expert after a "
        "host read of the offsets, as megatron's SequentialMLP does (the same numbers; the "
        "speed of both is unmeasured on such a card)"
    )


def resident_bytes_per_gpu(config, world_size: int) -> float:
    """The weights, gradients and optimizer state one GPU keeps, by Megatron-LM's estimate
    (``theoretical_memory_usage``: 18 bytes a parameter, 6 + 12 / DP with the distributed
    optimizer), the experts split over EP and everything over TP x PP."""
    model, parallel = config.model, config.parallel
    total = model.num_parameters()
    experts = 0
    if model.is_moe:
        experts = (
            model.num_layers
            * model.total_experts
            * 3
            * model.hidden_size
            * model.expert_ffn_hidden_size
        )
    tp_pp = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    per_gpu = (total - experts) / tp_pp + experts / (tp_pp * parallel.expert_model_parallel_size)
    dp = parallel.data_parallel_size(world_size)
    per_parameter = 6 + 12 / dp if config.training.use_distributed_optimizer else 18
    return per_gpu * per_parameter


def memory_note(config, world_size: int, gpu_memory_bytes: int) -> Optional[str]:
    """ConfigError when the resident state alone exceeds the GPU; a note when it fills 40% of
    it; else None."""
    resident = resident_bytes_per_gpu(config, world_size)
    gib = 2**30
    share = (
        f"the weights, gradients and optimizer state take about {resident / gib:.1f} GiB "
        f"of each GPU's {gpu_memory_bytes / gib:.0f} GiB (Megatron-LM's estimate, "
        f"{world_size} GPU{'s' if world_size > 1 else ''})"
    )
    if resident > gpu_memory_bytes:
        raise ConfigError(
            f"the model does not fit: {share}; use more GPUs with "
            "--use-distributed-optimizer, or expert/tensor parallelism"
        )
    if resident < 0.4 * gpu_memory_bytes:
        return None
    stage = (
        " and ReMoE's stage I (routing still dense for the first ~100 steps, several "
        "experts per token) adds the run's largest activations"
        if config.model.kind.adaptive_l1
        else ""
    )
    return f"{share}{stage}; if it runs out of memory: {less_memory(config)}"


def less_memory(config) -> str:
    """What lowers a run's GPU memory, beginning with what ``config`` does not do yet."""
    fixes = ["a smaller --micro-batch-size", "more GPUs with --use-distributed-optimizer"]
    if config.layers.recompute_granularity is None:
        fixes.insert(0, "--moe-layer-recompute (or --recompute-granularity full)")
    return ", ".join(fixes)
