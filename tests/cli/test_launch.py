"""pretrain_gpt.py's body (``launch.main``) on what only a GPU machine meets: a run that cannot
fit is refused before it starts, and running out of memory ends in one line naming the fixes."""

from __future__ import annotations

import re
import types

import pytest
import torch

from remoe_patches.cli import launch
from remoe_patches.train import training

from command_lines import TINY_MOE_FLAGS

RUN = [*TINY_MOE_FLAGS, "--mock-data"]  # pretrain itself is replaced


@pytest.fixture(autouse=True)
def keep_parallel_state(monkeypatch):
    """main() tears megatron's groups down at its end, as a process does; in-process here, the
    session's one-rank groups (``single_rank``) must outlive it."""
    monkeypatch.setattr(launch, "destroy_parallel", lambda: None)


@pytest.fixture
def pretend_gpu(monkeypatch):
    """torch sees one CUDA device of ``memory`` bytes (only its properties are asked)."""

    def with_memory(memory):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(
            torch.cuda,
            "get_device_properties",
            lambda device: types.SimpleNamespace(total_memory=memory),
        )
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))

    return with_memory


def test_a_run_that_cannot_fit_the_gpu_is_refused_before_it_starts(
    pretend_gpu, monkeypatch, capsys
):
    monkeypatch.setattr(training, "pretrain", lambda config, **_: pytest.fail("it started"))
    pretend_gpu(2**20)  # 1 MiB
    assert launch.main(RUN) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: the model does not fit")


def test_out_of_gpu_memory_is_one_line_with_what_lowers_it(monkeypatch, capsys):
    def runs_out(config, **_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")

    monkeypatch.setattr(training, "pretrain", runs_out)
    assert launch.main(RUN) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.)" in error
    assert "--moe-layer-recompute" in error and "--micro-batch-size" in error


def test_the_resolved_arguments_are_listed_at_start_as_megatron_lm_does(monkeypatch, capsys):
    """Every argument once, sorted, with its value after YAML, flags and derived defaults (the
    router type completed from --num-experts), between Megatron-LM's two rules."""
    kept = []
    monkeypatch.setattr(
        training,
        "pretrain",
        lambda config, arguments: (
            kept.append(arguments) or types.SimpleNamespace(iteration=0, start_iteration=0)
        ),
    )
    assert launch.main(RUN) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("------------------------ arguments ------------------------")
    end = out.index("-------------------- end of arguments ---------------------")
    listed = {line.split()[0]: line.split()[-1] for line in out[start + 1 : end]}
    assert listed["num_layers"] == "2" and listed["moe_router_type"] == "topk"
    names = list(listed)
    assert names == sorted(names, key=str.lower) and "given" not in listed
    for line in out[start + 1 : end]:  # the values in one column, as Megatron-LM pads them
        name, dots = re.match(r"  (\S+) (\.*) ", line).groups()
        assert len(name) + len(dots) == max(48, len(name)), line
    assert kept == [out[start : end + 1]]  # the same lines for <save>/arguments.txt
