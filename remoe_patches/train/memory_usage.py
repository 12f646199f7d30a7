"""Memory per log window: the process's resident memory and, on a GPU, torch's allocator, each the
maximum over ranks (the rank that runs out is the one that matters: under pipeline parallelism
the first stage holds the most activations).

Record keys (GB): ``memory_rss_gb`` and ``memory_rss_peak_gb`` (the process, now and its peak
since start); on CUDA also ``memory_allocated_gb``, ``memory_reserved_gb`` (now) and
``memory_max_allocated_gb``, ``memory_max_reserved_gb`` (the window's peaks: torch's peak
statistics restart after each window).
"""

from __future__ import annotations

import os
import resource
import sys

import torch
import torch.distributed as dist

GB = 1024**3


def _peak_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, else KiB


def _rss_bytes() -> float:
    try:  # (psutil is a dependency, but a run without --save works without it)
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    return float(psutil.Process().memory_info().rss)


def local_memory_bytes(device: torch.device) -> dict:
    """This rank's memory now (bytes) by record key; on CUDA the window's peaks restart."""
    rss = _rss_bytes()
    memory = dict(
        memory_rss_gb=rss, memory_rss_peak_gb=max(rss, _peak_rss_bytes())
    )  # (the kernel's peak may lag)
    if device.type == "cuda":
        memory.update(
            memory_allocated_gb=float(torch.cuda.memory_allocated(device)),
            memory_reserved_gb=float(torch.cuda.memory_reserved(device)),
            memory_max_allocated_gb=float(torch.cuda.max_memory_allocated(device)),
            memory_max_reserved_gb=float(torch.cuda.max_memory_reserved(device)),
        )
        torch.cuda.reset_peak_memory_stats(device)
    return memory


def memory_record(device: torch.device) -> dict:
    """This window's memory (GB), the maximum over all ranks (every rank must call)."""
    memory = local_memory_bytes(device)
    maxima = torch.tensor(list(memory.values()), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    return {name: value / GB for name, value in zip(memory, maxima.tolist())}
