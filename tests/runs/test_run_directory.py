"""run_directory reads a run directory laid out as pretrain_gpt.py and the sweeps write it, and
imports without torch or megatron-core (the torch-free tools read runs through it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from remoe_patches.runs import run_directory

REPO = Path(__file__).resolve().parent.parent.parent


def fake_run(root: Path, *, checkpoints=(), partial=(), latest=None) -> Path:
    """A run directory with empty checkpoint directories and, with ``latest``, the pointer."""
    root.mkdir(parents=True, exist_ok=True)
    for iteration in checkpoints:
        Path(run_directory.checkpoint_dir(root, iteration)).mkdir()
    for iteration in partial:
        Path(run_directory.checkpoint_dir(root, iteration) + run_directory.PARTIAL_SUFFIX).mkdir()
    if latest is not None:
        (root / run_directory.LATEST_FILE).write_text(latest)
    return root


@pytest.mark.integration
@pytest.mark.parametrize(
    "module",
    [
        "runs.run_directory",
        "experiments.sweep",
        "runs.run_metrics",
        "analysis.routing_capture",
        "train.metrics_log",
    ],
)
def test_it_and_its_torch_free_readers_import_without_torch_or_megatron(module):
    code = (
        f"import sys, remoe_patches.{module}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_checkpoint_dir_is_megatrons_seven_digit_name(tmp_path):
    assert run_directory.checkpoint_dir(tmp_path, 100) == str(tmp_path / "iter_0000100")
    assert run_directory.checkpoint_dir("runs/demo", 1234567) == "runs/demo/iter_1234567"


def test_is_checkpoint_dir_needs_the_metadata_file(tmp_path):
    directory = Path(run_directory.checkpoint_dir(fake_run(tmp_path, checkpoints=[3]), 3))
    assert not run_directory.is_checkpoint_dir(directory)
    (directory / run_directory.CHECKPOINT_METADATA).mkdir()  # a directory of that name is not it
    assert not run_directory.is_checkpoint_dir(directory)
    (directory / run_directory.CHECKPOINT_METADATA).rmdir()
    (directory / run_directory.CHECKPOINT_METADATA).write_text("{}")
    assert run_directory.is_checkpoint_dir(directory)
    assert not run_directory.is_checkpoint_dir(tmp_path)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("runs/demo/iter_0000600", "runs/demo"),
        ("runs/demo/iter_0000600/", "runs/demo"),
        ("runs/demo", "runs/demo"),
        ("runs/demo/", "runs/demo"),
    ],
)
def test_run_dir_of_a_checkpoint_is_its_parent(path, expected):
    assert run_directory.run_dir_of(path) == expected
    assert run_directory.run_dir_of(Path(path)) == expected


@pytest.mark.parametrize("text, expected", [("300", 300), ("300\n", 300), (" 7 ", 7)])
def test_latest_iteration_reads_the_pointer(tmp_path, text, expected):
    assert run_directory.latest_iteration(str(fake_run(tmp_path, latest=text))) == expected


def test_latest_iteration_is_none_without_a_pointer(tmp_path):
    # checkpoint directories alone do not make a latest iteration (megatron's tracker file does)
    assert run_directory.latest_iteration(str(fake_run(tmp_path, checkpoints=[5]))) is None
    assert run_directory.latest_iteration(str(tmp_path / "missing")) is None
    assert run_directory.latest_iteration(None) is None
    assert run_directory.latest_iteration("") is None


def test_a_garbled_pointer_is_a_value_error_naming_the_file(tmp_path):
    fake_run(tmp_path, latest="release")
    with pytest.raises(
        ValueError,
        match=f"{run_directory.LATEST_FILE} should hold an iteration number, found 'release'",
    ):
        run_directory.latest_iteration(str(tmp_path))


def test_write_latest_iteration_replaces_the_pointer_as_megatron_writes_it(tmp_path):
    run_directory.write_latest_iteration(str(tmp_path), 100)
    run_directory.write_latest_iteration(str(tmp_path), 200)
    assert (tmp_path / run_directory.LATEST_FILE).read_text() == "200"  # the sbatch script cats it
    assert run_directory.latest_iteration(str(tmp_path)) == 200
    assert os.listdir(tmp_path) == [run_directory.LATEST_FILE]  # no temporary file left


def test_saved_iterations_are_the_whole_checkpoints_newest_first(tmp_path):
    fake_run(tmp_path, checkpoints=[1, 20, 3], partial=[40], latest="3")
    (tmp_path / "iter_0000050").write_text("")  # a file, not a checkpoint
    (tmp_path / "iter_60").mkdir()  # not megatron's name
    (tmp_path / run_directory.TENSORBOARD_DIR).mkdir()
    assert run_directory.saved_iterations(str(tmp_path)) == [20, 3, 1]
    assert run_directory.saved_iterations(str(tmp_path / "missing")) == []
    assert run_directory.saved_iterations(None) == []


@pytest.mark.parametrize(
    "layout, expected",
    [
        (dict(), False),
        (dict(partial=[10]), False),  # a save that never finished
        (dict(checkpoints=[10]), True),
        (dict(latest="10"), True),  # the pointer alone: loading says what is missing
        (dict(checkpoints=[10], latest="10"), True),
    ],
)
def test_has_checkpoint(tmp_path, layout, expected):
    assert run_directory.has_checkpoint(str(fake_run(tmp_path / "run", **layout))) is expected


def test_has_checkpoint_of_no_directory(tmp_path):
    assert run_directory.has_checkpoint(str(tmp_path / "missing")) is False
    assert run_directory.has_checkpoint(None) is False


def test_the_files_of_a_run_are_found_in_it(tmp_path):
    for path, name in (
        (run_directory.metrics_path, run_directory.METRICS_FILE),
        (run_directory.config_path, run_directory.CONFIG_FILE),
        (run_directory.done_path, run_directory.DONE_FILE),
        (run_directory.latest_pointer_path, run_directory.LATEST_FILE),
    ):
        (tmp_path / name).write_text(name)
        assert Path(path(tmp_path)).read_text() == name
        assert path(tmp_path) == path(str(tmp_path)) == str(tmp_path / name)


def test_is_done_is_the_marker_file(tmp_path):
    assert not run_directory.is_done(tmp_path)
    (tmp_path / run_directory.DONE_FILE).mkdir()
    assert not run_directory.is_done(tmp_path)
    (tmp_path / run_directory.DONE_FILE).rmdir()
    Path(run_directory.done_path(tmp_path)).write_text("")
    assert run_directory.is_done(tmp_path)


def test_the_names_are_those_the_launchers_and_existing_runs_use():
    # Runs on disk and scripts/ (CHECKPOINT_DIR/tensorboard) depend on these names.
    assert (
        run_directory.LATEST_FILE,
        run_directory.METRICS_FILE,
        run_directory.CONFIG_FILE,
        run_directory.DONE_FILE,
        run_directory.TENSORBOARD_DIR,
    ) == (
        "latest_checkpointed_iteration.txt",
        "metrics.jsonl",
        "config.yaml",
        "DONE",
        "tensorboard",
    )
    launcher = (REPO / "scripts" / "_launch.sh").read_text()
    assert f'"$CHECKPOINT_DIR/{run_directory.TENSORBOARD_DIR}"' in launcher
