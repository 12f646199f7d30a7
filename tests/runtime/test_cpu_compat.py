"""cpu_compat: each CPU shim does what its docstring says, and only where it says.

Checked by behaviour: megatron's CUDA-only helpers (grad norm, clipping, causal mask, RNG
tracker, mixed-precision optimizer, the alltoall dispatcher's host copies) give on CPU what a
plain torch computation gives; the uneven collectives on two gloo ranks give what NCCL would;
the shims stay out of torch itself and of code they were not meant for; with CUDA present
nothing is installed, and installing twice wraps nothing twice. These tests run where the shims
are needed (the CPU machines of tests/); tests_gpu/ covers the GPU path.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
import torch.distributed as dist

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.utils import get_default_causal_mask

from multiproc import run_on_ranks
from remoe_patches.runtime import cpu_compat
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.model.build import build_model
from remoe_patches.train.training_step import wrap_with_ddp

from tiny import TINY_RELU_MODEL

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def shims(single_rank):
    """The shims installed (single_rank's initialize_parallel installs them) on a CPU machine."""
    assert cpu_compat.cpu_shims_needed() == (not torch.cuda.is_available())
    assert cpu_compat.apply_cpu_shims(), "tests/ runs on CPU; the GPU path is in tests_gpu/"
    return single_rank


def test_cuda_device_calls_land_on_the_cpu(shims):
    """current_device is the CPU; set_device and synchronize have nothing to do."""
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.cuda.set_device(0) is None
    assert torch.cuda.synchronize() is None


def test_cuda_rng_functions_drive_the_cpu_generator(shims):
    saved = torch.get_rng_state()
    try:
        state = torch.cuda.get_rng_state()
        assert torch.equal(state, torch.get_rng_state())
        first = torch.rand(5)
        torch.cuda.set_rng_state(state)
        assert torch.equal(torch.rand(5), first)
        torch.cuda.manual_seed(11)
        seeded = torch.rand(5)
        torch.manual_seed(11)
        assert torch.equal(torch.rand(5), seeded)
    finally:
        torch.set_rng_state(saved)


def test_rng_tracker_forks_a_separate_reproducible_stream(shims, caplog):
    """Inside a fork: the tracker's stream (reproducible from the seed, advancing fork after
    fork); outside: the default stream, untouched by the fork. The tracker's warning that the
    CPU state changed inside the fork is expected here and silenced."""
    tracker = get_cuda_rng_tracker()
    saved_states, saved_cpu = tracker.get_states(), torch.get_rng_state()
    try:
        model_parallel_cuda_manual_seed(123)
        torch.manual_seed(7)
        before = torch.get_rng_state()
        with caplog.at_level(logging.WARNING):
            with tracker.fork():
                forked = torch.randn(4)
            assert torch.equal(torch.get_rng_state(), before)  # the default stream is restored
            outside = torch.randn(4)
            with tracker.fork():
                forked_again = torch.randn(4)
        torch.manual_seed(7)
        assert torch.equal(outside, torch.randn(4))
        assert not torch.equal(forked, outside)
        assert not torch.equal(forked, forked_again)  # the tracker's stream moved on
        model_parallel_cuda_manual_seed(123)
        with tracker.fork():
            assert torch.equal(torch.randn(4), forked)
        assert not [r for r in caplog.records if "CPU RNG state changed" in r.getMessage()]
    finally:
        tracker.set_states(saved_states)
        torch.set_rng_state(saved_cpu)


def test_megatron_modules_get_cpu_tensors_for_device_cuda_and_torch_does_not(shims):
    """The literal device='cuda' allocations of the listed megatron modules land on the CPU;
    the torch module itself is not changed."""
    wrapped = clip_grads.torch
    for device in ("cuda", torch.device("cuda", 0), "cuda:0"):
        assert wrapped.zeros(2, device=device).device.type == "cpu"
    assert wrapped.tensor([1.5], device="cuda").tolist() == [1.5]
    assert wrapped.full((2,), 3, device="cuda").tolist() == [3, 3]
    assert wrapped.empty_like(torch.ones(3), device="cuda").shape == (3,)
    assert wrapped.ones(2, dtype=torch.int).dtype == torch.int  # other arguments pass through
    assert wrapped.float32 is torch.float32 and wrapped.Tensor is torch.Tensor
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # no CUDA here: only the shimmed modules redirect
    mask = get_default_causal_mask(5)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(5, 5).triu(diagonal=1).bool())


def test_grad_norm_and_clipping_run_on_cpu_tensors(shims):
    """megatron's fp32 grad norm and clipping (CUDA type checks, CUDA scalars) on CPU grads give
    torch's norm and scale every gradient by max_norm / total_norm; tensor.type() is the CPU name
    again afterwards."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3, 7, 11)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 4
    grads = [p.grad.clone() for p in params]
    flat = torch.cat(grads)
    total = clip_grads.get_grad_norm_fp32([p.grad for p in params])
    assert total == pytest.approx(torch.linalg.vector_norm(flat).item(), rel=1e-5)
    assert clip_grads.get_grad_norm_fp32(
        [p.grad for p in params], norm_type=float("inf")
    ) == pytest.approx(flat.abs().max().item(), rel=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (1.0 / (total + 1e-6)))
    assert torch.linalg.vector_norm(torch.cat([p.grad for p in params])).item() == pytest.approx(
        1.0, rel=1e-5
    )
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_cuda_type_names_only_inside_the_wrapped_functions(shims):
    """While a wrapped function runs, tensor.type() names CPU float tensors as their CUDA twins
    (other types and conversions unchanged); before, after, and after an error, the CPU names."""
    seen = {}

    def probe(fail=False):
        seen.update(
            fp32=torch.zeros(1).type(),
            bf16=torch.zeros(1, dtype=torch.bfloat16).type(),
            fp16=torch.zeros(1, dtype=torch.half).type(),
            long=torch.zeros(1).long().type(),
            converted=torch.zeros(1).type(torch.float64).dtype,
        )
        if fail:
            raise KeyError("inside")
        return "done"

    wrapped = cpu_compat._named_like_cuda(probe)
    assert wrapped() == "done"
    assert seen == dict(
        fp32="torch.cuda.FloatTensor",
        bf16="torch.cuda.BFloat16Tensor",
        fp16="torch.cuda.HalfTensor",
        long="torch.LongTensor",
        converted=torch.float64,
    )
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises(KeyError):
        wrapped(fail=True)
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.BFloat16Tensor"


def test_mixed_precision_optimizer_accepts_cpu_bf16_parameters(shims):
    """megatron's Float16OptimizerWithFloat16Params sorts CPU bf16 parameters as it sorts CUDA
    ones: each gets an fp32 main copy with its values."""
    built = build_model(ModelConfig(**TINY_RELU_MODEL), shims, bf16=True)
    ddp = wrap_with_ddp(built.model, built.transformer_config)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16), [ddp]
    )
    inner = (
        optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") else optimizer
    )
    assert type(inner).__name__ == "Float16OptimizerWithFloat16Params"
    bf16 = [p for group in inner.float16_groups for p in group]
    main = [p for group in inner.fp32_from_float16_groups for p in group]
    assert len(bf16) == len(list(built.model.parameters())) and len(main) == len(bf16)
    for model_param, main_param in zip(bf16, main):
        assert model_param.dtype == torch.bfloat16 and main_param.dtype == torch.float32
        assert torch.equal(main_param, model_param.float())
    assert torch.zeros(1).type() == "torch.FloatTensor"


def dispatcher_stub(**overrides):
    stub = SimpleNamespace(
        drop_and_pad=False,
        cuda_dtoh_point="before_permutation_1",
        input_splits=torch.tensor([3, 0, 5]),
        output_splits=torch.tensor([4, 4]),
        output_splits_tp=None,
    )
    for key, value in overrides.items():
        setattr(stub, key, value)
    return stub


def test_alltoall_dispatcher_takes_split_sizes_to_the_host_without_streams(shims):
    """At the dispatcher's copy point the split sizes become host (numpy) values, as the GPU path
    makes them; elsewhere, or when dropping and padding, nothing changes."""
    method = MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize
    tokens_per_expert = torch.tensor([1, 2])
    stub = dispatcher_stub()
    assert method(stub, "before_permutation_1", tokens_per_expert) is tokens_per_expert
    assert isinstance(stub.input_splits, numpy.ndarray)
    assert stub.input_splits.tolist() == [3, 0, 5] and stub.output_splits.tolist() == [4, 4]
    assert stub.output_splits_tp is None
    for stub in (
        dispatcher_stub(cuda_dtoh_point="before_ep_alltoall"),
        dispatcher_stub(drop_and_pad=True),
    ):
        method(stub, "before_permutation_1", tokens_per_expert)
        assert torch.is_tensor(stub.input_splits) and torch.is_tensor(stub.output_splits)


def uneven_collectives(rank, world_size):
    cpu_compat.apply_cpu_shims()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mine = torch.arange(2 * (rank + 1), dtype=torch.float).view(rank + 1, 2) + 10 * rank
        gathered = [torch.full((1, 2), -1.0), torch.full((2, 2), -1.0)]
        handle = dist.all_gather(gathered, mine, async_op=True)
        assert handle.wait()
        equal = [torch.zeros(3) for _ in range(world_size)]
        dist.all_gather(equal, torch.full((3,), float(rank)))
        # rank r contributes arange(n_j) * (r + 1) + 100 j to the piece that rank j keeps
        pieces = [
            torch.arange(n, dtype=torch.float) * (rank + 1) + 100 * j for j, n in enumerate((2, 3))
        ]
        kept = torch.zeros((2, 3)[rank])
        assert dist.reduce_scatter(kept, pieces) is None
        kept_async = torch.zeros((2, 3)[rank])
        dist.reduce_scatter(kept_async, pieces, async_op=True).wait()
        return dict(gathered=gathered, equal=equal, kept=kept, kept_async=kept_async)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_uneven_all_gather_and_reduce_scatter_on_gloo(tmp_path):
    """Lists of unequal tensors, as the token dispatchers pass them: all_gather fills each entry
    with that rank's tensor, reduce_scatter leaves each rank the sum of its piece; async calls
    return a finished handle; equal sizes still gather."""
    results = run_on_ranks(uneven_collectives, 2, tmp_path)
    rank_tensors = [torch.tensor([[0.0, 1.0]]), torch.tensor([[10.0, 11.0], [12.0, 13.0]])]
    for rank, result in enumerate(results):
        for got, expected in zip(result["gathered"], rank_tensors):
            assert torch.equal(got, expected), rank
        assert [t.tolist() for t in result["equal"]] == [[0.0] * 3, [1.0] * 3]
        n = (2, 3)[rank]
        expected_sum = torch.arange(n, dtype=torch.float) * (1 + 2) + 2 * 100 * rank
        assert torch.equal(result["kept"], expected_sum), rank
        assert torch.equal(result["kept_async"], expected_sum), rank


SCOPE_CHECK = """
import torch
import torch.distributed as dist
from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from remoe_patches.runtime import cpu_compat

def installed():
    return dict(
        current_device=torch.cuda.current_device, synchronize=torch.cuda.synchronize,
        get_rng_state=torch.cuda.get_rng_state, set_rng_state=mcore_random._set_cuda_rng_state,
        dtoh=MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize, torch=clip_grads.torch,
        all_gather=dist.all_gather, reduce_scatter=dist.reduce_scatter,
        distributed=distrib_optimizer.DistributedOptimizer.__init__,
        float16=optimizer.Float16OptimizerWithFloat16Params.__init__,
        clip=clip_grads.clip_grad_by_total_norm_fp32,
        clip_in_optimizer=optimizer.clip_grad_by_total_norm_fp32,
        tensor_type=torch.Tensor.type)

no_cuda = torch.cuda.is_available
original = installed()
torch.cuda.is_available = lambda: True  # a GPU machine
assert not cpu_compat.cpu_shims_needed()
assert cpu_compat.apply_cpu_shims() is False
unchanged = [k for k, v in installed().items() if v is not original[k]]
assert not unchanged, unchanged

torch.cuda.is_available = no_cuda
assert cpu_compat.apply_cpu_shims() is True
once = installed()
kept = sorted(k for k, v in once.items() if v is original[k])
assert kept == ["tensor_type"], kept  # tensor.type is swapped only inside the wrapped functions
assert once["distributed"].__wrapped__ is original["distributed"]
assert once["clip_in_optimizer"] is once["clip"]
assert cpu_compat.apply_cpu_shims() is True
rewrapped = [k for k, v in installed().items() if v is not once[k]]
assert not rewrapped, rewrapped
print("ok")
"""


@pytest.mark.integration
def test_nothing_is_installed_with_cuda_and_everything_once_without():
    """A fresh interpreter: with CUDA available apply_cpu_shims installs nothing; without it,
    every shim once, and a second call wraps nothing again."""
    result = subprocess.run(
        [sys.executable, "-c", SCOPE_CHECK], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
