"""Sweeps and benchmarks: many runs from one config, and their tables."""
