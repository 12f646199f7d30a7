"""The start-up notes about what the machine and launcher do to a run (``machine_notes.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remoe_patches.cli import machine_notes as notes
from remoe_patches.cli.arguments import parse_run_config
from remoe_patches.config.model_config import ConfigError

from command_lines import TINY_MOE_FLAGS

UNDER_TORCHRUN = {"TORCHELASTIC_RUN_ID": "none"}
CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


def config_of(*flags):
    return parse_run_config([*TINY_MOE_FLAGS, *flags])


def test_torchrun_grace_is_noted_only_under_torchrun_with_its_30_s_default(monkeypatch):
    config = config_of("--exit-signal-handler")
    assert notes.machine_notes(config, environ={}) == []  # python, not torchrun
    [note] = notes.machine_notes(config, environ=UNDER_TORCHRUN)
    assert "30 s after it forwards a SIGTERM" in note and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in note
    assert (
        notes.machine_notes(
            config, environ={**UNDER_TORCHRUN, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
        )
        == []
    )
    assert notes.machine_notes(config_of(), environ=UNDER_TORCHRUN) == []  # no handler asked

    # a torch whose torchrun cannot wait longer (the GPU machine's 2.11): the way around it
    monkeypatch.setattr(notes, "torchrun_can_wait_longer", lambda: False)
    [note] = notes.machine_notes(
        config, environ={**UNDER_TORCHRUN, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    )
    assert f"torch {torch.__version__}" in note and "pkill -TERM" in note


def test_this_torchs_torchrun_reads_the_grace_period():
    # torch 2.13 (the CPU pin) has it; the launchers' export is what makes it 300 s
    assert notes.torchrun_can_wait_longer()


def test_grouped_gemm_below_sm90_is_noted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    config = config_of("--moe-grouped-gemm")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    [note] = notes.machine_notes(config, environ={})
    assert "A100" in note and "sm80" in note and "one GEMM per expert" in note
    assert notes.machine_notes(config, environ={}, transformer_engine=True) == []
    assert notes.machine_notes(config_of(), environ={}) == []  # no grouped GEMM asked
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert notes.machine_notes(config, environ={}) == []


GIB = 2**30


def test_resident_state_is_megatron_lms_estimate():
    config = config_of()
    params = config.model.num_parameters()
    assert notes.resident_bytes_per_gpu(config, 1) == 18 * params
    distributed = config_of("--use-distributed-optimizer")
    assert notes.resident_bytes_per_gpu(distributed, 4) == pytest.approx((6 + 12 / 4) * params)
    # the experts split over EP; everything else is replicated
    experts = 2 * 8 * 3 * 64 * 256  # layers x experts x SwiGLU x hidden x expert FFN
    split = config_of("--expert-model-parallel-size", "2")
    assert notes.resident_bytes_per_gpu(split, 2) == pytest.approx(18 * (params - experts / 2))


def test_paper_models_on_one_80_gb_gpu():
    """978M cannot fit one GPU; 469M ReMoE fits but its stage I is the risk (issue 21 item 5)."""
    paper = {
        size: parse_run_config(["--config", str(CONFIGS / f"{size}_remoe.yaml")])
        for size in ("469m", "978m")
    }
    with pytest.raises(ConfigError, match="does not fit: .* about 96.1 GiB of each GPU's 80 GiB"):
        notes.machine_notes(paper["978m"], environ={}, gpu_memory_bytes=80 * GIB)
    [note] = notes.machine_notes(paper["469m"], environ={}, gpu_memory_bytes=80 * GIB)
    assert "about 43.3 GiB" in note and "stage I" in note
    assert "recompute" not in note  # its config recomputes every layer already
    [note] = notes.machine_notes(
        config_of(),
        environ={},
        gpu_memory_bytes=int(notes.resident_bytes_per_gpu(config_of(), 1) * 2),
    )
    assert "--moe-layer-recompute" in note
    assert notes.machine_notes(paper["469m"], environ={}, gpu_memory_bytes=141 * GIB) == []
    # 978M over 8 GPUs with the distributed optimizer, as its launcher runs it: fits
    [note] = notes.machine_notes(paper["978m"], environ={}, world_size=8, gpu_memory_bytes=80 * GIB)
    assert "about 40.1 GiB" in note
