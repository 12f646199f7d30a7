"""Shared fixtures: megatron's parallel state as a one-rank gloo group for in-process tests."""

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
