"""Parallelism by simulation: 2 gloo processes give what 1 process gives on the same data.

For each layout the step's LM loss, the ReMoE reg loss and sparsity per layer, the step's
sparsity and the updated coefficient match the single-process run, and every gradient shard
matches the same shard of the single-process gradients (resharded by megatron-core's
distributed checkpointing). The single-process run takes the global batch as DP-many
micro-batches, which is what data parallelism computes.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_on_ranks
from scenarios import run_step

from remoe_patches.config.router_registry import LoryOptions, ReLUOptions, SparseMixerOptions

pytestmark = pytest.mark.integration

GLOBAL_BATCH, MICRO_BATCH = 4, 2
MODELS = {
    # a large coefficient, so that the regularizer's gradients weigh in the comparison
    "relu": dict(router="relu", router_options=ReLUOptions(l1_coeff_init=0.5)),
    "topk": dict(router="topk"),
    "dense": dict(router="dense"),
    # The Table 2 baselines. SparseMixer-v2 samples its experts, and each rank draws its own
    # noise; with a band this narrow only the top expert can be drawn, so the step is the same
    # on any layout (the dispatch, the estimator's gates and the aux loss are compared).
    "hash": dict(router="hash"),
    "expert_choice": dict(router="expert_choice"),
    "sparsemixer": dict(router="sparsemixer", router_options=SparseMixerOptions(jitter_eps=1e-6)),
    "lory": dict(router="lory", router_options=LoryOptions(segment_length=8)),
}
TP2_SP = dict(tensor_model_parallel_size=2, sequence_parallel=True)
LAYOUTS = [
    ("relu", "alltoall", TP2_SP),
    ("relu", "allgather", TP2_SP),
    ("relu", "alltoall", dict(expert_model_parallel_size=2)),
    ("relu", "allgather", dict(expert_model_parallel_size=2)),
    ("relu", "alltoall", dict()),  # DP=2
    ("relu", "alltoall", dict(pipeline_model_parallel_size=2)),
    ("relu", "sorted", dict()),  # DP=2, against the 1-rank alltoall reference
    ("topk", "sorted", dict(pipeline_model_parallel_size=2)),
    ("topk", "alltoall", dict(expert_model_parallel_size=2)),
    ("dense", "alltoall", dict(tensor_model_parallel_size=2)),
    ("hash", "alltoall", dict(expert_model_parallel_size=2)),
    ("hash", "alltoall", TP2_SP),
    ("expert_choice", "alltoall", dict(expert_model_parallel_size=2)),
    ("sparsemixer", "alltoall", dict(expert_model_parallel_size=2)),
    ("lory", "alltoall", dict()),  # DP=2
    ("lory", "alltoall", dict(pipeline_model_parallel_size=2)),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One single-process step per model; its weights and gradients are saved in ``ckpt_dir``."""
    cache = {}

    def get(model):
        if model not in cache:
            ckpt_dir = tmp_path_factory.mktemp(f"ref-{model}")
            (result,) = run_on_ranks(
                run_step,
                1,
                ckpt_dir,
                ckpt_dir=str(ckpt_dir),
                parallel_kwargs={},
                model_kwargs=MODELS[model],
                global_batch=GLOBAL_BATCH,
                micro_batch=MICRO_BATCH,
                reference=True,
            )
            cache[model] = (ckpt_dir, result)
        return cache[model]

    return get


def layout_id(layout):
    model, dispatcher, parallel = layout
    sizes = "-".join(
        f"{k.split('_')[0]}{v}" for k, v in parallel.items() if k != "sequence_parallel"
    )
    sequence_parallel = "-sp" if parallel.get("sequence_parallel") else ""
    return f"{model}-{dispatcher}-{sizes or 'dp2'}{sequence_parallel}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout_id(layout) for layout in LAYOUTS])
def test_two_ranks_match_one(references, tmp_path, layout):
    model, dispatcher, parallel = layout
    ckpt_dir, expected = references(model)
    results = run_on_ranks(
        run_step,
        2,
        tmp_path,
        ckpt_dir=str(ckpt_dir),
        parallel_kwargs=parallel,
        model_kwargs={**MODELS[model], "token_dispatcher": dispatcher},
        global_batch=GLOBAL_BATCH,
        micro_batch=MICRO_BATCH,
        reference=False,
    )
    for rank, result in enumerate(results):
        # with pipeline parallelism only the last stage computes the loss
        if not torch.isnan(result["lm_loss"]):
            torch.testing.assert_close(result["lm_loss"], expected["lm_loss"], rtol=1e-5, atol=0)
        for key in ("reg_loss_L", "sparsity_L", "expert_load_LE", "step_sparsity", "l1_coeff"):
            assert (key in result) == (key in expected), key
            if key in expected:
                torch.testing.assert_close(
                    result[key],
                    expected[key],
                    rtol=1e-5,
                    atol=1e-7,
                    equal_nan=True,
                    msg=f"rank {rank}: {key}",
                )
        worst = max(result["grad_errors"], key=result["grad_errors"].get)
        assert result["grad_errors"][worst] < 1e-4, f"rank {rank}: gradient of {worst}"
    assert any(not torch.isnan(r["lm_loss"]) for r in results)
    if model == "relu":
        assert 0.0 < expected["step_sparsity"].item() < 1.0
