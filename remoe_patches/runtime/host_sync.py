"""Count the calls that make the host wait for the device.

``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``/``int()``/``float()`` of a tensor and
``nonzero`` read device values on the host, so on a GPU each one stalls the CPU until the GPU
catches up. ReMoE's router, regularizer and coefficient update must make none of them; tests and
benchmarks check that with

- ``HostSyncCounter``, a torch function mode that sees those calls from Python, on any device
  (on CPU it sees the calls, not stalls);
- ``CudaSyncCounter``, which counts what CUDA itself reports as synchronizing (PyTorch's sync
  debug mode), on GPUs.

Both tally each sync under the ``scope`` that is open when it happens (``with
counter.scope("router"):``), and under its ``source``: the part of the step whose code made it
(the innermost calling frame that ``SOURCES`` knows: loop, optimizer, dispatcher, experts,
router, regularizer; else "other"), so a whole training step can be counted and told apart.
``sync_counter(device)`` picks the one for the device.

Not counted: torch's optimizers reading their step counts (``torch.optim.optimizer._get_value``).
Outside capturable or fused mode torch keeps those on the host, also when the model is on a GPU,
so reading them waits for nothing; on CPU they would otherwise look like syncs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

SYNCING_CALLS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
}
OUTSIDE_SCOPES = "other"

SOURCES = (
    ("regularizer", ("remoe_patches/routing/regularizer.py",)),
    (
        "router",
        (
            "remoe_patches/model/routers/relu_router.py",
            "remoe_patches/routing/relu_gates.py",
            "megatron/core/transformer/moe/router.py",
        ),
    ),
    (
        "dispatcher",
        (
            "remoe_patches/model/token_dispatch.py",
            "megatron/core/transformer/moe/token_dispatcher.py",
            "megatron/core/transformer/moe/moe_utils.py",
        ),
    ),
    (
        "experts",
        (
            "remoe_patches/model/local_layers.py",
            "megatron/core/transformer/moe/experts.py",
            "megatron/core/transformer/moe/moe_layer.py",
        ),
    ),
    ("optimizer", ("megatron/core/optimizer/", "torch/optim/")),
    ("loop", ("remoe_patches/train/training_step.py", "remoe_patches/train/training.py")),
)
"""Which part of a step a sync belongs to: the first rule matching a file of the call stack,
innermost frame first (path fragments, with ``/`` separators)."""


def sync_source(frame) -> str:
    """The ``SOURCES`` name of the code that called into torch from ``frame`` outwards."""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for source, fragments in SOURCES:
            if any(fragment in path for fragment in fragments):
                return source
        frame = frame.f_back
    return OUTSIDE_SCOPES


def _reads_host_step_count(frame) -> bool:
    """Whether the sync is torch's optimizer reading a step count it keeps on the host."""
    while frame is not None and frame.f_code.co_filename.replace(os.sep, "/").endswith(
        ("torch/_tensor.py", "torch/overrides.py")
    ):
        frame = frame.f_back
    return (
        frame is not None
        and frame.f_code.co_name == "_get_value"
        and frame.f_code.co_filename.replace(os.sep, "/").endswith("torch/optim/optimizer.py")
    )


class _Scopes:
    """The scope bookkeeping both counters share."""

    def _reset_scopes(self) -> None:
        self.counts: Counter = Counter()  # by kind of call
        self.by_scope: Counter = Counter()
        self.by_source: Counter = Counter()
        self._open_scope = OUTSIDE_SCOPES

    @property
    def total(self) -> int:
        return sum(self.by_scope.values())

    @contextlib.contextmanager
    def scope(self, name: str):
        """Syncs made inside are tallied under ``name`` (scopes do not nest: the inner wins)."""
        outer, self._open_scope = self._open_scope, name
        try:
            yield self
        finally:
            self._open_scope = outer

    def _tally(self, kind: str, caller=None) -> None:
        self.counts[kind] += 1
        self.by_scope[self._open_scope] += 1
        self.by_source[sync_source(caller)] += 1


class HostSyncCounter(TorchFunctionMode, _Scopes):
    """Inside ``with HostSyncCounter() as syncs:``, ``syncs.counts`` tallies syncing calls.

    With ``raise_on_sync=True`` the first such call raises instead, pointing at its caller.
    """

    def __init__(self, raise_on_sync: bool = False):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self._reset_scopes()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = SYNCING_CALLS.get(func)
        if name is not None:
            caller = sys._getframe(1)
            if _reads_host_step_count(caller):
                return func(*args, **(kwargs or {}))
            if self.raise_on_sync:
                raise RuntimeError(f"host synchronisation: tensor.{name}()")
            self._tally(name, caller)
        return func(*args, **(kwargs or {}))


class CudaSyncCounter(_Scopes):
    """Counts the synchronizing CUDA calls PyTorch reports (``torch.cuda.set_sync_debug_mode``),
    from Python and from inside PyTorch's own kernels alike."""

    _MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        self._reset_scopes()

    def __enter__(self):
        self._previous_mode = torch.cuda.get_sync_debug_mode()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("always", message=f".*{self._MESSAGE}")
        self._previous_show = warnings.showwarning
        warnings.showwarning = self._on_warning
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self._previous_mode)
        warnings.showwarning = self._previous_show
        self._warnings.__exit__(*exc)
        return False

    def _on_warning(self, message, category, filename, lineno, file=None, line=None):
        if self._MESSAGE in str(message):
            self._tally("cuda", sys._getframe(1))
        else:
            self._previous_show(message, category, filename, lineno, file, line)


def sync_counter(device: torch.device):
    """The counter that sees real synchronisations on ``device``."""
    return CudaSyncCounter() if torch.device(device).type == "cuda" else HostSyncCounter()
