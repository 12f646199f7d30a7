"""Stop a run cleanly on SIGTERM or Ctrl-C (``--exit-signal-handler``, Megatron-LM's flag).

Slurm's pre-emption and time limit send SIGTERM (then SIGKILL after ``KillWait``, 30 s by
default; ``sbatch --signal=TERM@120`` warns earlier), and a Ctrl-C sends SIGINT to every process
of the terminal's job. With the handler installed a signal only sets a flag; after each step the
ranks agree (a MAX all-reduce, so one signalled rank is enough) and every rank leaves the loop
at the same iteration, after which the run saves a checkpoint and exits with code 0. A second
signal of the same kind is not caught: a second Ctrl-C interrupts at once.

A checkpoint being written is not interrupted, with or without the handler (``signals_held``):
megatron-core writes it from forked writer processes, and a signal that stops them or their
parent midway leaves the parent waiting for them forever, or them running on as orphans. The
signal takes effect once the checkpoint is complete (and marked the latest).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
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


@contextlib.contextmanager
def signals_held(what: str, signals=CAUGHT):
    """Hold SIGTERM and SIGINT while the block runs (``what``: for the note printed on the first
    one); when it ends, each one received acts as it would have: the previous handler runs
    (``KeyboardInterrupt``, ``ExitSignals``' flag) or the default action ends the process.

    Processes forked inside the block (megatron's checkpoint writers) inherit the holding handler
    and ignore the signals: a Ctrl-C reaches the terminal's whole process group, and they finish
    their files for the parent, which then completes the checkpoint.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers (and receives the signals)
        return
    owner = os.getpid()
    received = []

    def hold(signum, frame):
        if os.getpid() != owner:  # a forked writer: let it finish its file
            return
        if not received:
            # os.write, not print: a handler that prints while the interrupted code prints
            # raises a reentrant-call error
            os.write(
                2,
                f" note: {signal.Signals(signum).name} received while {what}; stopping "
                "once it is complete\n".encode(),
            )
        received.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, left in place
                signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
