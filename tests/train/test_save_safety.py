"""What a run writes under ``--save`` stays safe (issue 26): a new launch does not overwrite an
earlier run, a directory that cannot be written is refused before anything runs, a save that
fails (a full disk) or is interrupted (Ctrl-C, SIGTERM) leaves a whole checkpoint as the latest,
and each ends in one line instead of a traceback, a hang or orphaned writer processes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from training_runs import REPO, authors_style_flags, ok, run, steps
from remoe_patches.train import checkpointing, training
from remoe_patches.cli import launch
from remoe_patches.runs import run_directory

# pretrain_gpt.py with megatron's checkpoint writer processes made slow (they announce each file
# in $WRITING, then wait 3 s before its first item) or failing with a full disk for the files of
# $FULL_AT.
DRIVER = """
import errno, functools, os, sys, time
import remoe_patches
from megatron.core.dist_checkpointing.strategies import filesystem_async

real_write_item = filesystem_async._write_item
announced = set()

@functools.wraps(real_write_item)  # megatron inspects its signature
def write_item(*args, **kwargs):
    stream = next(a for a in args if hasattr(a, "name") and hasattr(a, "write"))
    if os.environ.get("FULL_AT") and os.environ["FULL_AT"] in str(stream.name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.name))
    if os.environ.get("WRITING") and stream.name not in announced:
        announced.add(stream.name)  # once per file
        with open(os.environ["WRITING"], "a") as f:
            f.write(f"{os.getpid()} {stream.name}\\n")
        time.sleep(3)
    return real_write_item(*args, **kwargs)

filesystem_async._write_item = write_item
from remoe_patches.cli.launch import main
sys.exit(main(sys.argv[1:]))
"""


def flags(corpus, save, **overrides):
    return authors_style_flags(
        corpus, save, **{"eval_interval": None, "log_interval": 1, **overrides}
    )


def error_lines(result) -> list:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def driven(argv, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    # Its own process group, as a terminal's job, with SIGINT handled as a terminal's job has
    # it: a suite run in the background (nohup, `&`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler in the child.
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# --- a second launch into the same --save --------------------------------------------------


@pytest.mark.integration
def test_a_new_run_into_a_finished_runs_save_is_refused_before_anything_is_written(
    corpus, tmp_path
):
    save = tmp_path / "run"
    ok(run(flags(corpus, save, train_iters=2, save_interval=1)))
    before = {path: path.stat().st_mtime_ns for path in save.rglob("*")}
    metrics = (save / "metrics.jsonl").read_text()

    again = run(flags(corpus, save, train_iters=2, save_interval=1))
    assert again.returncode == 2
    [line] = error_lines(again)
    assert f"--save {save} already holds checkpoints up to iteration 2" in line
    assert f"resume that run with --load {save}" in line
    assert "give another --save directory" in line and f"delete {save} to start over" in line
    assert {path: path.stat().st_mtime_ns for path in save.rglob("*")} == before
    assert (save / "metrics.jsonl").read_text() == metrics

    # --load of the same directory resumes (here: a finished run, nothing left to train) ...
    resumed = ok(run(flags(corpus, save, train_iters=3) + ["--load", str(save)]))
    assert "resuming from" in resumed.stdout and sorted(steps(save)) == [1, 2, 3]
    # ... and a run that loads another checkpoint may not overwrite this one either
    other = run(
        flags(corpus, tmp_path / "other", train_iters=1) + ["--load", str(save), "--finetune"]
    )
    ok(other)
    again = run(
        flags(corpus, save, train_iters=1) + ["--load", str(tmp_path / "other"), "--finetune"]
    )
    assert again.returncode == 2 and "already holds checkpoints up to iteration 3" in again.stderr


@pytest.mark.integration
def test_metrics_of_an_earlier_run_without_checkpoints_are_not_appended_to(corpus, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"iteration": 1, "lm_loss": 6.0}\n')
    result = run(flags(corpus, save, train_iters=1))
    assert result.returncode == 2
    [line] = error_lines(result)
    assert f"--save {save} already holds the metrics.jsonl of an earlier run" in line


# --- a --save that cannot be written -------------------------------------------------------


@pytest.mark.integration
def test_save_under_a_file_is_refused_in_one_line(corpus, tmp_path):
    (tmp_path / "file").write_text("")
    result = run(flags(corpus, tmp_path / "file" / "run", train_iters=1))
    assert result.returncode == 2
    [line] = error_lines(result)
    assert f"--save {tmp_path / 'file' / 'run'} is under the file {tmp_path / 'file'}" in line


@pytest.mark.integration
def test_unwritable_save_is_refused_at_start_up(corpus, tmp_path, monkeypatch, capsys):
    # as root, chmod does not stop a write: the check's trial file fails instead
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(training.tempfile, "TemporaryFile", denied)
    # main() in-process: its teardown must leave the session's one-rank groups (single_rank)
    monkeypatch.setattr(launch, "destroy_parallel", lambda: None)
    save = tmp_path / "locked" / "run"
    code = launch.main(flags(corpus, save, train_iters=1))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"--save {save} cannot be written ({tmp_path}: Permission denied)" in err
    assert not save.exists()
    monkeypatch.undo()
    if os.geteuid() != 0:  # the real thing where chmod binds
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            result = run(flags(corpus, locked / "run", train_iters=1))
        finally:
            locked.chmod(0o700)
        assert result.returncode == 2 and "cannot be written" in error_lines(result)[0]


def test_trial_file_leaves_nothing_behind(tmp_path):
    training.check_writable_directory("--save", str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []  # the trial file went to tmp_path, and is gone


# --- a full disk during a save -------------------------------------------------------------


@pytest.mark.integration
def test_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(corpus, tmp_path):
    save = tmp_path / "run"
    process = driven(flags(corpus, save, train_iters=4, save_interval=2), FULL_AT="iter_0000004")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("error: ")]
    assert (
        f"writing checkpoint {save / 'iter_0000004'} failed ([Errno 28] No space left on "
        f"device); {save / 'iter_0000002'} is still the latest" in line
    )
    assert run_directory.latest_iteration(str(save)) == 2
    assert checkpointing.checkpoint_problem(str(save / "iter_0000002")) is None
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002"]  # no partial left


# --- SIGINT during a save --------------------------------------------------------------------


def descendants_alive(pids) -> list:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.integration
@pytest.mark.parametrize("to", ["main process", "process group"])
def test_ctrl_c_during_a_save_finishes_it_then_exits_without_orphans(corpus, tmp_path, to):
    save, writing = tmp_path / "run", tmp_path / "writing"
    process = driven(flags(corpus, save, train_iters=4, save_interval=2), WRITING=str(writing))
    try:
        deadline = time.time() + 300
        while not writing.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert writing.exists(), "no checkpoint write started"
        children = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        writers = {int(line.split()[0]) for line in writing.read_text().splitlines()}
        assert writers <= set(children) and writers
        if to == "main process":
            os.kill(process.pid, signal.SIGINT)
        else:
            os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)  # it hung here before
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert (
        f"note: SIGINT received while checkpoint {save / 'iter_0000002'} is written; "
        "stopping once it is complete" in output
    )
    assert "interrupted (Ctrl-C)" in output
    time.sleep(1)
    assert descendants_alive(children) == []
    # the checkpoint was completed and is the latest; nothing trained after it
    assert run_directory.latest_iteration(str(save)) == 2
    assert checkpointing.checkpoint_problem(str(save / "iter_0000002")) is None
    assert not list(save.glob("*.partial")) and max(steps(save)) == 2
