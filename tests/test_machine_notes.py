"""The start-up notes about what the machine and launcher do to a run (``machine_notes.py``)."""

from __future__ import annotations

import torch

from remoe_patches import machine_notes as notes
from remoe_patches.arguments import parse_run_config

from test_arguments import TINY_MOE

UNDER_TORCHRUN = {"TORCHELASTIC_RUN_ID": "none"}


def config_of(*flags):
    return parse_run_config([*TINY_MOE, *flags])


def test_torchrun_grace_is_noted_only_under_torchrun_with_its_30_s_default(monkeypatch):
    config = config_of("--exit-signal-handler")
    assert notes.machine_notes(config, environ={}) == []  # python, not torchrun
    [note] = notes.machine_notes(config, environ=UNDER_TORCHRUN)
    assert "30 s after it forwards a SIGTERM" in note and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in note
    assert notes.machine_notes(
        config, environ={**UNDER_TORCHRUN, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}) == []
    assert notes.machine_notes(config_of(), environ=UNDER_TORCHRUN) == []  # no handler asked

    # a torch whose torchrun cannot wait longer (the GPU machine's 2.11): the way around it
    monkeypatch.setattr(notes, "torchrun_can_wait_longer", lambda: False)
    [note] = notes.machine_notes(
        config, environ={**UNDER_TORCHRUN, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"})
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
