"""GPU tests: run ``pytest tests_gpu`` (or ``make test-gpu``) on a machine with CUDA.

They are kept out of the CPU suite (``tests/``, which CI runs) because they cannot run there.
The repository's root ``conftest.py`` holds the fixtures both suites share.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu needs a CUDA GPU; the CPU suite is tests/")


@pytest.fixture(scope="session")
def single_gpu(single_rank):
    """One-rank NCCL group and megatron's parallel state on the current GPU."""
    return single_rank
