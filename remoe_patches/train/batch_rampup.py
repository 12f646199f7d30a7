"""``--rampup-batch-size START INCREMENT RAMPUP_SAMPLES``: Megatron-LM's batch-size ramp-up, on
megatron-core's own calculator (``megatron.core.num_microbatches_calculator``).

The global batch starts at START and grows by INCREMENT every RAMPUP_SAMPLES / ((GBS - START) /
INCREMENT) consumed samples, reaching ``--global-batch-size`` (GBS) after RAMPUP_SAMPLES; a
step's micro-batches are its global batch / (micro batch x data-parallel size). The training loop
asks the calculator before every step (``update_num_microbatches`` with the consumed samples,
which a checkpoint restores), and the iterations, the LR schedule and the dataset size are
counted in samples from the same rule (``samples_after``, ``iterations_for``), so that they
agree with the steps actually taken. Without a ramp-up every step takes GBS.
"""

from __future__ import annotations

import functools
from typing import Optional

from megatron.core import num_microbatches_calculator as calculator

from remoe_patches.config.model_config import ConfigError


def rampup_problem(rampup, global_batch_size: int) -> Optional[str]:
    """Why ``rampup`` (START, INCREMENT, RAMPUP_SAMPLES) cannot ramp up to ``global_batch_size``
    (megatron-core's calculator would assert or divide by zero), or None."""
    start, increment, samples = rampup
    flag = f"--rampup-batch-size {start} {increment} {samples}"
    if start < 1 or increment < 1 or samples < 1:
        return f"{flag}: START, INCREMENT and RAMPUP_SAMPLES must be >= 1"
    if start >= global_batch_size:
        return (
            f"{flag}: START must be below --global-batch-size {global_batch_size}, which the "
            "ramp-up grows to; lower START, or drop --rampup-batch-size for a constant batch"
        )
    if (global_batch_size - start) % increment:
        return (
            f"{flag}: --global-batch-size {global_batch_size} - START {start} = "
            f"{global_batch_size - start} is not divisible by INCREMENT {increment}; make "
            "INCREMENT a divisor of it"
        )
    return None


def check_rampup_fits(rampup, micro_batch_size: int, data_parallel_size: int) -> None:
    """Every batch of the ramp must split into whole micro-batches on every data-parallel rank:
    START and INCREMENT multiples of micro batch x data-parallel size (megatron-core asserts)."""
    per_step = micro_batch_size * data_parallel_size
    start, increment, samples = rampup
    if start % per_step or increment % per_step:
        raise ConfigError(
            f"--rampup-batch-size {start} {increment} {samples}: START and INCREMENT must be "
            f"multiples of --micro-batch-size {micro_batch_size} x data-parallel size "
            f"{data_parallel_size} = {per_step}, so that every batch of the ramp splits into "
            "whole micro-batches"
        )


def start_calculator(
    *, rank: int, rampup, global_batch_size: int, micro_batch_size: int, data_parallel_size: int
) -> None:
    """megatron-core's global calculator for this run (a previous run's in this process is
    replaced); the loop then calls ``update_num_microbatches`` before every step."""
    calculator.unset_num_microbatches_calculator()
    calculator.init_num_microbatches_calculator(
        rank,
        None if rampup is None else list(rampup),
        global_batch_size,
        micro_batch_size,
        data_parallel_size,
    )


def ramp_batch_sizes(global_batch_size: int, rampup) -> tuple:
    """The global batch of each step while the ramp lasts (consumed samples <= RAMPUP_SAMPLES),
    from megatron-core's calculator; every later step takes ``global_batch_size``."""
    return () if rampup is None else _ramp(global_batch_size, *rampup)


@functools.lru_cache(maxsize=8)
def _ramp(global_batch_size: int, start: int, increment: int, samples: int) -> tuple:
    ramp = calculator.RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size,
        micro_batch_size=1,
        data_parallel_size=1,
        decrease_batch_size_if_needed=False,
        rank=-1,
        start_global_batch_size=start,
        batch_size_increment=increment,
        ramup_samples=samples,
    )
    sizes, consumed = [], 0
    while consumed <= samples:
        ramp.update(consumed, consistency_check=False)
        sizes.append(ramp.get_current_global_batch_size())
        consumed += sizes[-1]
    return tuple(sizes)


def samples_after(iterations: int, global_batch_size: int, rampup) -> int:
    """Samples consumed by the first ``iterations`` steps."""
    ramp = ramp_batch_sizes(global_batch_size, rampup)[:iterations]
    return sum(ramp) + (iterations - len(ramp)) * global_batch_size


def iterations_for(samples: int, global_batch_size: int, rampup) -> int:
    """Steps it takes to consume at least ``samples`` (a last step is not cut short)."""
    consumed = 0
    for step, batch in enumerate(ramp_batch_sizes(global_batch_size, rampup)):
        if consumed >= samples:
            return step
        consumed += batch
    steps = len(ramp_batch_sizes(global_batch_size, rampup))
    return steps + max(0, -(-(samples - consumed) // global_batch_size))
