"""Sweeps: a sweep file expands into deterministic runs; the CPU sweep
(configs/sweeps/cpu_tiny.yaml) trains its two tiny configurations with ``--launcher local``, skips
them when launched again, and ``--collect`` tabulates their final validation losses (and a
zero-shot average)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from remoe_patches.experiments import sweep as sweeps
from remoe_patches.cli.arguments import parse_args

REPO = Path(__file__).resolve().parent.parent.parent
TOOL = str(REPO / "tools" / "sweep.py")
CPU_SWEEP = str(REPO / "configs" / "sweeps" / "cpu_tiny.yaml")


def tool(*argv, timeout=900):
    return subprocess.run(
        [sys.executable, TOOL, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_tiny")
    first = tool(CPU_SWEEP, "--launcher", "local", "--output-dir", str(out))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return out, first


def last_validation(run_dir: Path) -> float:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["val_lm_loss"] for r in records if "val_lm_loss" in r][-1]


@pytest.mark.integration
def test_cpu_sweep_runs_both_configurations(swept):
    out, first = swept
    assert "sweep cpu_tiny: 2 finished, 0 skipped, 0 failed" in first.stdout
    for name, relu in (("moe", False), ("remoe", True)):
        run = out / name
        assert (run / "DONE").is_file() and (run / "iter_0000008").is_dir()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["num_experts"] == 8 and bool(config.get("moe_relu_routing")) == relu
        assert config["demo_corpus"] is True and config["train_iters"] == 8
        records = [json.loads(line) for line in open(run / "metrics.jsonl")]
        assert [r["iteration"] for r in records if "lm_loss" in r] == [2, 4, 6, 8]
        assert ("sparsity" in records[0]) == relu
        assert (run / "train.log").read_text().count("iteration        8/       8") == 1


@pytest.mark.integration
def test_relaunch_skips_finished_runs(swept):
    out, _ = swept
    before = {name: (out / name / "metrics.jsonl").read_bytes() for name in ("moe", "remoe")}
    again = tool(CPU_SWEEP, "--launcher", "local", "--output-dir", str(out))
    assert again.returncode == 0, again.stderr
    assert "[1/2] moe: finished, skipped" in again.stdout
    assert "[2/2] remoe: finished, skipped" in again.stdout
    assert "sweep cpu_tiny: 0 finished, 2 skipped, 0 failed" in again.stdout
    assert "iteration" not in again.stdout.replace("finished", "")  # nothing trained
    for name, content in before.items():
        assert (out / name / "metrics.jsonl").read_bytes() == content
    listed = tool(CPU_SWEEP, "--launcher", "print", "--output-dir", str(out))
    assert listed.stdout.count("(finished, skipped)") == 2


@pytest.mark.integration
def test_collect_tabulates_the_runs(swept):
    out, _ = swept
    # an lm-eval results file for one run: its average is the table's zero-shot column
    results = {
        "results": {
            "arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.4},
            "piqa": {"acc,none": 0.6, "acc_norm,none": 0.7},
        }
    }
    (out / "remoe" / "zero_shot.json").write_text(json.dumps(results))
    collected = tool(CPU_SWEEP, "--collect", "--output-dir", str(out))
    assert collected.returncode == 0, collected.stderr
    losses = {name: last_validation(out / name) for name in ("moe", "remoe")}
    markdown = (out / "results.md").read_text()
    assert markdown in collected.stdout
    assert "| run | TopK MoE | ReMoE |" in markdown
    assert f"| cpu_tiny | {losses['moe']:.4f} | {losses['remoe']:.4f} |" in markdown
    # ARC-e acc 50, PIQA acc_norm 70 (the paper's metrics): average 60
    assert "| cpu_tiny | n/a | 60.00 |" in markdown
    table = list(csv.DictReader(open(out / "results.csv")))
    assert len(table) == 1
    assert float(table[0]["TopK MoE val_lm_loss"]) == pytest.approx(losses["moe"])
    assert float(table[0]["ReMoE val_lm_loss"]) == pytest.approx(losses["remoe"])
    assert float(table[0]["ReMoE zero_shot_avg"]) == pytest.approx(60.0)
    runs = {r["name"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert {r["status"] for r in runs.values()} == {"finished"}
    assert runs["remoe"]["router"] == "remoe" and float(runs["remoe"]["final_sparsity"]) > 0
    assert runs["moe"]["settle_iteration"] == "" and runs["moe"]["final_sparsity"] == ""


@pytest.mark.integration
def test_slurm_job_array(tmp_path):
    result = tool(CPU_SWEEP, "--launcher", "slurm", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    script = Path(result.stdout.strip().splitlines()[-1])
    assert script == tmp_path.resolve() / "sweep.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0,1\n" in text and "RUNS=(moe remoe)" in text
    assert "TRAIN_ITERS=(8 8)" in text and "pretrain_gpt.py --config" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for name in ("moe", "remoe"):  # the jobs read these
        assert (tmp_path / name / "config.yaml").is_file()


@pytest.mark.integration
@pytest.mark.parametrize(
    "started, reached, expected",
    [
        (0, 4, "requeued"),  # stopped at the time limit after saving: requeued to resume
        (0, 8, "done"),  # reached train_iters: DONE, not requeued
        (4, 4, "stuck"),  # no progress: not requeued, the task fails
    ],
)
def test_slurm_task_requeues_itself_while_it_makes_progress(tmp_path, started, reached, expected):
    """The array task run by bash with stand-ins for srun (which 'trains' by moving the latest
    checkpoint pointer) and scontrol (which records a requeue)."""
    out = tmp_path / "sweep"
    result = tool(CPU_SWEEP, "--launcher", "slurm", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --signal=TERM@180\n" in script and "#SBATCH --requeue\n" in script
    assert "--exit-signal-handler" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f'#!/bin/bash\necho "$*" > {tmp_path}/srun_args\necho {reached} > "$RUN_DIR/'
        f'latest_checkpointed_iteration.txt"\necho "$EXIT_DURATION_FLAGS" > {tmp_path}/clock\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = requeue ]; then echo "$2" > {tmp_path}/requeued; '
        "else echo node01; fi\n"
    )
    (bin_dir / "squeue").write_text('#!/bin/bash\n[ "$*" = "-h -j 78 -o %L" ] && echo 1:00:00\n')
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    run_dir = out / "moe"
    if started:
        (run_dir / "latest_checkpointed_iteration.txt").write_text(str(started))
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_ARRAY_TASK_ID="0",
        SLURM_ARRAY_JOB_ID="77",
        SLURM_JOB_ID="78",
        SLURM_JOB_NODELIST="node01",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
    )
    task = subprocess.run(
        ["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    requeued = tmp_path / "requeued"
    if expected == "requeued":
        assert task.returncode == 0 and requeued.read_text().strip() == "77_0"
        assert "requeued to resume" in task.stderr
    elif expected == "done":
        assert task.returncode == 0 and not requeued.exists()
        assert (run_dir / "DONE").is_file()
    else:
        assert task.returncode == 1 and not requeued.exists()
        assert "made no progress" in task.stderr
    # and by the clock, 10 minutes before the job's limit (squeue: an hour left)
    assert "--exit-signal-handler $EXIT_DURATION_FLAGS" in (tmp_path / "srun_args").read_text()
    assert (tmp_path / "clock").read_text().strip() == "--exit-duration-in-mins 50"


def write_sweep(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expansion_names_and_router_switch(tmp_path):
    spec = dict(
        base=dict(config="configs/demo.yaml", train_iters=4, data_path="${SWEEP_DATA}"),
        grid=dict(
            router=["dense", "moe", "remoe"],
            num_experts=[4, 16],
            moe_relu_l1_reg_coeff_multiplier=[1.1],
        ),
        exclude=[dict(router="dense", num_experts=16)],
        paper={"remoe_e-16_alpha-1.1": 1.5},
    )
    sweep = sweeps.load_sweep(
        write_sweep(tmp_path / "grid.yaml", spec),
        output_dir=tmp_path,
        environ={"SWEEP_DATA": "0.5 /d/a 0.5 /d/b"},
    )
    assert [r.name for r in sweep.runs] == [
        "dense_e-4_alpha-1.1",
        "moe_e-4_alpha-1.1",
        "moe_e-16_alpha-1.1",
        "remoe_e-4_alpha-1.1",
        "remoe_e-16_alpha-1.1",
    ]
    dense, moe, _, remoe, remoe16 = sweep.runs
    assert not any(k == "num_experts" or k.startswith("moe_") for k in dense.flags)
    assert dense.router == "dense" and moe.router == "moe" and remoe.router == "remoe"
    assert moe.flags["moe_router_pre_softmax"] and moe.flags["moe_aux_loss_coeff"] == 0.01
    assert "moe_relu_routing" not in moe.flags and remoe.flags["moe_relu_routing"]
    assert remoe16.flags["num_experts"] == 16 and remoe16.paper == 1.5
    assert remoe.flags["train_iters"] == 4 and remoe.flags["num_layers"] == 4  # base, demo.yaml
    assert remoe.flags["data_path"] == ["0.5", "/d/a", "0.5", "/d/b"]
    assert remoe.directory == tmp_path / "remoe_e-4_alpha-1.1"
    with pytest.raises(sweeps.SweepError, match="SWEEP_DATA not set"):
        sweeps.load_sweep(tmp_path / "grid.yaml", output_dir=tmp_path, environ={})


def test_paper_sweeps_expand_and_parse(tmp_path):
    env = dict(
        DATA_PATH="1.0 /d/pile_00_text_document", VOCAB_FILE="/d/v.json", MERGE_FILE="/d/m.txt"
    )
    expected = {
        "size": 9,
        "experts": 12,
        "granularity": 14,
        "alpha": 5,
        "lambda0": 5,
        "load_balancing": 4,
        "table2": 8,
        "table2_cpu": 24,
    }
    for name, count in expected.items():
        sweep = sweeps.load_sweep(
            REPO / "configs" / "sweeps" / f"{name}.yaml", output_dir=tmp_path / name, environ=env
        )
        assert len(sweep.runs) == count, name
        sweeps.validate_runs(sweep)  # pretrain_gpt.py's parser accepts every run
    experts = sweeps.load_sweep(
        REPO / "configs" / "sweeps" / "experts.yaml", output_dir=tmp_path, environ=env
    )
    e128 = next(r for r in experts.runs if r.name == "remoe_e-128")
    assert e128.flags["num_experts"] == 128 and e128.flags["moe_relu_routing"]
    assert e128.flags["hidden_size"] == 768 and e128.flags["moe_layer_recompute"]


def test_bad_flag_names_the_run(tmp_path):
    spec = dict(base=dict(config="configs/demo.yaml"), grid=dict(num_layer=[2]))
    sweep = sweeps.load_sweep(write_sweep(tmp_path / "bad.yaml", spec), output_dir=tmp_path)
    with pytest.raises(
        sweeps.SweepError,
        match="bad.yaml: grid.num_layer is not a pretrain_gpt.py flag; did you mean num_layers",
    ):
        sweeps.validate_runs(sweep)


@pytest.mark.integration
def test_failed_run_is_not_marked_done(tmp_path):
    spec = dict(
        base=dict(
            config="configs/demo.yaml",
            demo_corpus=None,
            data_path="/nonexistent/prefix_text_document",
            vocab_file="/nonexistent/v.json",
            merge_file="/nonexistent/m.txt",
        ),
        grid=dict(seed=[1, 2]),
    )
    sweep = sweeps.load_sweep(write_sweep(tmp_path / "fail.yaml", spec), output_dir=tmp_path)
    log = []
    outcome = sweeps.run_local(
        sweep, out=type("Out", (), dict(write=log.append, flush=lambda self: None))()
    )
    assert outcome == {"seed-1": "failed"}  # stops at the first failure
    assert not (tmp_path / "seed-1" / "DONE").exists()
    assert "FAILED (exit code 2)" in "".join(log)
    assert "does not exist" in (tmp_path / "seed-1" / "train.log").read_text()


def test_table2_collects_the_papers_shape_with_its_numbers(tmp_path):
    """configs/sweeps/table2.yaml: one row per router in the paper's order, our zero-shot
    average with the paper's beside it, then our validation loss; each run's router is the
    one its row names."""
    env = dict(
        DATA_PATH="1.0 /d/pile_00_text_document", VOCAB_FILE="/d/v.json", MERGE_FILE="/d/m.txt"
    )
    sweep = sweeps.load_sweep(
        REPO / "configs" / "sweeps" / "table2.yaml", output_dir=tmp_path, environ=env
    )
    for run in sweep.runs:
        sweeps.prepare(run)  # writes its config.yaml
    parsed = {run.name: parse_args(sweeps.run_argv(run)) for run in sweep.runs}
    kinds = {name: args.moe_router_type for name, args in parsed.items() if args.num_experts}
    assert kinds == {
        "182m_hash_scale-none": "hash",
        "182m_lory_scale-none": "lory",
        "182m_sparsemixer_scale-none": "sparsemixer",
        "182m_ec_scale-none": "expert_choice",
        "182m_moe_scale-none": "topk",
        "182m_moe_scale-8.0": "topk",
        "182m_remoe_scale-none": "relu",
    }
    for index, run in enumerate(sweep.runs):
        (run.directory / "metrics.jsonl").write_text(
            json.dumps({"iteration": 60000, "val_lm_loss": 2.0 - index / 100}) + "\n"
        )
        (run.directory / "zero_shot.json").write_text(json.dumps({"avg": 38.0 + index / 10}))
    markdown = sweeps.collect(sweep)["markdown"]
    zero_shot, loss = markdown.split("Validation loss:")
    rows = [line for line in zero_shot.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "Dense",
        "Hash",
        "Lory",
        "SparseMixer-v2",
        "Expert Choice",
        "TopK MoE",
        "TopK MoE gate x 8",
        "ReMoE",
    ]
    assert "| Dense | 38.00 (38.2)" in rows[1] and "| ReMoE | 38.70 (40.03)" in rows[8]
    # the paper's dMoE (39.67) sits beside the unscaled TopK, not the gate x 8 one
    assert "| TopK MoE | 38.50 (39.67)" in rows[6] and rows[7].startswith(
        "| TopK MoE gate x 8 | 38.60 (iter None)"
    )
    assert "| ReMoE | 1.9300" in loss  # the 8th run's validation loss


@pytest.mark.parametrize("name", ["table2", "table2_cpu"])
def test_table2_has_the_unscaled_topk_of_the_paper_and_the_gate_x_e_over_k_one(name, tmp_path):
    """Both TopK rows: megatron's unscaled gate (the paper's dMoE) and the gate x E/k = 8, and
    no other router gets a gate scale."""
    env = dict(
        DATA_PATH="1.0 /d/pile_00_text_document", VOCAB_FILE="/d/v.json", MERGE_FILE="/d/m.txt"
    )
    sweep = sweeps.load_sweep(
        REPO / "configs" / "sweeps" / f"{name}.yaml", output_dir=tmp_path, environ=env
    )
    topk = {}
    for run in sweep.runs:
        sweeps.prepare(run)
        args = parse_args(sweeps.run_argv(run))
        if run.router == "moe":
            assert args.moe_router_type == "topk" and not args.moe_relu_routing
            assert args.moe_router_pre_softmax and args.moe_aux_loss_coeff == 0.01
            row = "_".join(
                part
                for part in run.name.split("_")
                if part != "182m" and not part.startswith("seed-")
            )
            topk[row] = args.moe_router_topk_scaling_factor
        else:
            assert args.moe_router_topk_scaling_factor is None, run.name
    assert topk == {"moe_scale-none": None, "moe_scale-8.0": 8.0}
    if name == "table2":
        assert {run.name: run.paper for run in sweep.runs if run.router == "moe"} == {
            "182m_moe_scale-none": 39.67,
            "182m_moe_scale-8.0": None,
        }


def test_replicates_are_averaged_with_their_spread(tmp_path):
    spec = dict(
        name="seeds",
        base=dict(config="configs/demo.yaml"),
        grid=dict(router=["dense", "moe"], seed=[1, 2, 3]),
        table=dict(columns=None, replicates="seed"),
    )
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = sweeps.load_sweep(path, output_dir=tmp_path / "out")
    losses = {"dense": [4.0, 4.2, 4.1], "moe": [5.0, 5.5, 5.25]}
    for run in sweep.runs:
        run.directory.mkdir(parents=True)
        value = losses[run.values["router"]][run.values["seed"] - 1]
        (run.directory / "metrics.jsonl").write_text(
            json.dumps({"iteration": 600, "lm_loss": value})
            + "\n"
            + json.dumps({"iteration": 600, "val_lm_loss": value})
            + "\n"
        )
        (run.directory / "DONE").write_text("")
    collected = sweeps.collect(sweep)
    assert "| Dense | 4.1000 ± 0.1000 (n=3) |" in collected["markdown"]
    assert "| TopK MoE | 5.2500 ± 0.2500 (n=3) |" in collected["markdown"]
    by_router = {row["router"]: row for row in collected["table"]}
    assert by_router["TopK MoE"]["value val_lm_loss"] == pytest.approx(5.25)
    assert by_router["TopK MoE"]["value val_lm_loss spread"] == pytest.approx(0.25)


@pytest.mark.integration
def test_listing_and_collecting_need_no_environment_variables(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "VOCAB_FILE", "MERGE_FILE")
    }
    experts = str(REPO / "configs" / "sweeps" / "experts.yaml")

    def sweep_tool(*argv):
        return subprocess.run(
            [sys.executable, TOOL, experts, "--output-dir", str(tmp_path), *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    listed = sweep_tool()
    assert listed.returncode == 0, listed.stderr
    assert "# DATA_PATH, MERGE_FILE, VOCAB_FILE not set" in listed.stdout
    commands = [line for line in listed.stdout.splitlines() if "pretrain_gpt.py --config" in line]
    assert len(commands) == 12
    # each command's config.yaml is there, without the flags that need the variables; the
    # command shows those with the placeholders, and runs once they are exported
    configs = sorted(tmp_path.glob("*/config.yaml"))
    assert len(configs) == 12
    assert not any(
        "${" in path.read_text() or "data_path" in yaml.safe_load(path.read_text())
        for path in configs
    )
    assert commands[0].endswith(
        ' --data-path ${DATA_PATH} --vocab-file "${VOCAB_FILE}" --merge-file "${MERGE_FILE}"'
    )
    words = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + commands[0]],
        capture_output=True,
        text=True,
        check=True,
        env={
            **env,
            "DATA_PATH": "0.5 /d/a_text_document 0.5 /d/b",
            "VOCAB_FILE": "/d/my vocab.json",
            "MERGE_FILE": "/d/m.txt",
        },
    )
    argv = words.stdout.splitlines()
    parsed = parse_args(argv[argv.index(str(REPO / "pretrain_gpt.py")) + 1 :])
    assert parsed.data_path == ["0.5", "/d/a_text_document", "0.5", "/d/b"]
    assert (parsed.vocab_file, parsed.merge_file) == ("/d/my vocab.json", "/d/m.txt")
    assert parsed.num_experts == 4 and parsed.expert_model_parallel_size == 4
    assert sweep_tool("--collect").returncode == 0
    started = sweep_tool("--launcher", "local")
    assert started.returncode == 2
    assert "DATA_PATH not set in the environment" in started.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    "grid_line, message",
    [
        (
            "num_expert: [4]",
            "{path}: grid.num_expert is not a pretrain_gpt.py flag; did you mean num_experts?",
        ),
        (
            "moe_router_topk: [9]",
            "{path}: run moe_k-9: pretrain_gpt.py refuses its flags: "
            "--moe-router-topk 9: must be between 1 and --num-experts 8",
        ),
    ],
)
def test_a_bad_grid_value_is_reported_against_the_sweep_file(tmp_path, grid_line, message):
    spec = yaml.safe_load(open(CPU_SWEEP))
    key, values = grid_line.split(": ")
    spec["grid"] = {"router": ["moe"], key: yaml.safe_load(values)}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = tool(str(path), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == "sweep.py: error: " + message.format(path=path)


def test_topk_runs_keep_their_gates_scaled_by_their_own_e_over_k(tmp_path):
    experts = sweeps.load_sweep(
        REPO / "configs" / "sweeps" / "experts.yaml",
        output_dir=tmp_path,
        environ=dict(DATA_PATH="d", VOCAB_FILE="v", MERGE_FILE="m"),
    )
    scales = {run.name: run.flags.get("moe_router_topk_scaling_factor") for run in experts.runs}
    assert scales["moe_e-8"] == 8.0 and scales["moe_e-64"] == 64.0  # the config says 8.0 for E=8
    assert scales["remoe_e-64"] is None
    baseline = sweeps.load_sweep(
        REPO / "configs" / "sweeps" / "topk_baseline.yaml", output_dir=tmp_path
    )
    scales = {run.name: run.flags.get("moe_router_topk_scaling_factor") for run in baseline.runs}
    assert scales["moe_scale-none_seed-1234"] is None and scales["moe_scale-8.0_seed-1234"] == 8.0
    assert "moe_router_topk_scaling_factor" not in baseline.runs[0].flags  # dense


# ---------------------------------------------------------------------------------------------
# Replicates (issue 22, paired seeds): t-intervals, paired differences, validation curves

T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446}  # Student's t quantiles (any table)
# final validation (and test) losses by router and seed; a missing seed is not a run
SEED_LOSSES = {
    "remoe": {1: 4.0, 2: 4.5, 3: 4.2},
    "moe": {1: 4.1, 2: 4.7, 3: 4.5, 4: 9.9},  # differences 0.1, 0.2, 0.3; seed 4 unpaired
    "dense": {1: 5.0, 2: 5.6, 3: 5.1},  # differences 1.0, 1.1, 0.9: excludes 0
    "hash": {2: 4.8},  # one seed
}


def seeds_sweep(tmp_path, **table):
    """A sweep of the four routers over seeds 1-4, the runs SEED_LOSSES lacks excluded, with
    metrics.jsonl files of validation losses at iterations 100, 200, 300 (the last one is
    SEED_LOSSES's) and a test loss for moe and remoe (the validation loss + 0.05 * seed)."""
    seeds = [1, 2, 3, 4]
    spec = dict(
        name="paired",
        base=dict(config="configs/demo.yaml"),
        grid=dict(router=list(SEED_LOSSES), seed=seeds),
        exclude=[
            dict(router=r, seed=s) for r in SEED_LOSSES for s in seeds if s not in SEED_LOSSES[r]
        ],
        table=dict(columns=None, replicates="seed", **table),
    )
    sweep = sweeps.load_sweep(
        write_sweep(tmp_path / "paired.yaml", spec), output_dir=tmp_path / "out"
    )
    for run in sweep.runs:
        router, seed = run.values["router"], run.values["seed"]
        final = SEED_LOSSES[router][seed]
        run.directory.mkdir(parents=True)
        lines = [{"iteration": it, "lm_loss": final + 1} for it in (100, 200, 300)]
        lines += [
            {"iteration": it, "val_lm_loss": final + (300 - it) / 100} for it in (100, 200, 300)
        ]
        if router in ("moe", "remoe"):
            lines.append({"iteration": 300, "test_lm_loss": final + 0.05 * seed})
        (run.directory / "metrics.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines)
        )
        (run.directory / "DONE").write_text("")
    return sweep


def final_losses(run_dir: Path, key="val_lm_loss") -> float:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r[key] for r in records if key in r][-1]


def independent_interval(values):
    """mean and half-width of the 95% t-interval, computed here with statistics.stdev."""
    import statistics

    return statistics.mean(values), T_975[len(values) - 1] * statistics.stdev(values) / len(
        values
    ) ** 0.5


def test_t_quantiles_match_the_t_distribution():
    assert sweeps.t_quantile_975(2) == pytest.approx(4.303, abs=5e-4)
    assert sweeps.t_quantile_975(30) == pytest.approx(2.042, abs=5e-4)
    assert sweeps.t_quantile_975(60) == pytest.approx(2.000, abs=5e-4)  # beyond the table
    assert sweeps.t_quantile_975(10**6) == pytest.approx(1.95997, abs=1e-4)
    try:
        from scipy import stats
    except ImportError:
        return
    for df in list(range(1, 40)) + [50, 100, 1000]:
        assert sweeps.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-6)


def test_replicates_get_t_intervals_and_paired_differences(tmp_path):
    sweep = seeds_sweep(tmp_path)
    out = tmp_path / "out"
    collected = sweeps.collect(sweep)
    markdown = collected["markdown"]
    assert markdown == (out / "results.md").read_text()
    # the mean and interval of each row, from the metrics.jsonl files written above
    finals = {
        r: {s: final_losses(out / f"{r}_seed-{s}") for s in seeds}
        for r, seeds in SEED_LOSSES.items()
    }
    mean, half = independent_interval(list(finals["remoe"].values()))
    assert (mean, half) == pytest.approx((4.23333, 0.62516), abs=1e-5)
    assert (
        f"| ReMoE | 3 | {mean:.4f} | ± {half:.4f} [{mean - half:.4f}, "
        f"{mean + half:.4f}] | 3 |" in markdown
    )
    interval = next(
        i
        for i in collected["seeds"]["intervals"]
        if i["row"] == "remoe" and i["value"] == "val_lm_loss"
    )
    assert (interval["n"], interval["mean"], interval["half_width"]) == pytest.approx(
        (3, mean, half), abs=1e-9
    )
    mean, half = independent_interval(list(finals["moe"].values()))  # its 4 seeds: t(3)
    assert (mean, half) == pytest.approx((5.8, 4.367417), abs=1e-6)
    assert "| TopK MoE | 4 | 5.8000 | ± 4.3674 [1.4326, 10.1674] | 4 |" in markdown
    assert "| Hash | 1 (one seed) | 4.8000 | one seed: no interval | 0 | n/a | - |" in markdown
    assert "| Hash | 4.8000 (one seed) |" in markdown  # the first table's cell
    assert (
        next(row for row in collected["table"] if row["router"] == "Hash")[
            "value val_lm_loss spread"
        ]
        == ""
    )  # no spread of one value
    assert (
        "| row | n | validation loss mean | 95% interval | n (test loss) | test loss mean | "
        "95% interval |" in markdown
    )

    # paired: MoE - ReMoE over seeds 1-3 = 0.1, 0.2, 0.3 -> 0.2 ± 4.303 * 0.1 / sqrt(3)
    differences = [finals["moe"][s] - finals["remoe"][s] for s in (1, 2, 3)]
    mean, half = independent_interval(differences)
    assert (mean, half) == pytest.approx((0.2, 0.248414), abs=1e-6)
    assert "reference row ReMoE (remoe)" in markdown
    assert (
        f"| TopK MoE | 3 (1 unpaired left out: seed 4 only in this row) | +{mean:.4f} | "
        f"± {half:.4f} [{mean - half:+.4f}, {mean + half:+.4f}] | no |"
    ) in markdown
    assert (
        "| TopK MoE | 3 (1 unpaired left out: seed 4 only in this row) | +0.2000 | "
        "± 0.2484 [-0.0484, +0.4484] | no |" in markdown
    )
    paired = {(p["row"], p["value"]): p for p in collected["seeds"]["paired"]}
    moe = paired[("moe", "val_lm_loss")]
    assert (moe["n"], moe["mean"], moe["half_width"]) == pytest.approx((3, mean, half))
    assert moe["seeds"] == [1, 2, 3] and moe["unpaired_row"] == [4]
    assert moe["unpaired_reference"] == [] and moe["excludes_zero"] is False
    # dense: 1.0, 1.1, 0.9 -> 1.0 ± 0.2484, which excludes 0
    mean, half = independent_interval([finals["dense"][s] - finals["remoe"][s] for s in (1, 2, 3)])
    assert (
        f"| Dense | 3 | +{mean:.4f} | ± {half:.4f} [+{mean - half:.4f}, +{mean + half:.4f}] "
        "| yes |" in markdown
    )
    assert paired[("dense", "val_lm_loss")]["excludes_zero"] is True
    # hash: one pair (seed 2), the reference's seeds 1 and 3 left out and counted
    assert (
        "| Hash | 1 (2 unpaired left out: seed 1, 3 only in the reference) | +0.3000 | "
        "one pair: no interval | - |" in markdown
    )
    # the test loss, where logged (moe and remoe): the differences are 0.1+0.05*s - 0.05*s
    test = paired[("moe", "test_lm_loss")]
    assert (test["n"], test["mean"], test["half_width"]) == pytest.approx(
        (
            3,
            mean_of(
                [
                    final_losses(out / f"moe_seed-{s}", "test_lm_loss")
                    - final_losses(out / f"remoe_seed-{s}", "test_lm_loss")
                    for s in (1, 2, 3)
                ]
            ),
            0.248414,
        ),
        abs=1e-6,
    )
    test_table = markdown[markdown.index("test loss difference") :]
    assert test_table.count("\n| ") == 1  # one row, TopK MoE: Dense and Hash have none
    assert ("dense", "test_lm_loss") not in paired


def mean_of(values):
    return sum(values) / len(values)


@pytest.mark.integration
def test_the_reference_row_is_a_sweep_file_option(tmp_path):
    sweep = seeds_sweep(tmp_path, reference="moe")
    collected = sweeps.collect(sweep)
    assert collected["seeds"]["reference"] == "moe"
    assert "reference row TopK MoE (moe)" in collected["markdown"]
    remoe = next(
        p
        for p in collected["seeds"]["paired"]
        if p["row"] == "remoe" and p["value"] == "val_lm_loss"
    )
    assert remoe["mean"] == pytest.approx(-0.2) and remoe["unpaired_reference"] == [4]
    assert (
        "| ReMoE | 3 (1 unpaired left out: seed 4 only in the reference) | -0.2000 | "
        "± 0.2484 [-0.4484, +0.0484] | no |" in collected["markdown"]
    )
    # the command line's --reference wins over the file's; a mapping of grid values works too
    assert sweeps.collect(sweep, reference={"router": "dense"})["seeds"]["reference"] == "dense"
    result = tool(
        str(sweep.path),
        "--collect",
        "--output-dir",
        str(tmp_path / "out"),
        "--reference",
        "hash",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "reference row Hash (hash)" in result.stdout
    assert "written: " in result.stdout and "val_curves.png" in result.stdout.splitlines()[-1]
    with pytest.raises(
        sweeps.SweepError, match="table.reference 'lory' matches no row: remoe, moe, dense, hash"
    ):
        sweeps.collect(sweep, reference="lory")


def test_without_a_single_remoe_row_there_is_no_default_reference(tmp_path):
    spec = dict(
        name="two",
        base=dict(config="configs/demo.yaml"),
        grid=dict(router=["moe", "dense"], seed=[1, 2]),
        table=dict(columns=None, replicates="seed"),
    )
    sweep = sweeps.load_sweep(write_sweep(tmp_path / "two.yaml", spec), output_dir=tmp_path)
    for run in sweep.runs:
        run.directory.mkdir(parents=True)
        (run.directory / "metrics.jsonl").write_text(
            json.dumps({"iteration": 10, "val_lm_loss": 3.0 + run.values["seed"]}) + "\n"
        )
    collected = sweeps.collect(sweep)
    assert (
        "No paired differences: no ReMoE row; set table.reference to a row."
        in collected["markdown"]
    )
    assert collected["seeds"]["paired"] == [] and len(collected["seeds"]["intervals"]) == 2
    assert (
        "| TopK MoE | 2 (not all finished) | 4.5000 | ± 6.3531 [-1.8531, 10.8531] |"
        in collected["markdown"]
    )


def test_validation_curves_are_plotted_one_per_row(tmp_path):
    sweep = seeds_sweep(tmp_path)
    collected = sweeps.collect(sweep)
    png = tmp_path / "out" / "val_curves.png"
    assert collected["plot"] == png
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (700, 450)
    assert "[val_curves.png](val_curves.png)" in collected["markdown"]
    assert "![validation curves](val_curves.png)" in collected["markdown"]
    assert (
        "Validation curves of every row (4; mean over seeds, band min-max)" in collected["markdown"]
    )
    # the figure: one line per row, the mean over its seeds, a min-max band where they differ
    curves = sweeps.validation_curves([g for g in _groups_of(sweep)])
    assert [c[0] for c in curves] == collected["curves"] == ["ReMoE", "TopK MoE", "Dense", "Hash"]
    figure = sweeps.plot_validation_curves(curves, tmp_path / "again.png")
    axes = figure.axes[0]
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == ["ReMoE", "TopK MoE", "Dense", "Hash"]
    moe = lines[1]
    assert list(moe.get_xdata()) == [100, 200, 300]
    assert list(moe.get_ydata()) == pytest.approx([7.8, 6.8, 5.8])  # mean of 4 seeds' curves
    assert len(axes.collections) == 3  # bands: Hash has one seed
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _groups_of(sweep):
    """The rows of a seeds sweep as collect groups them (router order, the runs of each)."""
    results = [sweeps.run_result(run) for run in sweep.runs]
    return [
        dict(
            label=sweeps.sweep_router_title(router),
            runs=[r for r in results if r["router"] == router],
        )
        for router in SEED_LOSSES
    ]
