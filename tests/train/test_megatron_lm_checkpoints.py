"""Checkpoints in Megatron-LM's layout (and the ReMoE authors' fork's lambda buffer) load as this
project's: written here with megatron-core's own calls and Megatron-LM's common state, they
resume ``pretrain_gpt.py`` exactly as the same state in this project's layout does, also with
``--use-checkpoint-args`` and no model flags."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from remoe_patches.train import checkpointing
from remoe_patches.runs import run_directory
from remoe_patches.cli.arguments import parse_run_config
from remoe_patches.train.megatron_lm_checkpoints import take_architecture_args
from remoe_patches.data.tokenizer import build_tokenizer, vocab_size_with_padding
from remoe_patches.train.training import build_training_objects, check_batch_sizes
from remoe_patches.train.training_step import train_step

from training_runs import authors_style_flags, ok, run, steps

MODEL_FLAGS = (
    "--num-layers",
    "--hidden-size",
    "--num-attention-heads",
    "--num-query-groups",
    "--seq-length",
    "--max-position-embeddings",
    "--ffn-hidden-size",
    "--num-experts",
    "--moe-router-topk",
    "--moe-relu-routing",
    "--moe-granularity",
)


def megatron_lm_args(config, consumed_samples: int) -> argparse.Namespace:
    """The architecture and progress entries of Megatron-LM's ``args`` for ``config``."""
    model = config.model
    return argparse.Namespace(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.dense_ffn_hidden_size,
        seq_length=model.seq_length,
        max_position_embeddings=model.seq_length,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        group_query_attention=True,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        num_experts=model.num_experts,
        moe_router_topk=model.topk,
        moe_relu_routing=True,
        moe_granularity=model.granularity,
        padded_vocab_size=model.vocab_size,
        consumed_train_samples=consumed_samples,
        moe_relu_l1_reg_coeff_multiplier=1.2,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        bf16=True,
        use_distributed_optimizer=True,
    )


def write_megatron_lm_checkpoint(root, iteration, objects, args) -> None:
    """A checkpoint as Megatron-LM core_v0.16.1 writes one (``save_checkpoint`` with
    ``--ckpt-format torch_dist``), with the fork's lambda buffer in the model's state."""
    metadata = {
        "distrib_optim_sharding_type": "dp_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }
    with_group = {
        **metadata,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    (ddp,) = objects.model_chunks
    model_state = ddp.module.module.sharded_state_dict(metadata=with_group)  # DDP > Float16Module
    optimizer_state = objects.optimizer.sharded_state_dict(
        model_state, is_loading=False, metadata=with_group
    )
    model_state["moe_relu_l1_reg_coeff"] = objects.regularizer.l1_coeff.detach().clone()
    state = dict(
        args=args,
        checkpoint_version=3.0,
        iteration=iteration,
        model=model_state,
        optimizer=optimizer_state,
        opt_param_scheduler=objects.scheduler.state_dict(),
        rng_state=ShardedObject(
            "rng_state", [{"random_rng_state": torch.get_rng_state()}], (1, 1), (0, 0), replica_id=0
        ),
        rerun_state_machine={"mode": "disabled"},
        num_floating_point_operations_so_far=0,
    )
    directory = run_directory.checkpoint_dir(str(root), iteration)
    os.makedirs(directory)
    dist_checkpointing.save(state, directory, content_metadata=metadata)
    run_directory.write_latest_iteration(str(root), iteration)


@pytest.fixture
def two_layouts(corpus, single_rank, tmp_path):
    """The same trained state (2 steps, lambda moved) saved in this project's layout and in
    Megatron-LM's."""
    root = tmp_path / "layouts"
    flags = authors_style_flags(corpus, root / "unused")
    config = parse_run_config(flags)
    data = config.data
    tokenizer = build_tokenizer(
        data.tokenizer_type, vocab_file=data.vocab_file, merge_file=data.merge_file
    )
    config = config.replace(
        model=dict(
            vocab_size=vocab_size_with_padding(
                tokenizer.vocab_size, data.make_vocab_size_divisible_by, 1
            )
        ),
        training=check_batch_sizes(config.training, 1),
    )
    objects = build_training_objects(config, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    seq = config.model.seq_length
    for _ in range(2):
        tokens = torch.randint(0, tokenizer.vocab_size, (2, seq + 1), generator=gen)
        batch = dict(
            tokens_BS=tokens[:, :-1],
            labels_BS=tokens[:, 1:],
            loss_mask_BS=torch.ones(2, seq),
            position_ids_BS=torch.arange(seq).expand(2, -1),
        )
        train_step(
            objects.model_chunks,
            objects.optimizer,
            objects.scheduler,
            objects.regularizer,
            [batch, batch],
            seq_length=seq,
            micro_batch_size=2,
            global_batch_size=4,
        )
    assert objects.regularizer.l1_coeff != config.model.router_options.l1_coeff_init
    ours, megatron_lm = root / "ours", root / "megatron_lm"
    checkpointing.save_checkpoint(
        str(ours),
        2,
        objects.model_chunks,
        objects.optimizer,
        objects.scheduler,
        consumed_samples=8,
        regularizer=objects.regularizer,
        run_config=config.to_dict(),
        data_parallel_size=1,
    )
    write_megatron_lm_checkpoint(
        megatron_lm, 2, objects, megatron_lm_args(config, consumed_samples=8)
    )
    return flags, ours, megatron_lm


def without_model_flags(flags) -> list:
    out, skip = [], False
    for token in flags:
        if skip and not token.startswith("--"):
            continue
        skip = token in MODEL_FLAGS
        if not skip:
            out.append(token)
    return out


@pytest.mark.integration
def test_a_megatron_lm_checkpoint_resumes_like_ours(corpus, two_layouts, tmp_path):
    _, ours, megatron_lm = two_layouts
    common = dict(save_interval=None, eval_interval=None)
    resumed = {}
    for name, load, extra in (
        ("ours", ours, []),
        ("megatron_lm", megatron_lm, []),
        ("megatron_lm args", megatron_lm, ["--use-checkpoint-args"]),
        ("ours args", ours, ["--use-checkpoint-args"]),
    ):
        save = tmp_path / name.replace(" ", "_")
        argv = authors_style_flags(corpus, save, **common)
        if extra:
            argv = without_model_flags(argv)
        result = ok(run(argv + ["--load", str(load)] + extra))
        assert (
            "resuming from" in result.stdout and "iteration 2, consumed samples 8" in result.stdout
        ), result.stdout[-2000:]
        resumed[name] = steps(save)
    expected = resumed.pop("ours")
    assert sorted(expected) == [3, 4, 5, 6]
    for name, got in resumed.items():
        for iteration in (3, 4, 5, 6):
            for key in ("lm_loss", "l1_coeff", "sparsity", "lr", "grad_norm"):
                assert got[iteration][key] == expected[iteration][key], (name, iteration, key)


def test_use_checkpoint_args_takes_megatron_lms_rule():
    """Forced flags always come from the checkpoint; the others only where none was given."""
    args = argparse.Namespace(
        num_layers=None, hidden_size=512, num_query_groups=2, moe_router_topk=2, lr=1e-3
    )
    saved = argparse.Namespace(
        num_layers=12, hidden_size=768, num_query_groups=4, moe_router_topk=1, lr=5e-4
    )
    taken = take_architecture_args(args, saved)
    assert (
        args.num_layers,
        args.hidden_size,
        args.num_query_groups,
        args.moe_router_topk,
        args.lr,
    ) == (12, 512, 4, 1, 1e-3)
    assert set(taken) == {"num_layers", "num_query_groups", "moe_router_topk"}


@pytest.mark.integration
def test_another_model_than_the_megatron_lm_checkpoints_is_refused_in_one_line(
    corpus, two_layouts, tmp_path
):
    flags, _, megatron_lm = two_layouts
    argv = authors_style_flags(
        corpus, tmp_path / "run", hidden_size=32, save_interval=None, eval_interval=None
    )
    result = run(argv + ["--load", str(megatron_lm)])
    assert result.returncode != 0
    assert (
        "holds another model than this run builds (--hidden-size: checkpoint 64, this run "
        "32)" in result.stderr + result.stdout
    )
