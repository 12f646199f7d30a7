"""Typed configuration: the model's and the run's configs, config fields that declare their own
flag, and the router registry (no torch)."""
