"""A tiny model trained in process, as the training-step, checkpointing and optimizer tests
train it: batches for it, its command line and built training objects, and a tiny ReMoE in bf16
under megatron's distributed optimizer."""

from __future__ import annotations

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from remoe_patches.train import checkpointing
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.runtime.megatron_fixes import initialize_adam_state
from remoe_patches.model.build import build_model
from remoe_patches.train.training_step import forward_backward, wrap_with_ddp

from tiny import TINY_MODEL, TINY_RELU_MODEL

SEQ = TINY_MODEL["seq_length"]


def make_batch(seed, batch_size=2, kept=None):
    """A batch dict; ``kept``: how many leading positions of each row count in the loss."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (batch_size, SEQ + 1), generator=gen)
    mask = torch.ones(batch_size, SEQ)
    if kept is not None:
        for row, count in enumerate(kept):
            mask[row, count:] = 0.0
    return dict(
        tokens_BS=tokens[:, :-1],
        labels_BS=tokens[:, 1:],
        loss_mask_BS=mask,
        position_ids_BS=torch.arange(SEQ).expand(batch_size, -1),
    )


TRAIN_FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "64",
    "--seq-length",
    str(SEQ),
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr",
    "1e-2",
    "--train-iters",
    "10",
    "--clip-grad",
    "0.05",
    "--mock-data",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
    "--position-embedding-type",
    "rope",
    "--attention-dropout",
    "0.0",
    "--hidden-dropout",
    "0.0",
]
ROUTER_FLAGS = {
    "dense": [],
    "topk": ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"],
    "relu": ["--num-experts", "4", "--moe-router-topk", "1", "--moe-relu-routing"],
}


def training_objects(router, *extra):
    from remoe_patches.cli.arguments import parse_run_config
    from remoe_patches.train.training import build_training_objects

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = parse_run_config(TRAIN_FLAGS + ROUTER_FLAGS[router] + list(extra))
    config = config.replace(model=dict(vocab_size=TINY_MODEL["vocab_size"]))
    return config, build_training_objects(config, device=torch.device("cpu"))


def step_kwargs(config):
    return dict(
        seq_length=SEQ,
        micro_batch_size=config.training.micro_batch_size,
        global_batch_size=config.training.global_batch_size,
    )


def distributed_bf16_run(parallel, *, eager_state=True, seed=0):
    """A tiny ReMoE model in bf16 under megatron's distributed optimizer with torch's AdamW."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)  # megatron initializes weights from its RNG tracker
    built = build_model(ModelConfig(**TINY_RELU_MODEL), parallel, bf16=True)
    model = Float16Module(built.transformer_config, built.model)
    ddp = wrap_with_ddp(model, built.transformer_config, use_distributed_optimizer=True)
    config = OptimizerConfig(
        optimizer="adam",
        lr=1e-2,
        bf16=True,
        params_dtype=torch.bfloat16,
        use_distributed_optimizer=True,
        weight_decay=0.1,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    if eager_state:
        initialize_adam_state(optimizer)
    return built, ddp, optimizer


def saved_after_training(parallel, directory, steps=2):
    """A run trained ``steps`` steps and saved to ``directory`` as checkpoint ``steps``."""
    built, ddp, optimizer = distributed_bf16_run(parallel)
    train(ddp, optimizer, steps)
    checkpointing.save_checkpoint(
        str(directory),
        steps,
        [ddp],
        optimizer,
        None,
        consumed_samples=2 * steps,
        regularizer=built.regularizer,
    )
    return built, ddp, optimizer


def train(ddp, optimizer, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(
            0, TINY_RELU_MODEL["vocab_size"], (2, TINY_RELU_MODEL["seq_length"] + 1), generator=gen
        )
        batch = dict(
            tokens_BS=tokens[:, :-1],
            labels_BS=tokens[:, 1:],
            loss_mask_BS=torch.ones(2, TINY_RELU_MODEL["seq_length"]),
            position_ids_BS=torch.arange(TINY_RELU_MODEL["seq_length"]).expand(2, -1),
        )
        optimizer.zero_grad()
        forward_backward(
            [ddp],
            [batch],
            num_microbatches=1,
            seq_length=TINY_RELU_MODEL["seq_length"],
            micro_batch_size=2,
        )
        assert optimizer.step()[0]
