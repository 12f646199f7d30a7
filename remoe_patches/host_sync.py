"""Count the calls that make the host wait for the device.

``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)`` and ``nonzero`` read device values on the
host, so on a GPU each one stalls the CPU until the GPU catches up. ReMoE's router, regularizer
and coefficient update must make none of them; tests and benchmarks check that with
``HostSyncCounter``, which works on CPU too (it sees the calls, not the stalls).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

SYNCING_CALLS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
}


class HostSyncCounter(TorchFunctionMode):
    """Inside ``with HostSyncCounter() as syncs:``, ``syncs.counts`` tallies syncing calls.

    With ``raise_on_sync=True`` the first such call raises instead, pointing at its caller.
    """

    def __init__(self, raise_on_sync: bool = False):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.counts: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = SYNCING_CALLS.get(func)
        if name is not None:
            if self.raise_on_sync:
                raise RuntimeError(f"host synchronisation: tensor.{name}()")
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))
