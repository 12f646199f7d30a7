"""Routing capture on a small trained run (``routing_fixtures``): the calibration set is the
documents' beginnings, and the hooked routing masks equal a direct computation here (own router
hooks, one sequence per forward pass), so the hooks' token order cannot go wrong unnoticed."""

from __future__ import annotations

import numpy as np
import pytest

from remoe_patches.data.preprocess import import_indexed_dataset
from routing_fixtures import NUM_SEQUENCES, SEQ_LENGTH

pytestmark = pytest.mark.integration


def test_calibration_is_document_beginnings(routing_corpus, routed):
    calibration = routed["calibration"]
    dataset = import_indexed_dataset().IndexedDataset(routing_corpus.data_prefix)
    documents = calibration.documents_NS.reshape(-1)
    tokens = calibration.tokens_NS.reshape(-1)
    starts = np.r_[0, np.nonzero(np.diff(documents))[0] + 1]
    ends = np.r_[starts[1:], documents.size]
    order = documents[starts]
    assert len(set(order.tolist())) == len(order) > 1  # each document once, several of them
    for index, (start, end) in enumerate(zip(starts, ends)):
        document = np.asarray(dataset[order[index]], dtype=np.int64)
        assert np.array_equal(tokens[start:end], document[: end - start])
        if index < len(order) - 1:  # all but the last: the first 4 * S tokens, or all of them
            assert end - start == min(len(document), 4 * SEQ_LENGTH)
    assert calibration.tokens_NS.shape == (NUM_SEQUENCES, SEQ_LENGTH)


def test_routing_masks_match_one_sequence_at_a_time(routed):
    for sample, direct in zip(routed["samples"], routed["direct"]):
        assert sample.layers == [1, 2]
        assert sample.mask_NSLE.shape == direct.shape == (NUM_SEQUENCES, SEQ_LENGTH, 2, 8)
        assert np.array_equal(sample.mask_NSLE, direct)
