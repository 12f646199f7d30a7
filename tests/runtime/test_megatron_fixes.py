"""megatron_fixes: each workaround for a megatron-core 0.16.1 defect, checked against the behaviour
it restores (router gating without transformer-engine, torch Adam in the distributed optimizer)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from remoe_patches.train import checkpointing

from tiny_training import distributed_bf16_run, saved_after_training, train


@pytest.mark.integration
def test_router_gating_without_transformer_engine_is_a_plain_gemm():
    # A fresh interpreter: in this one, other tests have applied the fixes already.
    code = (
        "import torch\n"
        "from megatron.core.transformer.moe import moe_utils\n"
        "from remoe_patches.runtime.megatron_fixes import apply_megatron_fixes\n"
        "apply_megatron_fixes()\n"
        "x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)\n"
        "out = moe_utils.router_gating_linear(x, w, None, torch.float64)\n"
        "assert torch.equal(out, x @ w.T), out\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def adam_steps(optimizer):
    adam = (
        optimizer.chained_optimizers[0].optimizer
        if hasattr(optimizer, "chained_optimizers")
        else optimizer.optimizer
    )
    return [state["step"] for state in adam.state.values()]


def test_adam_state_exists_before_the_first_step_and_changes_no_update(single_rank):
    _, eager_ddp, eager = distributed_bf16_run(single_rank, eager_state=True)
    eager.state_dict()  # megatron asserts one shared step; it needs the state to exist
    assert [float(s) for s in adam_steps(eager)] == [0.0] * len(adam_steps(eager))
    _, lazy_ddp, lazy = distributed_bf16_run(single_rank, eager_state=False)
    assert all(
        torch.equal(a, b) for a, b in zip(weights(eager_ddp).values(), weights(lazy_ddp).values())
    )
    train(eager_ddp, eager, 3)
    train(lazy_ddp, lazy, 3)
    for (name, a), b in zip(weights(eager_ddp).items(), weights(lazy_ddp).values()):
        assert torch.equal(a, b), name


def test_resumed_adam_steps_are_the_saved_ones_one_tensor_each(single_rank, tmp_path):
    _, ddp, optimizer = saved_after_training(single_rank, tmp_path)
    fresh_built, fresh_ddp, fresh = distributed_bf16_run(single_rank, seed=5)
    checkpointing.load_checkpoint(
        str(tmp_path), [fresh_ddp], fresh, None, regularizer=fresh_built.regularizer
    )
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

    from remoe_patches.runtime.host_sync import HostSyncCounter
    from remoe_patches.runtime.megatron_fixes import device_l2_norm

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
