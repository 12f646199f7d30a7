"""The pretraining loop and what it runs, logs and saves: steps, checkpoints, timers, memory,
profiling, metrics."""
