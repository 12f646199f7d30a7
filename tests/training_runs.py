"""pretrain_gpt.py and the launch scripts run in subprocesses, as the end-to-end tests run them:
the flags of a CPU-sized run in the ReMoE authors' style, the run itself, its per-step records,
and the environment a launcher sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from remoe_patches.runtime.parallel import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
# The data a launcher's dry run names (the files need not exist).
BLEND = "0.6 /data/pile/pile_00_text_document 0.4 /data/pile/pile_01_text_document"
DATA_ENV = dict(
    DATA_PATH=BLEND, VOCAB_FILE="/data/gpt2-vocab.json", MERGE_FILE="/data/gpt2-merges.txt"
)


def authors_style_flags(corpus, save, **overrides) -> list:
    """The authors' 182M ReMoE launch flags (spec §7), with the sizes scaled down for a CPU."""
    flags = dict(
        # model
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=32,
        max_position_embeddings=32,
        ffn_hidden_size=128,
        position_embedding_type="rope",
        rotary_base=1000000,
        normalization="RMSNorm",
        init_method_std=0.01,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        make_vocab_size_divisible_by=256,  # the same padded vocabulary at TP=1 and TP=2
        # MoE (the TopK settings stay in the script; the ReLU router ignores them)
        num_experts=8,
        moe_router_topk=1,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type="alltoall",
        moe_granularity=1,
        moe_relu_l1_reg_coeff_init=0.05,
        # parallelism
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        # training
        micro_batch_size=2,
        global_batch_size=4,
        lr=5e-4,
        min_lr=5e-5,
        lr_decay_style="cosine",
        lr_warmup_fraction=0.2,
        train_iters=6,
        clip_grad=1.0,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.999,
        seed=1234,
        # data
        data_path=f"1.0 {corpus.data_prefix}",
        split="969,30,1",
        vocab_file=corpus.vocab_file,
        merge_file=corpus.merge_file,
        # logging and checkpoints
        log_interval=1,
        eval_interval=3,
        eval_iters=1,
        save=save,
        save_interval=3,
    )
    flags.update(overrides)
    switches = [
        "--use-mcore-models",
        "--disable-bias-linear",
        "--no-position-embedding",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--group-query-attention",
        "--moe-router-pre-softmax",
        "--moe-relu-routing",
        "--moe-grouped-gemm",
        "--use-flash-attn",
        "--no-masked-softmax-fusion",
        "--bf16",
        "--sequence-parallel",
        "--use-distributed-optimizer",
        "--log-throughput",
    ]
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        argv.append("--" + key.replace("_", "-"))
        argv.extend(str(value).split())
    return argv + [s for s in switches if s.strip("-").replace("-", "_") not in overrides]


def run(argv, nproc=1, timeout=600, env=None):
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
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def steps(save) -> dict:
    """metrics.jsonl's per-step records, by iteration."""
    records = [json.loads(line) for line in open(Path(save) / "metrics.jsonl")]
    return {r["iteration"]: r for r in records if "lm_loss" in r}


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def environment(**extra) -> dict:
    """This machine's environment without the launchers' variables, plus ``extra``; this
    Python's bin directory first on PATH (the scripts run ``python`` and ``torchrun``)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "GPUS_PER_NODE",
            "NNODES",
            "NODE_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "TP",
            "EP",
            "PP",
            "CHECKPOINT_DIR",
            "DATA_PATH",
            "VOCAB_FILE",
            "MERGE_FILE",
            "TORCHRUN",
            "PYTHON",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
        )
        and not k.startswith("SLURM_")
    }
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return {**env, "OMP_NUM_THREADS": "1", **DATA_ENV, **extra}
