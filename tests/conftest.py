"""Fixtures of the CPU suite beyond the root ``conftest.py``'s."""

from routing_fixtures import routed, routing_corpus, routing_run  # noqa: F401
