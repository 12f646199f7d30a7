"""Checkpoints of small runs that the evaluation and export tests share: trained by
``pretrain_gpt.py`` in subprocesses (3 steps on a small demo corpus) on first use and cached
under pytest's session temp dir.

- ``relu``: 1-process ReMoE; ``topk``: 1-process TopK MoE; ``dense``: 1-process dense;
  ``expert_choice``: 1-process Expert Choice (a router that routes a token by its neighbours).
- ``relu-ep2`` / ``relu-tp2``: the ``relu`` checkpoint loaded by ``pretrain_gpt.py`` on 2 ranks
  with EP=2 (resp. TP=2 + sequence parallel) and saved again with no training step: the same
  weights, written as 2 ranks' shards. Evaluating them on one process must give exactly the
  numbers of ``relu``, which exercises megatron's resharding into the 1-process model. The
  ``relu`` run pads the vocabulary to a multiple of 256, the TP=2 run to 128 x TP = 256: the
  loader must pad with the *saved* TP size to rebuild the same 512-row embedding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from remoe_patches.runtime.parallel import free_port

from training_runs import REPO

SEQ = 32
# Reference model vs megatron-core logits: max |difference| <= this x max |logit|.
RELATIVE_TOLERANCE = 1e-5


def _cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "remoe-eval-cache"
    root.mkdir(exist_ok=True)
    return root


def _corpus(tmp_path_factory):
    from remoe_patches.data.demo_corpus import build_demo_corpus

    root = _cache_root(tmp_path_factory) / "corpus"
    done = root / "built.json"
    if done.exists():
        return json.loads(done.read_text())
    corpus = build_demo_corpus(root, vocab_size=384, max_chars_per_domain=40_000)
    info = dict(
        data_prefix=corpus.data_prefix, vocab_file=corpus.vocab_file, merge_file=corpus.merge_file
    )
    done.write_text(json.dumps(info))
    return info


def _flags(corpus, save, router, **overrides) -> list:
    flags = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=SEQ,
        max_position_embeddings=SEQ,
        ffn_hidden_size=128,
        position_embedding_type="rope",
        rotary_base=1000000,
        normalization="RMSNorm",
        init_method_std=0.02,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        make_vocab_size_divisible_by=256,
        micro_batch_size=2,
        global_batch_size=4,
        lr=1e-3,
        min_lr=1e-4,
        lr_decay_style="cosine",
        lr_warmup_iters=1,
        train_iters=3,
        seed=1234,
        data_path=corpus["data_prefix"],
        split="969,30,1",
        vocab_file=corpus["vocab_file"],
        merge_file=corpus["merge_file"],
        log_interval=1,
        eval_interval=None,
        eval_iters=1,
        save=save,
    )
    if router != "dense":
        flags.update(
            num_experts=8,
            moe_router_topk=1,
            moe_aux_loss_coeff=1e-2,
            moe_token_dispatcher_type="alltoall",
            moe_relu_l1_reg_coeff_init=0.05,
        )
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    argv += [
        "--disable-bias-linear",
        "--no-position-embedding",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--group-query-attention",
    ]
    if router == "topk":
        argv += ["--moe-router-pre-softmax"]
    if router == "relu":
        argv += ["--moe-relu-routing"]
    if router == "expert_choice":
        argv += ["--moe-router-type", "expert_choice"]
    return argv


def clean_env(**extra) -> dict:
    """This process's environment without torch.distributed rendezvous variables: a
    subprocess must not reuse a port that this process may hold."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _pretrain(argv, nproc=1):
    script = str(REPO / "pretrain_gpt.py")
    command = (
        [sys.executable, script, *argv]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            script,
            *argv,
        ]
    )
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


RESAVED = {
    "relu-ep2": ["--expert-model-parallel-size", "2"],
    "relu-grouped-ep2": ["--expert-model-parallel-size", "2", "--moe-grouped-gemm"],
    "relu-tp2": [
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--make-vocab-size-divisible-by",
        "128",
    ],
}


def checkpoint(tmp_path_factory, name: str) -> str:
    """The cached checkpoint ``name`` (see the module docstring), trained on first use."""
    save = _cache_root(tmp_path_factory) / name
    if (save / "latest_checkpointed_iteration.txt").exists():
        return str(save)
    corpus = _corpus(tmp_path_factory)
    if name in ("relu", "topk", "dense", "expert_choice"):
        _pretrain(_flags(corpus, save, name))
    else:
        source = checkpoint(tmp_path_factory, "relu")
        argv = (
            _flags(corpus, save, "relu", load=source)
            + ["--no-load-optim", "--no-load-rng", "--no-save-optim"]
            + RESAVED[name]
        )
        _pretrain(argv, nproc=2)
    return str(save)


def tokens_for(vocab_size: int, batch=3, length=SEQ, seed=0) -> torch.Tensor:
    return torch.randint(
        0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )
