"""Training data: megatron-core's GPT datasets (blends, splits) and a resumable batch order.

Shape suffixes: B = sequences of a micro-batch, S = sequence positions.

The sample order is global and independent of the data-parallel size: step ``i`` uses global
samples ``[i*G, (i+1)*G)`` of the split (``G`` = global batch), cut into chunks of
``micro_batch * DP`` of which each data-parallel rank takes its slice, as Megatron-LM's
pretraining sampler does. Resuming from ``consumed_samples`` therefore continues with the same
samples whatever the new data-parallel size.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from remoe_patches.data.domains import TokenDomains

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


# Beside each dataset's .bin (or under --data-cache-path when that directory is read-only): its
# largest token id, with the .bin's size and modification time it was computed from.
MAX_TOKEN_ID_SUFFIX = ".max_token_id.json"
_SCAN_CHUNK = 1 << 27  # tokens per numpy max() (256 MiB of uint16)


def largest_token_id(prefix: str, cache_dir: Optional[str] = None) -> int:
    """The largest token id in ``prefix.bin`` (-1 when it holds none).

    One pass over the file with numpy (about 1 s per GB from the page cache), remembered in
    ``prefix.max_token_id.json`` (or in ``cache_dir``) while the .bin keeps its size and
    modification time.
    """
    bin_path = prefix + ".bin"
    stat = os.stat(bin_path)
    key = {"bin_size": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}
    caches = [prefix + MAX_TOKEN_ID_SUFFIX]
    if cache_dir:
        digest = hashlib.sha256(os.path.abspath(bin_path).encode()).hexdigest()[:16]
        caches.append(
            os.path.join(cache_dir, f"{os.path.basename(prefix)}-{digest}{MAX_TOKEN_ID_SUFFIX}")
        )
    for path in caches:
        try:
            with open(path) as f:
                cached = json.load(f)
            if {name: cached.get(name) for name in key} == key:
                return int(cached["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    dtype = IndexedDataset(prefix).index.dtype
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r") if stat.st_size else []
    largest = -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        largest = max(largest, int(tokens[start : start + _SCAN_CHUNK].max()))
    for path in caches:  # the first place that takes it; none is fine
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "w") as f:
                json.dump({**key, "max_token_id": largest}, f)
            os.replace(temporary, path)
            break
        except OSError:
            continue
    return largest


def check_token_ids(
    blends: Sequence[tuple[str, Sequence[str]]],
    vocab_size: int,
    *,
    tokenizer: str,
    cache_dir: Optional[str] = None,
) -> None:
    """Refuse data with a token id outside the (padded) vocabulary, which the embedding would
    index out of range at step 1 (an IndexError on CPU, a device-side assert on a GPU): data
    preprocessed with another tokenizer. ``blends``: ``(flag, blend)`` pairs; ``tokenizer``
    describes the run's tokenizer for the message."""
    for flag, blend in blends:
        prefixes, _weights = get_blend_from_list(list(blend))
        for prefix in prefixes:
            largest = largest_token_id(prefix, cache_dir)
            if largest >= vocab_size:
                raise ValueError(
                    f"{flag}: {prefix} holds token id {largest}, outside this run's vocabulary "
                    f"({tokenizer}, padded to {vocab_size}): the data was tokenized with another "
                    "tokenizer; give the tokenizer it was preprocessed with, or preprocess it "
                    "again with this one (tools/preprocess_data.py)"
                )


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


# The seed of the validation and test splits' sample order, whatever --seed: two runs that differ
# in --seed score the same validation samples (the training split's order follows --seed).
# Megatron-LM's default --seed, so a --seed 1234 run keeps the validation order it always had.
EVAL_SEED = 1234


def build_splits(
    *,
    data_path: Optional[Sequence[str]],
    split: str,
    per_split_paths: Sequence[Optional[Sequence[str]]] = (None, None, None),
    seq_length: int,
    tokenizer,
    num_samples: tuple[Optional[int], Optional[int], Optional[int]],
    seed: int,
    eval_seed: int = EVAL_SEED,
    mock: bool = False,
    cache_path: Optional[str] = None,
) -> Splits:
    """megatron-core's GPT datasets: one blend (``weight prefix`` pairs) cut by ``split``, or one
    blend per split (``per_split_paths``).

    The training split is shuffled with ``seed``, validation and test with ``eval_seed``: two
    builds, each with the other splits left out of its split matrix (megatron's index caches are
    keyed by the seed and the split matrix, so neither build reuses the other's, nor a cache of
    the one-seed builds before them). A ``None`` in ``num_samples``: the whole split, each sample
    once (``--full-validation``); a weighted blend then contributes all of its datasets' samples
    unweighted.
    """
    if num_samples[0] is None:
        raise ValueError("build_splits: the training split needs a number of samples")
    if num_samples[0] == 0:  # nothing to train on (--skip-train): build no training split
        train = None
    else:
        train = _build_some_splits(
            (0,),
            seed,
            data_path=data_path,
            split=split,
            per_split_paths=per_split_paths,
            seq_length=seq_length,
            tokenizer=tokenizer,
            num_samples=num_samples,
            mock=mock,
            cache_path=cache_path,
        )[0]
    _, valid, test = _build_some_splits(
        (1, 2),
        eval_seed,
        data_path=data_path,
        split=split,
        per_split_paths=per_split_paths,
        seq_length=seq_length,
        tokenizer=tokenizer,
        num_samples=num_samples,
        mock=mock,
        cache_path=cache_path,
    )
    return Splits(train=train, valid=valid, test=test)


def _build_some_splits(
    keep,
    seed,
    *,
    data_path,
    split,
    per_split_paths,
    seq_length,
    tokenizer,
    num_samples,
    mock,
    cache_path,
) -> list:
    """The splits numbered in ``keep`` (None for the others), shuffled with ``seed``."""
    use_per_split = not mock and data_path is None

    def blend_for(paths, size):
        prefixes, weights = get_blend_from_list(list(paths))
        # megatron needs a size for a weighted blend; the whole split is every sample once
        return (prefixes, None) if size is None else (prefixes, weights)

    blend_per_split = None
    blend = None
    if use_per_split:
        blend_per_split = [
            blend_for(p, num_samples[i]) if p and i in keep else None
            for i, p in enumerate(per_split_paths)
        ]
        if not any(blend_per_split):  # (megatron would take no blend at all for mock data)
            return [None, None, None]
    elif not mock:
        sizes = [num_samples[i] for i in keep]
        blend = blend_for(data_path, None if None in sizes else 0)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=None if use_per_split else split,
        path_to_cache=cache_path,
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    if config.split_matrix is not None:
        config.split_matrix = [
            bounds if i in keep else None for i, bounds in enumerate(config.split_matrix)
        ]
    sizes = [num_samples[i] if i in keep else 0 for i in range(3)]
    dataset_class = MockGPTDataset if mock else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, config).build()


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


def evaluation_batches(
    dataset,
    *,
    num_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    token_domains: Optional[TokenDomains] = None,
) -> Iterator[dict]:
    """This rank's micro-batches of the split's first ``num_samples`` samples, in the order of
    ``micro_batches``, over ``ceil(num_samples / global_batch_size)`` global batches: the last
    one is filled up with samples whose loss mask is zero, so that every sample counts once and
    every rank runs the same micro-batches. With ``token_domains`` each batch also holds
    ``domains_BSD``, the domain of every label (for the loss per domain)."""
    chunk = micro_batch_size * data_parallel_size
    steps = -(-num_samples // global_batch_size)
    for start in range(0, steps * global_batch_size, chunk):
        first = start + data_parallel_rank * micro_batch_size
        positions = range(first, first + micro_batch_size)
        indices = [position % len(dataset) for position in positions]
        batch = collate([dataset[index] for index in indices])
        batch["loss_mask_BS"][[i for i, p in enumerate(positions) if p >= num_samples]] = 0.0
        if token_domains is not None:
            domain_BS = numpy.stack([token_domains.of_sample(dataset, i) for i in indices])
            batch["domains_BSD"] = torch.from_numpy(token_domains.one_hot(domain_BS))
        yield batch


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
