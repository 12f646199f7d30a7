"""What this machine and launcher do to a run that the flags cannot show (``machine_notes``):
``pretrain_gpt.py`` prints each as a one-line note at start-up, where a GPU user would otherwise
find out hours later.

- torchrun SIGKILLs its ranks 30 s after it forwards a SIGTERM unless
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says otherwise (torch >= 2.12; the launchers set it), so
  ``--exit-signal-handler``'s last step and save can be cut short at 978M.
- Below sm90 (an A100, the paper's hardware) torch's ``grouped_mm`` has no fused kernel: the
  grouped-GEMM experts fall back to one GEMM per expert after a host read of the offsets, as
  megatron's SequentialMLP does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import torch

TORCHRUN_DEFAULT_GRACE_S = 30
GRACE_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def machine_notes(config, *, environ: Mapping[str, str] = os.environ,
                  transformer_engine: bool = False) -> list:
    """The notes for ``config`` (a RunConfig) on this machine, each one line."""
    notes = []
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
        return (f"--exit-signal-handler: torchrun of torch {torch.__version__} SIGKILLs the "
                f"ranks {TORCHRUN_DEFAULT_GRACE_S} s after it forwards a SIGTERM, so the last "
                f"step and its save must fit in that; torch >= 2.12 reads {GRACE_ENV}, or "
                "signal the ranks (pkill -TERM -f pretrain_gpt.py) rather than torchrun")
    if not environ.get(GRACE_ENV):
        return (f"--exit-signal-handler: torchrun SIGKILLs the ranks "
                f"{TORCHRUN_DEFAULT_GRACE_S} s after it forwards a SIGTERM, which can cut the "
                f"last save short; export {GRACE_ENV}=300 (the launchers in scripts/ do)")
    return None


def grouped_mm_note() -> Optional[str]:
    """A note on a CUDA device without a fused grouped GEMM (compute capability below 9.0)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if major >= 9:
        return None
    return (f"--moe-grouped-gemm on {torch.cuda.get_device_name()} (sm{major}{minor}): torch's "
            "grouped_mm has no fused kernel below sm90 and runs one GEMM per expert after a "
            "host read of the offsets, as megatron's SequentialMLP does (the same numbers; the "
            "speed of both is unmeasured on such a card)")
