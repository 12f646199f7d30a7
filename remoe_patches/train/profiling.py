"""Profiling a few training steps, as Megatron-LM's ``--profile`` does.

``--profile`` profiles the steps that start at global iteration ``--profile-step-start`` and
end at ``--profile-step-end`` (steps start+1 .. end), on the global ranks ``--profile-ranks``:

- with ``--use-pytorch-profiler``, torch's profiler (CPU, and CUDA where there is one) writes a
  trace per rank into ``--tensorboard-dir`` (else ``<save>/profile``) that TensorBoard's
  profiler plugin and Perfetto (ui.perfetto.dev) open;
- without it, CUDA's profiler range opens and closes around those steps, which is what
  ``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`` records (CUDA only).

``--record-memory-history`` records CUDA allocations from the start and writes the snapshot to
``--memory-snapshot-path`` at each log line (pytorch.org/memory_viz opens it; CUDA only).
"""

from __future__ import annotations

import os
import pickle
from typing import Optional

import torch


class ProfilingError(ValueError):
    """A profiling flag this machine cannot honour; the message says what to change."""


def cuda_profiler_start() -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())


def cuda_profiler_stop() -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())


class StepProfiler:
    """Starts and stops the chosen profiler around the chosen steps of one rank."""

    def __init__(
        self, *, start: int, end: int, pytorch: bool, trace_dir: Optional[str], cuda: bool
    ):
        self.start, self.end = start, end
        self.pytorch, self.trace_dir, self.cuda = pytorch, trace_dir, cuda
        self._profiler = None
        self._nvtx = None
        self.trace_written = False

    @classmethod
    def for_run(
        cls, logging, *, rank: int, save: Optional[str], device: torch.device
    ) -> Optional["StepProfiler"]:
        """The profiler ``logging`` (a LoggingConfig) asks of global rank ``rank``; None if
        none."""
        if logging.profile and not logging.use_pytorch_profiler and device.type != "cuda":
            raise ProfilingError(
                "--profile without --use-pytorch-profiler opens CUDA's profiler "
                "range for nsys, and this run has no GPU: add "
                "--use-pytorch-profiler"
            )
        if not logging.profile or rank not in logging.profile_ranks:
            return None
        trace_dir = logging.tensorboard_dir or (os.path.join(save, "profile") if save else None)
        return cls(
            start=logging.profile_step_start,
            end=logging.profile_step_end,
            pytorch=logging.use_pytorch_profiler,
            trace_dir=trace_dir,
            cuda=device.type == "cuda",
        )

    def before_step(self, iteration: int) -> None:
        """Called with the steps done so far, before the next one."""
        if iteration != self.start:
            return
        if self.pytorch:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(
                activities=activities,
                record_shapes=True,
                with_stack=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir),
            )
            self._profiler.__enter__()
        else:
            cuda_profiler_start()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        """Called with the steps done so far, after a step."""
        if iteration == self.end:
            self.stop()

    def stop(self) -> None:
        """End a profile under way (also when the run stops inside the profiled steps)."""
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)  # writes the trace
            self._profiler = None
            self.trace_written = True
        if self._nvtx is not None:
            self._nvtx.__exit__(None, None, None)
            self._nvtx = None
            cuda_profiler_stop()


def start_memory_history(logging, device: torch.device) -> None:
    """--record-memory-history: record CUDA allocations (with stacks) from here on."""
    if not logging.record_memory_history:
        return
    if device.type != "cuda":
        raise ProfilingError(
            "--record-memory-history records CUDA allocations, and this run "
            "has no GPU: drop the flag"
        )
    torch.cuda.memory._record_memory_history(max_entries=100_000)


def write_memory_snapshot(logging, is_last_rank: bool) -> None:
    """The allocations recorded so far, to --memory-snapshot-path (Megatron-LM's last rank)."""
    if logging.record_memory_history and is_last_rank:
        snapshot = torch.cuda.memory._snapshot()
        with open(logging.memory_snapshot_path, "wb") as f:
            pickle.dump(snapshot, f)
