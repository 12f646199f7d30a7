"""Where training metrics go: a Megatron-style console line, ``metrics.jsonl``, tensorboard, and a
progress bar on interactive terminals. Only the logging rank (the last one, which holds the loss
under pipeline parallelism) writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from remoe_patches.runs.run_directory import metrics_path


# Megatron-LM's tensorboard tags (megatron/training/training.py, core_v0.16.1) of the record keys
# that have one, written beside ours so that dashboards built on Megatron-LM runs line up; each
# also "<tag> vs samples" where the record has consumed samples. Values in Megatron-LM's units.
MEGATRON_LM_TAGS = {
    "lm_loss": ("lm loss", 1.0),
    "lr": ("learning-rate", 1.0),
    "global_batch_size": ("batch-size", 1.0),
    "grad_norm": ("grad-norm", 1.0),
    "ms_per_iteration": ("iteration-time", 1e-3),  # seconds
    "val_lm_loss": ("lm loss validation", 1.0),
}


# Megatron-LM's tags (--log-memory-to-tensorboard) of memory_usage's record keys, in bytes.
MEGATRON_LM_MEMORY_TAGS = {
    "memory_reserved_gb": "mem-reserved-bytes",
    "memory_allocated_gb": "mem-allocated-bytes",
    "memory_max_allocated_gb": "mem-max-allocated-bytes",
}
GB = 1024**3


# The metrics file holds one object per logged step; evaluation records carry ``val_lm_loss``
# (or ``test_lm_loss``), the number of samples it scored, ``val_samples`` (``test_samples``),
# and with --eval-domains ``val_lm_loss_per_domain`` ({domain: loss}).
class MetricsLog:
    """Writes each record to every configured sink."""

    def __init__(
        self,
        *,
        metrics_dir: Optional[str],
        tensorboard_dir: Optional[str],
        total_iterations: int,
        start_iteration: int,
        enabled: bool,
        wandb_run=None,
        per_layer: bool = False,
        timers: bool = False,
        memory: bool = False,
    ):
        """``per_layer``, ``timers``, ``memory``: also write the record's per-layer lists
        (--moe-per-layer-logging), its timers (--log-timers-to-tensorboard) and its memory
        (--log-memory-to-tensorboard) to tensorboard and W&B; metrics.jsonl holds them always."""
        self.enabled = enabled
        self.per_layer, self.timers, self.memory = per_layer, timers, memory
        self.metrics_path = metrics_path(metrics_dir) if metrics_dir else None
        self.writer = None
        self.progress = None
        self.wandb_run = wandb_run if enabled else None
        if not enabled:
            return
        if self.metrics_path:
            os.makedirs(metrics_dir, exist_ok=True)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(
                total=total_iterations,
                initial=start_iteration,
                unit="it",
                dynamic_ncols=True,
                leave=False,
            )

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def step(self, record: dict) -> None:
        """A training-step record: console line, jsonl, tensorboard scalars."""
        if not self.enabled:
            return
        self.print(format_step_line(record))
        self._write(record)

    def evaluation(self, record: dict) -> None:
        if not self.enabled:
            return
        name = "val_lm_loss" if "val_lm_loss" in record else "test_lm_loss"
        loss = record[name]
        samples = record.get(name.replace("lm_loss", "samples"))
        self.print(
            f" {'validation' if name.startswith('val') else 'test'} at iteration "
            f"{record['iteration']:8d} | lm loss: {loss:.6E} | lm loss PPL: "
            f"{math.exp(min(loss, 20)):.6E}" + (f" | samples: {samples}" if samples else "")
        )
        per_domain = record.get(f"{name}_per_domain", {})
        if per_domain:
            self.print(
                "   lm loss per domain | "
                + " | ".join(f"{domain}: {value:.6E}" for domain, value in per_domain.items())
            )
        self._write(record)

    def advance(self, iterations: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(iterations)

    def _write(self, record: dict) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is None and self.wandb_run is None:
            return
        iteration, samples = record["iteration"], record.get("consumed_samples")
        ours = scalars_of({key: value for key, value in record.items() if self._charted(key)})
        megatron_lm = megatron_lm_scalars(record)
        # Megatron-LM's tags of the timers (ms per step, the max over ranks) and the memory
        if self.timers:
            ours.update({f"{name}-time": ms for name, ms in record.get("timers_ms", {}).items()})
        if self.memory:
            ours.update(megatron_lm_memory_scalars(record))
        if self.writer is not None:
            for tag, value in {**ours, **megatron_lm}.items():
                self.writer.add_scalar(tag, value, iteration)
            if samples is not None:
                for tag, value in megatron_lm.items():
                    self.writer.add_scalar(f"{tag} vs samples", value, samples)
            self.writer.flush()
        if self.wandb_run is not None:  # the same scalars (W&B plots against samples itself)
            self.wandb_run.log({**ours, **megatron_lm}, step=iteration)

    def _charted(self, key: str) -> bool:
        """Whether tensorboard and W&B get the record's ``key``."""
        if key.endswith("_per_layer") or key == "moe_layers":
            return self.per_layer
        if key == "timers_ms":  # under Megatron-LM's names
            return False
        if key.startswith("memory_"):
            return self.memory
        return True

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


PER_EXPERT = ("expert_share_per_layer",)
"""Record keys holding one value per expert of each layer."""


def scalars_of(record: dict) -> dict:
    """The record's finite numbers by key; a per-layer list as ``key/layer_N`` (N the layer
    numbers of ``moe_layers`` where the record has them, else from 1, as in megatron and the
    console's warnings) and per expert (``PER_EXPERT``) as ``key/layer_N/expert_E``; a mapping
    as ``key/name``; ``iteration`` is the step, not a scalar."""
    out = {}
    for key, value in record.items():
        if key in ("iteration", "moe_layers"):
            continue
        if isinstance(value, list):
            layers = record.get("moe_layers") or range(1, len(value) + 1)
            items = {}
            for layer, item in zip(layers, value):
                if key in PER_EXPERT:
                    items.update(
                        {
                            f"{key}/layer_{layer}/expert_{expert}": share
                            for expert, share in enumerate(item)
                        }
                    )
                else:  # (a list here is not per expert: dead experts' numbers)
                    items[f"{key}/layer_{layer}"] = item
        elif isinstance(value, dict):
            items = {f"{key}/{name}": item for name, item in value.items()}
        else:
            items = {key: value}
        out.update(
            {
                tag: item
                for tag, item in items.items()
                if isinstance(item, (int, float)) and math.isfinite(item)
            }
        )
    return out


def megatron_lm_scalars(record: dict) -> dict:
    """Megatron-LM's tags of the record's values, in its units."""
    scalars = {
        tag: record[key] * scale
        for key, (tag, scale) in MEGATRON_LM_TAGS.items()
        if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
    }
    if "lm loss validation" in scalars:
        scalars["lm loss validation ppl"] = math.exp(min(scalars["lm loss validation"], 20))
    return scalars


def megatron_lm_memory_scalars(record: dict) -> dict:
    """Megatron-LM's memory tags of the record, in bytes."""
    return {tag: record[key] * GB for key, tag in MEGATRON_LM_MEMORY_TAGS.items() if key in record}


def peak_memory_gb(record: dict) -> float:
    """The figure the console shows: the device's window peak on a GPU, else the process's."""
    return record.get("memory_max_allocated_gb", record["memory_rss_peak_gb"])


def format_step_line(r: dict) -> str:
    """Megatron-LM's iteration line, with ReMoE's columns when present."""
    parts = [
        f" iteration {r['iteration']:8d}/{r['train_iters']:8d}",
        f"consumed samples: {r['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {r['ms_per_iteration']:.1f}",
        f"tokens/s: {r['tokens_per_sec']:.0f}",
        # per process's device: a GPU, or on CPU the cores a process uses (the record's key
        # keeps Megatron-LM's name)
        f"TFLOP/s per device: {r['tflops_per_gpu']:.2f}",
        f"learning rate: {r['lr']:.6E}",
        f"global batch size: {r['global_batch_size']:5d}",
        f"lm loss: {r['lm_loss']:.6E}",
    ]
    if "reg_loss" in r:
        parts += [
            f"reg loss: {r['reg_loss']:.6E}",
            f"l1 coeff: {r['l1_coeff']:.4E}",
            f"sparsity: {r['sparsity']:.4f} "
            f"(min {r['sparsity_min']:.4f}, max {r['sparsity_max']:.4f})",
        ]
    if "load_balancing_loss" in r:
        parts.append(f"load balancing loss: {r['load_balancing_loss']:.6E}")
    if "expert_share_cv" in r:
        parts.append(f"expert load CV: {r['expert_share_cv']:.3f}")
    parts += [
        f"grad norm: {r['grad_norm']:.3f}",
        f"number of skipped iterations: {r['skipped_iterations']:3d}",
    ]
    if "memory_rss_peak_gb" in r:
        parts.append(f"peak memory (GB): {peak_memory_gb(r):.2f}")
    return " | ".join(parts) + " |"
