"""GPU tests: run ``pytest tests_gpu`` (or ``make test-gpu``) on a machine with CUDA.

They are kept out of the CPU suite (``tests/``, which CI runs) because they cannot run there.
"""

from __future__ import annotations

import pytest
import torch

import remoe_patches  # noqa: F401  (quiets megatron-core's import-time notices)


def pytest_configure(config):
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu needs a CUDA GPU; the CPU suite is tests/")


@pytest.fixture(scope="session")
def single_gpu():
    """One-rank NCCL group and megatron's parallel state on the current GPU."""
    from remoe_patches.config import ParallelConfig
    from remoe_patches.parallel import destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=1234)
    yield parallel
    destroy_parallel()
