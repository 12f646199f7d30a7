"""megatron_fixes: each workaround for a megatron-core 0.16.1 defect, checked against the behaviour
it restores (router gating without transformer-engine, torch Adam in the distributed optimizer)."""

from __future__ import annotations

import subprocess
import sys

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from remoe_patches import checkpointing
from remoe_patches.config import ModelConfig
from remoe_patches.megatron_fixes import initialize_adam_state
from remoe_patches.model import build_model
from remoe_patches.training_step import forward_backward, wrap_with_ddp

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=64, vocab_size=128, seq_length=16, router="relu")


def test_router_gating_without_transformer_engine_is_a_plain_gemm():
    # A fresh interpreter: in this one, other tests have applied the fixes already.
    code = (
        "import torch\n"
        "from megatron.core.transformer.moe import moe_utils\n"
        "from remoe_patches.megatron_fixes import apply_megatron_fixes\n"
        "apply_megatron_fixes()\n"
        "x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)\n"
        "out = moe_utils.router_gating_linear(x, w, None, torch.float64)\n"
        "assert torch.equal(out, x @ w.T), out\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def distributed_bf16_run(parallel, *, eager_state=True, seed=0):
    """A tiny ReMoE model in bf16 under megatron's distributed optimizer with torch's AdamW."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)  # megatron initializes weights from its RNG tracker
    built = build_model(ModelConfig(**TINY), parallel, bf16=True)
    model = Float16Module(built.transformer_config, built.model)
    ddp = wrap_with_ddp(model, built.transformer_config, use_distributed_optimizer=True)
    config = OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, params_dtype=torch.bfloat16,
                             use_distributed_optimizer=True, weight_decay=0.1)
    optimizer = get_megatron_optimizer(config, [ddp])
    if eager_state:
        initialize_adam_state(optimizer)
    return built, ddp, optimizer


def saved_after_training(parallel, directory, steps=2):
    """A run trained ``steps`` steps and saved to ``directory`` as checkpoint ``steps``."""
    built, ddp, optimizer = distributed_bf16_run(parallel)
    train(ddp, optimizer, steps)
    checkpointing.save_checkpoint(str(directory), steps, [ddp], optimizer, None,
                                  consumed_samples=2 * steps, regularizer=built.regularizer)
    return built, ddp, optimizer


def train(ddp, optimizer, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, TINY["vocab_size"], (2, TINY["seq_length"] + 1), generator=gen)
        batch = dict(tokens_BS=tokens[:, :-1], labels_BS=tokens[:, 1:],
                     loss_mask_BS=torch.ones(2, TINY["seq_length"]),
                     position_ids_BS=torch.arange(TINY["seq_length"]).expand(2, -1))
        optimizer.zero_grad()
        forward_backward([ddp], [batch], num_microbatches=1, seq_length=TINY["seq_length"],
                         micro_batch_size=2)
        assert optimizer.step()[0]


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def adam_steps(optimizer):
    adam = optimizer.chained_optimizers[0].optimizer if hasattr(optimizer, "chained_optimizers") \
        else optimizer.optimizer
    return [state["step"] for state in adam.state.values()]


def test_adam_state_exists_before_the_first_step_and_changes_no_update(single_rank):
    _, eager_ddp, eager = distributed_bf16_run(single_rank, eager_state=True)
    eager.state_dict()  # megatron asserts one shared step; it needs the state to exist
    assert [float(s) for s in adam_steps(eager)] == [0.0] * len(adam_steps(eager))
    _, lazy_ddp, lazy = distributed_bf16_run(single_rank, eager_state=False)
    assert all(torch.equal(a, b) for a, b in zip(weights(eager_ddp).values(),
                                                 weights(lazy_ddp).values()))
    train(eager_ddp, eager, 3)
    train(lazy_ddp, lazy, 3)
    for (name, a), b in zip(weights(eager_ddp).items(), weights(lazy_ddp).values()):
        assert torch.equal(a, b), name


def test_resumed_adam_steps_are_the_saved_ones_one_tensor_each(single_rank, tmp_path):
    _, ddp, optimizer = saved_after_training(single_rank, tmp_path)
    fresh_built, fresh_ddp, fresh = distributed_bf16_run(single_rank, seed=5)
    checkpointing.load_checkpoint(str(tmp_path), [fresh_ddp], fresh, None,
                                  regularizer=fresh_built.regularizer)
    steps = adam_steps(fresh)
    assert [float(s) for s in steps] == [2.0] * len(steps)
    assert len({id(s) for s in steps}) == len(steps)  # a shared tensor would count N per step
    train(ddp, optimizer, 2, seed=9)
    train(fresh_ddp, fresh, 2, seed=9)
    assert [float(s) for s in adam_steps(fresh)] == [4.0] * len(steps)
    for (name, a), b in zip(weights(ddp).items(), weights(fresh_ddp).values()):
        assert torch.equal(a, b), name


def test_gradient_norm_stays_on_the_device_and_equals_megatrons(single_rank):
    """Defect 3: the same norm, bit for bit, as megatron's local L2 norm, read by nobody; and
    ``get_grad_norm_fp32`` (with the fix installed by ``initialize_parallel``) reads it once."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from remoe_patches.host_sync import HostSyncCounter
    from remoe_patches.megatron_fixes import device_l2_norm

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for shape in [(7, 3), (5,), (2, 2, 2), (1,)]]
    with HostSyncCounter() as syncs:
        ours, _ = device_l2_norm(2048, None, [grads], False)
    assert syncs.total == 0 and ours.shape == (1,) and ours.dtype == torch.float32
    theirs, _ = utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    assert torch.equal(ours, theirs)
    expected = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert abs(ours.item() - expected.item()) < 1e-5 * expected.item()

    assert clip_grads.l2_norm_impl is device_l2_norm
    with HostSyncCounter() as syncs:
        norm = clip_grads.get_grad_norm_fp32(grads)
    assert syncs.total == 1 and abs(norm - ours.item()) < 1e-6 * norm
