"""Training-step scenarios run on 1 or 2 CPU ranks by the parallel-equivalence tests.

The reference run (1 rank) builds the model, saves its weights with megatron's distributed
checkpointing, runs one step and saves its gradients the same way. A parallel run loads those
weights into its own shards, runs the same global batch and compares its gradient shards with
the reference ones loaded for the same layout, so megatron-core does all the resharding.
"""

from __future__ import annotations

import os

import torch

from megatron.core import dist_checkpointing, parallel_state

from remoe_patches.config.model_config import ModelConfig, ParallelConfig
from remoe_patches.model.build import build_model
from remoe_patches.runtime.parallel import destroy_parallel, initialize_parallel
from remoe_patches.train.training_step import forward_backward, wrap_with_ddp

from tiny import TINY_MODEL


def make_batches(global_batch: int, num_chunks: int, seq_length: int, vocab_size: int, seed=7):
    """The step's global batch, cut into ``num_chunks`` equal micro-batches."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (global_batch, seq_length + 1), generator=gen)
    position_ids = torch.arange(seq_length).expand(global_batch, -1)
    size = global_batch // num_chunks
    return [
        dict(
            tokens_BS=tokens[i * size : (i + 1) * size, :-1],
            labels_BS=tokens[i * size : (i + 1) * size, 1:],
            loss_mask_BS=torch.ones(size, seq_length),
            position_ids_BS=position_ids[i * size : (i + 1) * size],
        )
        for i in range(num_chunks)
    ]


def _sharded(model):
    return model.sharded_state_dict()


def _save(model, path):
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(_sharded(model), path)


def run_step(
    rank,
    world_size,
    *,
    ckpt_dir,
    parallel_kwargs,
    model_kwargs,
    global_batch,
    micro_batch,
    reference,
):
    """One training step; the reference saves weights and grads, the others compare to them."""
    parallel = ParallelConfig(**parallel_kwargs)
    initialize_parallel(parallel, rank=rank, world_size=world_size, seed=1234)
    try:
        model_config = ModelConfig(**{**TINY_MODEL, **model_kwargs})
        built = build_model(
            model_config,
            parallel,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        model = built.model
        if reference:
            _save(model, f"{ckpt_dir}/weights")
        else:
            model.load_state_dict(dist_checkpointing.load(_sharded(model), f"{ckpt_dir}/weights"))
        ddp = wrap_with_ddp(model, built.transformer_config)

        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        num_microbatches = global_batch // (micro_batch * dp_size)
        chunks = make_batches(
            global_batch,
            global_batch // micro_batch,
            TINY_MODEL["seq_length"],
            model_config.vocab_size,
        )
        mine = chunks[dp_rank * num_microbatches : (dp_rank + 1) * num_microbatches]
        losses = forward_backward(
            [ddp],
            mine,
            num_microbatches=num_microbatches,
            seq_length=TINY_MODEL["seq_length"],
            micro_batch_size=micro_batch,
        )
        result = {"lm_loss": losses["lm_loss"]}
        if built.regularizer is not None:
            stats = built.regularizer.finish_step()
            result.update(
                reg_loss_L=stats.reg_loss_L,
                sparsity_L=stats.sparsity_L,
                expert_load_LE=stats.expert_load_LE,
                step_sparsity=stats.sparsity,
                l1_coeff=built.regularizer.l1_coeff.clone(),
            )

        # (a hash router's weight is frozen: no gradient)
        grads = {
            name: param.main_grad.clone()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        if reference:
            for name, param in model.named_parameters():
                if name in grads:
                    param.data.copy_(grads[name])
            _save(model, f"{ckpt_dir}/grads")
        else:
            expected = dist_checkpointing.load(_sharded(model), f"{ckpt_dir}/grads")
            result["grad_errors"] = {
                name: (
                    (grads[name] - expected[name]).abs().max()
                    / expected[name].abs().max().clamp(min=1e-12)
                ).item()
                for name in grads
            }
        return result
    finally:
        destroy_parallel()
