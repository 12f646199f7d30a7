"""Fixtures of both test suites, ``tests/`` (CPU) and ``tests_gpu/``: megatron's parallel state
as a one-rank group (gloo on CPU, NCCL on a GPU: ``initialize_parallel`` picks the backend)."""

from __future__ import annotations

import pytest

import remoe_patches  # noqa: F401  (quiets megatron-core's import-time notices)


@pytest.fixture(scope="session")
def single_rank():
    """One-process model parallelism (TP=PP=EP=1) for tests that build megatron models."""
    from remoe_patches.config.model_config import ParallelConfig
    from remoe_patches.runtime.parallel import destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=1234)
    yield parallel
    destroy_parallel()


@pytest.fixture(autouse=True)
def fresh_moe_globals():
    """megatron keeps MoE state in globals, which every test gets fresh, as a process does: the
    aux-loss scale (a test whose first backward runs outside megatron's schedule leaves it 0-dim,
    which the schedule cannot copy its [1] into later) and the aux-loss tracker (a TopK model's
    losses would reach the next test's step records)."""
    yield
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    get_moe_layer_wise_logging_tracker().clear()
