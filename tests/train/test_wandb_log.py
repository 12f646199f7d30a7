"""wandb_log: Megatron-LM's W&B flags with the real wandb package, offline (``WANDB_MODE=offline``
writes the run's records into ``run-<id>.wandb`` for a later ``wandb sync``). The records are
read back from that file: W&B's LevelDB-style log (a 7-byte file header, 32 KiB blocks of
chunks with a 7-byte header each) of protobuf ``Record``s."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from command_lines import TINY_FLAGS
from training_runs import authors_style_flags, ok, run

from remoe_patches.cli.arguments import parse_run_config

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf Records of a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, record = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a chunk header: padding
            position += BLOCK - position % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        record = chunk if kind in (FULL, FIRST) else record + chunk
        if kind in (FULL, LAST):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def history(directory: Path) -> tuple:
    """(run ids, {step: {key: value}}) of every offline run under ``directory``."""
    ids, steps = set(), {}
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {
                    "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
                steps.setdefault(record.history.step.num, {}).update(items)
    return ids, steps


def parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_run_config(argv)
    return capsys.readouterr().err


def test_wandb_project_needs_a_name_and_a_place(capsys):
    assert "--wandb-project needs --wandb-exp-name" in parse_error(
        [*TINY_FLAGS, "--mock-data", "--save", "runs/x", "--wandb-project", "p"], capsys
    )
    assert "--wandb-project needs --save or --wandb-save-dir" in parse_error(
        [*TINY_FLAGS, "--mock-data", "--wandb-project", "p", "--wandb-exp-name", "n"], capsys
    )


def test_wandb_project_without_the_package_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    err = parse_error(
        [
            *TINY_FLAGS,
            "--mock-data",
            "--save",
            "runs/x",
            "--wandb-project",
            "p",
            "--wandb-exp-name",
            "n",
        ],
        capsys,
    )
    assert "needs the wandb package: pip install 'remoe[wandb]'" in err


@pytest.mark.integration
def test_the_authors_launch_with_wandb_flags_logs_offline_and_a_resume_continues_the_run(
    corpus, tmp_path
):
    """The authors' 182M argv (scaled down) with Megatron-LM's W&B flags: the scalars
    TensorBoard gets, at their iterations, in one W&B run across a resume."""
    save = tmp_path / "run"
    wandb_dir = tmp_path / "wandb-files"
    wandb_flags = [
        "--wandb-project",
        "remoe-tests",
        "--wandb-exp-name",
        "182m-remoe-cpu",
        "--wandb-save-dir",
        str(wandb_dir),
        "--moe-per-layer-logging",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    ok(
        run(
            authors_style_flags(corpus, save, train_iters=3, save_interval=3) + wandb_flags, env=env
        )
    )
    ok(
        run(
            authors_style_flags(corpus, save, train_iters=6, save_interval=3)
            + wandb_flags
            + ["--load", str(save)],
            env=env,
        )
    )
    ids, steps = history(wandb_dir)
    assert len(ids) == 1  # the resume logged into the same W&B run
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    metrics = [json.loads(line) for line in open(save / "metrics.jsonl")]
    for record in metrics:
        logged = steps[record["iteration"]]
        if "lm_loss" in record:
            assert logged["lm_loss"] == pytest.approx(record["lm_loss"])
            assert logged["lm loss"] == pytest.approx(record["lm_loss"])  # Megatron-LM's tag
            assert logged["sparsity_per_layer/layer_1"] == pytest.approx(
                record["sparsity_per_layer"][0]
            )  # (--moe-per-layer-logging)
            assert logged["expert_share_per_layer/layer_2/expert_7"] == pytest.approx(
                record["expert_share_per_layer"][1][7]
            )
            assert logged["expert_share_cv"] == pytest.approx(record["expert_share_cv"])
        if "val_lm_loss" in record:
            assert logged["lm loss validation"] == pytest.approx(record["val_lm_loss"])
    assert any("val_lm_loss" in r for r in metrics)
    # the last launch's resolved arguments beside the checkpoints, as printed at its start
    arguments = (save / "arguments.txt").read_text()
    assert "  wandb_exp_name ." in arguments
    assert arguments.splitlines()[-1].strip("- ") == "end of arguments"
    assert re.search(r"  train_iters \.+ 6\n", arguments)
