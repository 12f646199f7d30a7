"""Fixtures of both test suites, ``tests/`` (CPU) and ``tests_gpu/``: megatron's parallel state
as a one-rank group (gloo on CPU, NCCL on a GPU: ``initialize_parallel`` picks the backend)."""

from __future__ import annotations

import pytest

import remoe_patches  # noqa: F401  (quiets megatron-core's import-time notices)


@pytest.fixture(scope="session")
def single_rank():
    """One-process model parallelism (TP=PP=EP=1) for tests that build megatron models."""
    from remoe_patches.config import ParallelConfig
    from remoe_patches.parallel import destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=1234)
    yield parallel
    destroy_parallel()


@pytest.fixture(autouse=True)
def fresh_aux_loss_scale():
    """megatron keeps the MoE aux-loss scale in a class attribute: a test whose first backward
    runs outside megatron's schedule leaves it 0-dim, which the schedule cannot copy its [1]
    into later; every test starts without one, as a fresh process does."""
    yield
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
