"""A run's lifecycle on a cluster: a missing ``--load`` is refused before anything runs, a resume
says where it starts, a damaged checkpoint falls back to the previous one, and SIGTERM or Ctrl-C
(real signals, to a real ``pretrain_gpt.py``) saves a checkpoint and stops every rank at the same
iteration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from remoe_patches.runtime.parallel import free_port

from training_runs import REPO, authors_style_flags, ok, run, steps

pytestmark = pytest.mark.integration


def flags(corpus, save, **overrides):
    return authors_style_flags(
        corpus, save, **{"eval_interval": None, "save_interval": None, **overrides}
    )


def test_load_without_a_checkpoint_is_refused_before_anything_runs(corpus, tmp_path):
    save = tmp_path / "new"
    result = run(flags(corpus, save) + ["--load", str(tmp_path / "typo")])
    assert result.returncode == 2
    assert f"--load {tmp_path / 'typo'} does not exist" in result.stderr
    assert "drop --load to train from scratch" in result.stderr
    assert not save.exists()


def test_first_launch_of_a_self_resuming_run_says_it_starts_from_scratch(corpus, tmp_path):
    save = tmp_path / "run"
    result = ok(run(flags(corpus, save, train_iters=2) + ["--load", str(save)]))
    assert f"note: no checkpoint in {save} yet: training from scratch" in result.stdout
    assert "done: iteration 2 (2 in this launch" in result.stdout


def test_resume_says_where_it_starts_and_a_truncated_checkpoint_falls_back(corpus, tmp_path):
    save = tmp_path / "run"
    ok(run(flags(corpus, save, save_interval=2, train_iters=4)))
    expected = steps(save)
    resumed = ok(run(flags(corpus, save, save_interval=2, train_iters=6) + ["--load", str(save)]))
    assert (
        f"resuming from {save / 'iter_0000004'}: iteration 4, consumed samples 16, "
        "l1 coeff" in resumed.stdout
    )
    assert "done: iteration 6 (2 in this launch" in resumed.stdout
    first_resume = steps(save)

    # A shard of the newest checkpoint cut short (a crash on a shared filesystem):
    shard = sorted((save / "iter_0000006").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(1000)
    again = ok(run(flags(corpus, save, save_interval=2, train_iters=6) + ["--load", str(save)]))
    assert (
        f"WARNING: checkpoint {save / 'iter_0000006'} does not load ({shard.name} is "
        "truncated (1,000 of" in again.stdout
    )
    assert f"resuming from {save / 'iter_0000004'}: iteration 4" in again.stdout
    # iterations 5 and 6 trained again from iteration 4, exactly as the first time
    for iteration in (5, 6):
        assert steps(save)[iteration]["lm_loss"] == first_resume[iteration]["lm_loss"]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert expected[4]["lm_loss"] == first_resume[4]["lm_loss"]

    # Every checkpoint damaged: one line naming each one and its bad file.
    for iteration in (2, 4):
        (save / f"iter_{iteration:07d}" / "common.pt").write_bytes(b"garbage")
    (save / "iter_0000006" / ".metadata").unlink()
    result = run(flags(corpus, save, train_iters=8) + ["--load", str(save)])
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(error) == 1
    assert (
        f"no checkpoint under {save} loads: {save / 'iter_0000006'}: .metadata is missing; "
        f"{save / 'iter_0000004'}: common.pt does not read" in error[0]
    )


def wait_for_iteration(process, iteration, timeout=300):
    """Read the run's stdout until it logs ``iteration``; return what it printed."""
    lines, deadline = [], time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if f"iteration {iteration:8d}/" in line:
            return lines
        assert time.time() < deadline, "".join(lines[-20:])
    raise AssertionError("the run ended early:\n" + "".join(lines[-30:]))


def launch(argv, nproc):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        command = [sys.executable, str(REPO / "pretrain_gpt.py"), *argv]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            str(REPO / "pretrain_gpt.py"),
            *argv,
        ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stopped_by(signum, corpus, save, nproc, signal_ranks):
    """Train until iteration 3, signal ``signal_ranks`` (worker processes), let it finish."""
    process = launch(
        flags(corpus, save, train_iters=1000, log_interval=1) + ["--exit-signal-handler"], nproc
    )
    try:
        printed = wait_for_iteration(process, 3)
        workers = (
            [process]
            if nproc == 1
            else sorted(psutil.Process(process.pid).children(), key=lambda p: p.pid)
        )
        for rank in signal_ranks:
            os.kill(workers[rank].pid, signum)
        rest, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, "".join(printed) + rest


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    save = tmp_path / "run"
    code, output = stopped_by(signal.SIGTERM, corpus, save, nproc=1, signal_ranks=[0])
    assert code == 0, output[-3000:]
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 1000
    assert f"exiting at iteration {stopped}: received SIGTERM (--exit-signal-handler)" in output
    assert f"saved checkpoint {save / f'iter_{stopped:07d}'}" in output
    resumed = ok(run(flags(corpus, save, train_iters=stopped + 2) + ["--load", str(save)]))
    assert f"resuming from {save / f'iter_{stopped:07d}'}: iteration {stopped}" in resumed.stdout


def test_ctrl_c_to_one_of_two_ranks_stops_both_at_the_same_iteration(corpus, tmp_path):
    save = tmp_path / "run"
    code, output = stopped_by(signal.SIGINT, corpus, save, nproc=2, signal_ranks=[1])
    assert code == 0, output[-3000:]
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert f"exiting at iteration {stopped}: received SIGINT (--exit-signal-handler)" in output
    # both ranks wrote their shards of the one checkpoint, and nothing trained after it
    assert (save / f"iter_{stopped:07d}" / "__1_0.distcp").exists()
    assert max(steps(save)) == stopped
