"""Memory per log window: the process's resident memory and, on a GPU, torch's allocator, each the
maximum over ranks (the rank that runs out is the one that matters: under pipeline parallelism
the first stage holds the most activations).

Record keys (GB): ``memory_rss_gb`` and ``memory_rss_peak_gb`` (the process, now and its peak
since start); on CUDA also ``memory_allocated_gb``, ``memory_reserved_gb`` (now) and
``memory_max_allocated_gb``, ``memory_max_reserved_gb`` (the window's peaks: torch's peak
statistics restart after each window).
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch
import torch.distributed as dist

GB = 1024**3

# Megatron-LM's tensorboard tags (--log-memory-to-tensorboard) of the record's keys, in bytes.
MEGATRON_LM_MEMORY_TAGS = {
    "memory_reserved_gb": "mem-reserved-bytes",
    "memory_allocated_gb": "mem-allocated-bytes",
    "memory_max_allocated_gb": "mem-max-allocated-bytes",
}


def _peak_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, else KiB


def local_memory_bytes(device: torch.device) -> dict:
    """This rank's memory now (bytes) by record key; on CUDA the window's peaks restart."""
    rss = float(psutil.Process().memory_info().rss)
    memory = dict(memory_rss_gb=rss,
                  memory_rss_peak_gb=max(rss, _peak_rss_bytes()))  # (the kernel's peak may lag)
    if device.type == "cuda":
        memory.update(
            memory_allocated_gb=float(torch.cuda.memory_allocated(device)),
            memory_reserved_gb=float(torch.cuda.memory_reserved(device)),
            memory_max_allocated_gb=float(torch.cuda.max_memory_allocated(device)),
            memory_max_reserved_gb=float(torch.cuda.max_memory_reserved(device)))
        torch.cuda.reset_peak_memory_stats(device)
    return memory


def memory_record(device: torch.device) -> dict:
    """This window's memory (GB), the maximum over all ranks (every rank must call)."""
    memory = local_memory_bytes(device)
    maxima = torch.tensor(list(memory.values()), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    return {name: value / GB for name, value in zip(memory, maxima.tolist())}


def peak_memory_gb(record: dict) -> float:
    """The figure the console shows: the device's window peak on a GPU, else the process's."""
    return record.get("memory_max_allocated_gb", record["memory_rss_peak_gb"])


def megatron_lm_memory_scalars(record: dict) -> dict:
    """Megatron-LM's memory tags of the record, in bytes."""
    return {tag: record[key] * GB for key, tag in MEGATRON_LM_MEMORY_TAGS.items() if key in record}
