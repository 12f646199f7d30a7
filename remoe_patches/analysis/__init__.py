"""Routing analyses of checkpoints and runs: the analyses, their capture and their report."""
