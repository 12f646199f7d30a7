"""Run a function on several CPU processes joined by a gloo process group (the tests' cluster)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp

from remoe_patches.runtime.parallel import free_port


def _worker(rank, world_size, port, out_dir, fn, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(rank=rank, world_size=world_size, **kwargs)
        torch.save({"ok": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise


def run_on_ranks(fn, world_size: int, tmp_dir, **kwargs) -> list:
    """``fn(rank=, world_size=, **kwargs)`` on ``world_size`` spawned processes; their results."""
    out_dir = os.path.join(str(tmp_dir), f"ranks-{fn.__name__}-{free_port()}")
    os.makedirs(out_dir)
    port = free_port()
    try:
        mp.spawn(
            _worker, args=(world_size, port, out_dir, fn, kwargs), nprocs=world_size, join=True
        )
    finally:
        outcomes = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            outcomes.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
        errors = [o["error"] for o in outcomes if "error" in o]
        if errors:
            raise AssertionError("a rank failed:\n" + errors[0])
    return [o["ok"] for o in outcomes]
