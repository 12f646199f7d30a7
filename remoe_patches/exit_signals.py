"""Stop a run cleanly on SIGTERM or Ctrl-C (``--exit-signal-handler``, Megatron-LM's flag).

Slurm's pre-emption and time limit send SIGTERM (then SIGKILL after ``KillWait``, 30 s by
default; ``sbatch --signal=TERM@120`` warns earlier), and a Ctrl-C sends SIGINT to every process
of the terminal's job. With the handler installed a signal only sets a flag; after each step the
ranks agree (a MAX all-reduce, so one signalled rank is enough) and every rank leaves the loop
at the same iteration, after which the run saves a checkpoint and exits with code 0. A second
signal of the same kind is not caught: a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

CAUGHT = (signal.SIGTERM, signal.SIGINT)


class ExitSignals:
    """Install with ``ExitSignals()``; ask ``received(device)`` after each step; ``close()``."""

    def __init__(self, signals=CAUGHT):
        self._received = 0
        self._previous = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = signum
        signal.signal(signum, self._previous[signum])  # the next one acts as if uncaught

    def received(self, device) -> Optional[str]:
        """The name of a signal any rank received since start, or None (a collective call)."""
        flag = torch.tensor(self._received, dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None

    def close(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
