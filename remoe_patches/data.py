"""Training data: megatron-core's GPT datasets (blends, splits) and a resumable batch order.

Shape suffixes: B = sequences of a micro-batch, S = sequence positions.

The sample order is global and independent of the data-parallel size: step ``i`` uses global
samples ``[i*G, (i+1)*G)`` of the split (``G`` = global batch), cut into chunks of
``micro_batch * DP`` of which each data-parallel rank takes its slice, as Megatron-LM's
pretraining sampler does. Resuming from ``consumed_samples`` therefore continues with the same
samples whatever the new data-parallel size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list


SPLIT_NAMES = ("train", "validation", "test")


def drop_empty_splits(data_path: Sequence[str], split: str) -> tuple[str, list[str]]:
    """``split`` with a zero weight for every split that gets no document of some dataset.

    megatron-core cuts each dataset's documents by the split fractions; a split that receives no
    document would make its GPT dataset loop forever looking for tokens. Returns the split to
    use and the names of the splits dropped (a corpus too small for, say, a 1/1000 test split).
    """
    prefixes, _weights = get_blend_from_list(list(data_path))
    weights = parse_and_normalize_split(split)
    matrix = convert_split_vector_to_split_matrix(weights)
    dropped = []
    for prefix in prefixes:
        num_documents = IndexedDataset(prefix).document_indices.shape[0] - 1
        for index, bounds in enumerate(matrix):
            if bounds is None or weights[index] == 0.0:
                continue
            begin, end = bounds
            if round(end * num_documents) - round(begin * num_documents) == 0:
                weights[index] = 0.0
                dropped.append(SPLIT_NAMES[index])
    if weights[0] == 0.0:
        raise ValueError(
            f"--split {split} leaves the training split without documents in {prefixes}; "
            "give the training split a larger share"
        )
    return ",".join(f"{w:g}" for w in weights), dropped


@dataclass
class Splits:
    """The train, validation and test datasets (a split may be None)."""

    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def check_data_paths(data_path: Sequence[str]) -> None:
    """Fail with one line naming the first prefix whose .bin/.idx is missing."""
    # megatron's get_blend_from_list gives ([], []) for an empty list, not None
    blend = get_blend_from_list(list(data_path)) if data_path else None
    if blend is None:
        raise ValueError("--data-path is empty; give one or more dataset prefixes")
    prefixes, _weights = blend
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ValueError(
                    f"--data-path: {prefix + suffix} does not exist; give the prefix written by "
                    "tools/preprocess_data.py (without .bin/.idx)"
                )


def build_splits(
    *,
    data_path: Optional[Sequence[str]],
    split: str,
    per_split_paths: Sequence[Optional[Sequence[str]]] = (None, None, None),
    seq_length: int,
    tokenizer,
    num_samples: tuple[int, int, int],
    seed: int,
    mock: bool = False,
    cache_path: Optional[str] = None,
) -> Splits:
    """megatron-core's GPT datasets: one blend (``weight prefix`` pairs) cut by ``split``, or one
    blend per split (``per_split_paths``)."""
    use_per_split = not mock and data_path is None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if mock or use_per_split else get_blend_from_list(list(data_path)),
        blend_per_split=(
            [get_blend_from_list(list(p)) if p else None for p in per_split_paths]
            if use_per_split else None
        ),
        split=None if use_per_split else split,
        path_to_cache=cache_path,
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    dataset_class = MockGPTDataset if mock else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(
        dataset_class, list(num_samples), lambda: True, config
    ).build()
    return Splits(train=train, valid=valid, test=test)


def micro_batches(
    dataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> Iterator[dict]:
    """This rank's micro-batches from global sample ``consumed_samples`` on, endlessly.

    Past the dataset's end the order wraps around (megatron sizes the datasets so that a run
    never gets there).
    """
    chunk = micro_batch_size * data_parallel_size
    start = consumed_samples + data_parallel_rank * micro_batch_size
    while True:
        indices = [(start + i) % len(dataset) for i in range(micro_batch_size)]
        yield collate([dataset[i] for i in indices])
        start += chunk


def collate(samples: list[dict]) -> dict:
    """Stack megatron's GPT samples into the batch dict of ``training_step``."""
    return dict(
        tokens_BS=torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),
        labels_BS=torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),
        loss_mask_BS=torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
        position_ids_BS=torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]).long(),
    )


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
