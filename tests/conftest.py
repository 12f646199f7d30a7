"""Fixtures of the CPU suite beyond the root ``conftest.py``'s."""

import pytest

# Helpers moved out of test modules keep pytest's detailed assert messages.
pytest.register_assert_rewrite(
    "routing_references", "tiny", "tiny_training", "trained_checkpoints", "training_runs"
)

from routing_fixtures import routed, routing_corpus, routing_run  # noqa: E402, F401


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small multi-domain corpus and its tokenizer files, built once per test module."""
    from remoe_patches.data.demo_corpus import build_demo_corpus

    return build_demo_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=384, max_chars_per_domain=40_000
    )
