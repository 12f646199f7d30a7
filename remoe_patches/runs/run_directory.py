"""What a run directory (``pretrain_gpt.py --save DIR``) holds, and where: its one description.

Layout (the checkpoint names are Megatron-LM's)::

    DIR/
        iter_0000100/                      a megatron distributed checkpoint (metadata.json, ...)
        iter_0000200.partial/              a checkpoint being written, renamed when whole
        latest_checkpointed_iteration.txt  the iteration of the latest whole checkpoint
        metrics.jsonl                      one JSON record per logged step or evaluation
        arguments.txt                      the last launch's resolved arguments
        wandb/                             the W&B run (--wandb-project without --wandb-save-dir)
        tensorboard/                       sweep runs' --tensorboard-dir
        config.yaml                        a sweep run's flags (its pretrain_gpt.py --config)
        train.log                          a sweep run's console output (local launcher)
        DONE                               a sweep run that reached --train-iters
        zero_shot.json                     the zero-shot scores tools/sweep.py --collect reads
        analysis/                          tools/analyze_routing.py's plots and tables

Paths come back as strings (``os.path.join`` of what is given). Standard library only: the
torch-free tools (sweeps, run metrics, gpu-check) read runs through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

CHECKPOINT_PREFIX = "iter_"
PARTIAL_SUFFIX = ".partial"
CHECKPOINT_METADATA = "metadata.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
ARGUMENTS_FILE = "arguments.txt"  # the last launch's resolved arguments
DONE_FILE = "DONE"
ZERO_SHOT_FILE = "zero_shot.json"
ANALYSIS_DIR = "analysis"

_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d{7})$")


def checkpoint_dir(run_dir, iteration: int) -> str:
    """The directory of checkpoint ``iteration`` (``DIR/iter_0000100``)."""
    return os.path.join(run_dir, f"{CHECKPOINT_PREFIX}{iteration:07d}")


def is_checkpoint_dir(path) -> bool:
    """Whether ``path`` is one megatron distributed checkpoint (it holds ``metadata.json``)."""
    return os.path.isfile(os.path.join(path, CHECKPOINT_METADATA))


def run_dir_of(path) -> str:
    """The run directory of ``path``: its parent for an ``iter_*`` checkpoint, else itself."""
    path = Path(path)
    return str(path.parent if path.name.startswith(CHECKPOINT_PREFIX) else path)


def latest_pointer_path(run_dir) -> str:
    """The file that names the latest checkpointed iteration (megatron's tracker file)."""
    return os.path.join(run_dir, LATEST_FILE)


def latest_iteration(run_dir: Optional[str]) -> Optional[int]:
    """The iteration the latest pointer names; None without one; ValueError when garbled."""
    if not run_dir:
        return None
    path = latest_pointer_path(run_dir)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} should hold an iteration number, found {text!r}") from None


def write_text_atomically(path: str, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part (a crash leaves the old)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_latest_iteration(run_dir, iteration: int) -> None:
    """Point the latest pointer at ``iteration``, atomically (a crash leaves the old one)."""
    write_text_atomically(latest_pointer_path(run_dir), str(iteration))


def write_arguments(run_dir, listing: Sequence[str]) -> str:
    """The launch's resolved arguments (Megatron-LM's start-up listing) into ``run_dir``."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ARGUMENTS_FILE)
    write_text_atomically(path, "\n".join(listing) + "\n")
    return path


def saved_iterations(run_dir: Optional[str]) -> list[int]:
    """The iterations of the written checkpoint directories (not ``.partial``), newest first."""
    if not run_dir or not os.path.isdir(run_dir):
        return []
    found = (_CHECKPOINT_NAME.match(name) for name in os.listdir(run_dir))
    return sorted(
        (int(m[1]) for m in found if m and os.path.isdir(os.path.join(run_dir, m[0]))), reverse=True
    )


def has_checkpoint(run_dir: Optional[str]) -> bool:
    """Whether ``run_dir`` holds anything to resume from (a latest pointer or a checkpoint)."""
    return latest_iteration(run_dir) is not None or bool(saved_iterations(run_dir))


def metrics_path(run_dir) -> str:
    """The run's metrics log, ``metrics.jsonl``."""
    return os.path.join(run_dir, METRICS_FILE)


def config_path(run_dir) -> str:
    """The config a sweep wrote for the run, ``config.yaml``."""
    return os.path.join(run_dir, CONFIG_FILE)


def done_path(run_dir) -> str:
    """The ``DONE`` marker a sweep writes once the run reached its ``--train-iters``."""
    return os.path.join(run_dir, DONE_FILE)


def is_done(run_dir) -> bool:
    """Whether the run is marked ``DONE``."""
    return os.path.isfile(done_path(run_dir))
