"""A small ReMoE run and its routing masks, shared by the analysis test modules
(test_routing_capture, test_analysis, test_analysis_report; ``conftest.py`` registers the
fixtures).

The run is trained once per session by ``pretrain_gpt.py`` (6 steps, checkpoints at 3 and 6)
on a small multi-domain corpus.
"""

from __future__ import annotations

import numpy as np
import pytest

SEQ_LENGTH = 32
NUM_SEQUENCES = 24


@pytest.fixture(scope="session")
def routing_corpus(tmp_path_factory):
    from remoe_patches.data.demo_corpus import build_demo_corpus

    return build_demo_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=384, max_chars_per_domain=40_000
    )


@pytest.fixture(scope="session")
def routing_run(routing_corpus, tmp_path_factory):
    from training_runs import authors_style_flags, ok, run

    save = tmp_path_factory.mktemp("run")
    ok(
        run(
            authors_style_flags(
                routing_corpus,
                save,
                seq_length=SEQ_LENGTH,
                train_iters=6,
                save_interval=3,
                eval_interval=3,
                log_interval=1,
            )
        )
    )
    return save


def direct_masks(model, tokens_NS) -> np.ndarray:
    """[N, S, L, E] routing masks: one sequence per forward, hooks on each layer's router."""
    import torch

    routers = [layer.mlp.router for layer in model.decoder.layers]
    seen = {}
    handles = [
        router.register_forward_hook(
            lambda module, inputs, output, i=i: seen.__setitem__(i, output[1].clone())
        )
        for i, router in enumerate(routers)
    ]
    masks = []
    try:
        with torch.no_grad():
            for sequence in tokens_NS:
                tokens = torch.as_tensor(sequence)[None]
                model(tokens, torch.arange(len(sequence))[None], None)
                masks.append(torch.stack([seen[i] for i in range(len(routers))], dim=1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(masks).bool().numpy()  # [N, S(T of one sequence), L, E]


@pytest.fixture(scope="session")
def routed(single_rank, routing_corpus, routing_run):
    """Both checkpoints of the run routed on one calibration set (``samples``), and their masks
    computed directly (``direct``), one sequence at a time."""
    from remoe_patches.analysis import routing_capture

    calibration = routing_capture.calibration_set(
        routing_corpus.data_prefix, seq_length=SEQ_LENGTH, num_sequences=NUM_SEQUENCES
    )
    samples, direct = [], []
    for directory in routing_capture.checkpoint_dirs(routing_run):
        checkpoint = routing_capture.load_moe_for_routing(directory)
        samples.append(routing_capture.route_checkpoint(checkpoint, calibration, batch_size=5))
        direct.append(direct_masks(checkpoint.model, calibration.tokens_NS))
    assert [s.iteration for s in samples] == [3, 6]
    return dict(calibration=calibration, samples=samples, direct=direct)
