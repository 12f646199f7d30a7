"""The cluster launchers: every ``scripts/pretrain_<size>_<router>.sh --dry-run`` prints a command
that pretrain_gpt.py's parser accepts, with the paper's world size, layout and hyperparameters;
the environment and extra flags change what they should; bad layouts are refused before launch;
a real launch runs the printed command; the CPU smoke script trains; the Pile preprocessing
writes one dataset per shard and a blend that parses.

The dry runs start together (each is a Python process that imports megatron-core), so the
module costs about one of them in wall time on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from remoe_patches.cli.argument_mapping import model_config_from_args, parallel_config_from_args
from remoe_patches.cli.arguments import parse_args
from remoe_patches.config.model_config import PRESETS
from remoe_patches.data.preprocess import import_indexed_dataset

from training_runs import BLEND, DATA_ENV, REPO, SCRIPTS, environment

pytestmark = pytest.mark.integration

SIZES = ("182m", "469m", "978m")
ROUTERS = ("dense", "moe", "remoe")
# spec section 3: total parameters at E=8 (MoE, ReMoE); the dense models are their names
PARAMETERS = {
    ("182m", "dense"): 182e6,
    ("469m", "dense"): 469e6,
    ("978m", "dense"): 978e6,
    **{
        (size, router): total
        for size, total in (("182m", 777e6), ("469m", 2.58e9), ("978m", 5.73e9))
        for router in ("moe", "remoe")
    },
}
OVERRIDE_ENV = dict(
    GPUS_PER_NODE="4",
    NNODES="2",
    NODE_RANK="1",
    MASTER_ADDR="10.0.0.7",
    MASTER_PORT="29511",
    TP="2",
    EP="2",
    PP="2",
)
OVERRIDE_FLAGS = ["--train-iters", "1000", "--lr", "1e-4", "--save-interval", "250"]


def launcher(size, router) -> str:
    return str(SCRIPTS / f"pretrain_{size}_{router}.sh")


@pytest.fixture(scope="module")
def fake_torchrun(tmp_path_factory) -> Path:
    """A torchrun stand-in that records the arguments it was started with."""
    directory = tmp_path_factory.mktemp("bin")
    script = directory / "torchrun"
    script.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_TORCHRUN_LOG"\n')
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def launched(tmp_path_factory, fake_torchrun):
    """All the launcher runs of this module that need Python, started at once."""
    tmp = tmp_path_factory.mktemp("launch")
    jobs = {}
    for size in SIZES:
        for router in ROUTERS:
            env = environment(CHECKPOINT_DIR=str(tmp / f"{size}_{router}"))
            jobs[size, router] = ([launcher(size, router), "--dry-run"], env)
    jobs["override"] = (
        [launcher("978m", "remoe"), *OVERRIDE_FLAGS[:2], "--dry-run", *OVERRIDE_FLAGS[2:]],
        environment(**OVERRIDE_ENV),
    )
    jobs["dense_ep"] = ([launcher("182m", "dense"), "--dry-run"], environment(EP="2"))
    jobs["batch"] = ([launcher("182m", "moe"), "--dry-run"], environment(GPUS_PER_NODE="6"))
    log = tmp / "torchrun_args.txt"
    jobs["launch"] = (
        [launcher("182m", "remoe")],  # as the 182m_remoe dry run, launched
        environment(
            TORCHRUN=str(fake_torchrun),
            FAKE_TORCHRUN_LOG=str(log),
            CHECKPOINT_DIR=str(tmp / "182m_remoe"),
        ),
    )
    processes = {
        name: subprocess.Popen(
            argv, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (argv, env) in jobs.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    results["torchrun_args"] = log.read_text().splitlines() if log.is_file() else None
    results["tmp"] = tmp
    return results


def parse_command(result):
    """(env assignments, torchrun options, pretrain_gpt.py flags) of a dry run's first line."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tokens = shlex.split(result.stdout.splitlines()[0])
    env = {}
    while "=" in tokens[0] and not tokens[0].startswith("-"):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    program = tokens.pop(0)
    script = next(i for i, t in enumerate(tokens) if t.endswith("pretrain_gpt.py"))
    options = argparse.ArgumentParser()
    for flag in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"):
        options.add_argument(flag)
    torchrun = options.parse_args(tokens[:script])
    assert Path(tokens[script]) == REPO / "pretrain_gpt.py"
    return env, program, torchrun, tokens[script + 1 :]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("router", ROUTERS)
def test_dry_run_is_the_papers_setup(launched, size, router):
    env, program, torchrun, argv = parse_command(launched[size, router])
    assert program == "torchrun"
    assert env == {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300",
    }
    assert (torchrun.nproc_per_node, torchrun.nnodes, torchrun.node_rank) == ("8", "1", "0")
    assert (torchrun.master_addr, torchrun.master_port) == ("localhost", "6000")
    world_size = int(torchrun.nproc_per_node) * int(torchrun.nnodes)
    assert world_size == 8

    args = parse_args(argv)
    assert Path(args.config) == REPO / "configs" / f"{size}_{router}.yaml"
    parallel = parallel_config_from_args(args)
    assert (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
    ) == (1, 1, 1)
    assert parallel.data_parallel_size(world_size) == 8 and not parallel.sequence_parallel
    checkpoints = str(launched["tmp"] / f"{size}_{router}")
    assert args.save == args.load == checkpoints
    assert args.tensorboard_dir == os.path.join(checkpoints, "tensorboard")
    assert args.data_path == BLEND.split()
    assert (args.vocab_file, args.merge_file) == (DATA_ENV["VOCAB_FILE"], DATA_ENV["MERGE_FILE"])
    assert args.tokenizer_type == "GPT2BPETokenizer"

    # spec section 3: the training setup
    assert (args.seq_length, args.global_batch_size, args.train_iters) == (1024, 512, 60000)
    assert (args.lr, args.min_lr, args.lr_decay_style) == (5e-4, 5e-5, "cosine")
    assert (args.lr_warmup_fraction, args.clip_grad) == (0.01, 1.0)
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
    assert args.bf16 and args.use_distributed_optimizer
    assert args.split.replace(" ", "") == "969,30,1"
    assert args.global_batch_size % (args.micro_batch_size * 8) == 0

    model = model_config_from_args(args, vocab_size=51200)
    preset = PRESETS[size]
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (
        preset["num_layers"],
        preset["hidden_size"],
        preset["num_attention_heads"],
    )
    assert model.num_query_groups == 4 and model.dense_ffn_hidden_size == 4 * model.hidden_size
    assert (model.rotary_base, model.init_method_std) == (1_000_000, 0.01)
    assert model.router == {"dense": "dense", "moe": "topk", "remoe": "relu"}[router]
    if router != "dense":
        assert (model.num_experts, model.topk, model.granularity) == (8, 1, 1)
        assert model.token_dispatcher == "alltoall" and args.moe_grouped_gemm
    if router == "moe":
        assert model.moe_aux_loss_coeff == 0.01 and args.moe_router_pre_softmax
    if router == "remoe":
        options = model.router_options
        assert (options.l1_coeff_init, options.l1_coeff_multiplier) == (1e-8, 1.2)
        assert options.load_balancing and model.target_sparsity == 0.875
    assert model.num_parameters() == pytest.approx(PARAMETERS[size, router], rel=0.01)
    if size == "182m":  # MoE-layer recomputation
        assert args.recompute_granularity == ("selective" if router != "dense" else None)
        assert ("moe" in args.recompute_modules) == (router != "dense")
    else:  # full recomputation
        assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == (
            "full",
            "uniform",
            1,
        )

    summary = launched[size, router].stdout
    assert "dry run: valid" in summary and "TP=1 PP=1 EP=1 DP=8" in summary


def test_environment_and_extra_flags_take_effect(launched):
    env, _, torchrun, argv = parse_command(launched["override"])
    assert vars(torchrun) == dict(
        nproc_per_node="4", nnodes="2", node_rank="1", master_addr="10.0.0.7", master_port="29511"
    )
    args = parse_args(argv)
    parallel = parallel_config_from_args(args)
    assert (
        parallel.tensor_model_parallel_size,
        parallel.expert_model_parallel_size,
        parallel.pipeline_model_parallel_size,
    ) == (2, 2, 2)
    assert parallel.sequence_parallel  # MoE layers at TP > 1 need it; the launcher adds it
    assert parallel.data_parallel_size(8) == 2
    assert (args.train_iters, args.lr, args.save_interval) == (1000, 1e-4, 250)
    assert args.global_batch_size == 512 and "--dry-run" not in argv
    out = launched["override"].stdout
    assert "TP=2 PP=2 EP=2 DP=2" in out and "32 accumulation steps" in out


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_parser_refuses_what_pretraining_would(launched):
    assert "a dense model has no experts to split" in one_error_line(launched["dense_ep"])
    line = one_error_line(launched["batch"])
    assert "--global-batch-size 512" in line and "data-parallel size 6" in line


@pytest.mark.parametrize(
    "env, needle",
    [
        (dict(TP="3"), "TP=3 x PP=1 = 3 does not divide the 8 GPUs"),
        (dict(GPUS_PER_NODE="4", NNODES="2", PP="3"), "does not divide the 8 GPUs"),
        (dict(TP="2", EP="8"), "TP=2 x EP=8 = 16 does not divide the 8 GPUs of a pipeline stage"),
        (dict(EP="0"), "EP=0 is not a positive integer"),
        (dict(NODE_RANK="1"), "NODE_RANK=1 must be between 0 and NNODES-1=0"),
    ],
)
def test_bad_layout_is_refused_before_launch(tmp_path, fake_torchrun, env, needle):
    log = tmp_path / "torchrun_args.txt"
    for extra in ([], ["--dry-run"]):
        result = subprocess.run(
            [launcher("978m", "remoe"), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(TORCHRUN=str(fake_torchrun), FAKE_TORCHRUN_LOG=str(log), **env),
        )
        line = one_error_line(result)
        assert line.startswith("pretrain_978m_remoe.sh: error: ") and needle in line
        assert result.stdout == "" and not log.exists()


@pytest.mark.parametrize(
    "nodelist, master",
    [
        ("gpu[01-02]", "gpu01"),
        ("gpu[07,09-12],cpu1", "gpu07"),
        ("node7,node8", "node7"),
        ("a-b[3-4]", "a-b3"),
    ],
)
def test_slurm_master_comes_from_the_node_list_without_scontrol(tmp_path, nodelist, master):
    """Inside a container Slurm's variables are set but scontrol is absent: the first node of the
    compressed list is the master, on every node."""
    env = environment(
        SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="2", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="4"
    )
    env["PATH"] = os.pathsep.join(  # keep python and bash, lose any scontrol
        d for d in env["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "scontrol"))
    )
    result = subprocess.run(
        [launcher("182m", "remoe"), "--dry-run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout.splitlines()[0])
    assert words[words.index("--master-addr") + 1] == master
    assert words[words.index("--node-rank") + 1] == "1"
    assert words[words.index("--nnodes") + 1] == "2"


def test_several_nodes_with_localhost_as_master_are_refused(tmp_path):
    result = subprocess.run(
        [launcher("182m", "remoe"), "--dry-run"],
        cwd=tmp_path,
        env=environment(NNODES="2", GPUS_PER_NODE="4"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = one_error_line(result)
    assert "NNODES=2 with MASTER_ADDR=localhost: every node would wait for itself" in line
    assert result.stdout == ""


def test_missing_data_is_refused(tmp_path):
    env = environment()
    del env["DATA_PATH"], env["MERGE_FILE"]
    line = one_error_line(
        subprocess.run(
            [launcher("182m", "moe"), "--dry-run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert "DATA_PATH MERGE_FILE not set" in line


def test_launch_runs_the_printed_command(launched):
    assert launched["launch"].returncode == 0, launched["launch"].stderr
    _, program, _, _ = parse_command(launched["182m", "remoe"])
    printed = shlex.split(launched["182m", "remoe"].stdout.splitlines()[0])
    assert printed[printed.index(program) + 1 :] == launched["torchrun_args"]


def test_smoke_cpu_trains_the_shrunken_182m_remoe(corpus, tmp_path):
    save = tmp_path / "smoke"
    env = environment(
        GPUS_PER_NODE="1",
        CHECKPOINT_DIR=str(save),
        DATA_PATH=corpus.data_prefix,
        VOCAB_FILE=corpus.vocab_file,
        MERGE_FILE=corpus.merge_file,
    )
    result = subprocess.run(
        [
            str(SCRIPTS / "smoke_cpu.sh"),
            "--train-iters",
            "4",
            "--eval-interval",
            "2",
            "--save-interval",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(save / "metrics.jsonl")]
    steps = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert all(0.0 <= r["sparsity"] <= 1.0 and len(r["sparsity_per_layer"]) == 2 for r in steps)
    assert [r["iteration"] for r in records if "val_lm_loss" in r] == [2, 4]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    # the 182M config's bf16, distributed optimizer and overlap flags all take effect on CPU
    assert "note: --bf16" not in result.stdout
    assert "note: --use-distributed-optimizer" not in result.stdout


def test_smoke_cpu_removes_its_temporary_run(corpus, tmp_path):
    env = environment(
        GPUS_PER_NODE="1",
        TMPDIR=str(tmp_path),
        DATA_PATH=corpus.data_prefix,
        VOCAB_FILE=corpus.vocab_file,
        MERGE_FILE=corpus.merge_file,
    )
    result = subprocess.run(
        [
            str(SCRIPTS / "smoke_cpu.sh"),
            "--train-iters",
            "3",
            "--lr-warmup-iters",
            "1",
            "--eval-interval",
            "3",
            "--save-interval",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "iter_0000003" in result.stdout  # a checkpoint was written, then removed
    assert not list(tmp_path.glob("remoe_smoke.*"))
    assert result.stdout.strip().splitlines()[-1] == (
        "smoke_cpu.sh: done; its temporary checkpoints are removed (set CHECKPOINT_DIR to keep "
        "them)"
    )


def test_preprocess_pile_shards_and_blend(corpus, tmp_path):
    pile = tmp_path / "pile"
    pile.mkdir()
    lines = Path(corpus.corpus_jsonl).read_text().splitlines()
    (pile / "00.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (pile / "01.jsonl").write_text("\n".join(lines[6:9]) + "\n")
    (pile / "notes.txt").write_text("not a shard\n")
    out = tmp_path / "out"
    env = environment(
        PILE_DIR=str(pile),
        OUTPUT_DIR=str(out),
        WORKERS="1",
        VOCAB_FILE=corpus.vocab_file,
        MERGE_FILE=corpus.merge_file,
    )
    script = str(SCRIPTS / "preprocess_pile.sh")
    result = subprocess.run([script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith('export DATA_PATH="')
    blend = shlex.split(last[len("export DATA_PATH=") :])[0].split()
    assert (out / "data_path.txt").read_text().split() == blend
    prefixes = [str(out / "pile_00_text_document"), str(out / "pile_01_text_document")]
    assert blend[1::2] == prefixes
    indexed = import_indexed_dataset()
    datasets = [indexed.IndexedDataset(prefix) for prefix in prefixes]
    assert [len(d) for d in datasets] == [6, 3]  # one sequence per jsonl line
    tokens = [int(d.sequence_lengths.sum()) for d in datasets]
    weights = [float(w) for w in blend[0::2]]
    assert weights == pytest.approx([t / sum(tokens) for t in tokens], abs=1e-6)
    args = parse_args(
        [
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "32",
            "--micro-batch-size",
            "1",
            "--lr",
            "1e-3",
            "--train-iters",
            "1",
            "--normalization",
            "RMSNorm",
            "--swiglu",
            "--untie-embeddings-and-output-weights",
            "--position-embedding-type",
            "rope",
            "--disable-bias-linear",
            "--hidden-dropout",
            "0",
            "--attention-dropout",
            "0",
            "--data-path",
            *blend,
        ]
    )
    assert args.data_path == blend
    again = subprocess.run([script], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "skip 00" in again.stdout and "skip 01" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == last


STAND_IN_SRUN = """#!/bin/bash
# srun's stand-in: 'trains' until told to finish or until SIGTERM, then saves and exits 0
echo "$*" > "$WORK/srun_args"
trap 'echo "$SAVE_AT_TERM" > "$CHECKPOINT_DIR/latest_checkpointed_iteration.txt"; exit 0' TERM
touch "$WORK/started"
while [ ! -f "$WORK/finish" ]; do sleep 0.1; done
echo 10 > "$CHECKPOINT_DIR/latest_checkpointed_iteration.txt"
"""


def started_job(tmp_path, squeue_says=None, **env_vars):
    """scripts/slurm/pretrain.sbatch run by bash, with stand-ins for srun, scontrol and squeue
    (printing ``squeue_says`` as the job's time left; failing when None), once its training
    step has started."""
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STAND_IN_SRUN)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" > {tmp_path}/scontrol_args\n')
    (bin_dir / "squeue").write_text(
        "#!/bin/bash\n"
        + (
            "exit 1\n"
            if squeue_says is None
            else f'[ "$*" = "-h -j 99 -o %L" ] && echo "{squeue_says}"\n'
        )
    )
    launcher_file = tmp_path / "pretrain_182m_remoe.sh"
    launcher_file.write_text("#!/bin/bash\n")
    for path in (*bin_dir.iterdir(), launcher_file):
        path.chmod(0o755)
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("3")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        WORK=str(tmp_path),
        LAUNCHER=str(launcher_file),
        CHECKPOINT_DIR=str(checkpoints),
        SLURM_JOB_ID="99",
        **env_vars,
    )
    job = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "slurm" / "pretrain.sbatch")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and job.poll() is None, job.stderr.read()
        time.sleep(0.05)
    return job


@pytest.mark.parametrize(
    "squeue_says, flags",
    [
        ("2-03:04:59", ["--exit-duration-in-mins", str(2 * 1440 + 3 * 60 + 4 - 10)]),
        ("  08:09:00", ["--exit-duration-in-mins", str(8 * 60 + 9 - 10)]),
        ("45:30", ["--exit-duration-in-mins", "35"]),
        ("9:59", []),  # under the margin: the signal alone
        ("UNLIMITED", []),
        (None, []),  # squeue failed
    ],
)
def test_slurm_job_stops_by_the_clock_before_its_limit(tmp_path, squeue_says, flags):
    job = started_job(tmp_path, squeue_says)
    (tmp_path / "finish").touch()
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    args = (tmp_path / "srun_args").read_text().split()
    assert args[args.index("--exit-signal-handler") + 1 :] == flags


@pytest.mark.parametrize(
    "signalled, saved_at_term, expected",
    [
        (True, "7", "requeued"),  # the time limit after a new checkpoint: requeued
        (False, None, "finished"),  # the run ended by itself: nothing requeued
        (True, "3", "stuck"),  # the time limit without a new checkpoint: the job fails
    ],
)
def test_slurm_job_requeues_itself_at_the_time_limit(tmp_path, signalled, saved_at_term, expected):
    """scripts/slurm/pretrain.sbatch run by bash, with stand-ins for srun and scontrol: Slurm's
    USR1 before the time limit becomes a SIGTERM to the training step and a requeue."""
    import signal

    job = started_job(tmp_path, SAVE_AT_TERM=saved_at_term or "0")
    if signalled:
        job.send_signal(signal.SIGUSR1)
    else:
        (tmp_path / "finish").touch()
    _, err = job.communicate(timeout=30)
    assert "--exit-signal-handler" in (tmp_path / "srun_args").read_text()
    requeue = tmp_path / "scontrol_args"
    if expected == "requeued":
        assert job.returncode == 0 and requeue.read_text().split() == ["requeue", "99"], err
    elif expected == "finished":
        assert job.returncode == 0 and not requeue.exists(), err
    else:
        assert job.returncode == 1 and not requeue.exists()
        assert "without a new checkpoint" in err
