"""The routing of checkpoints on a fixed calibration set: what every checkpoint analysis reads.

Shape suffixes: N = calibration sequences, S = positions, L = MoE layers, E = experts (after
granularity).

``route`` runs the model in eval mode with forward hooks on every MoE router and keeps the
routing masks (``M[n, s, l, e]`` = token ``s`` of sequence ``n`` uses expert ``e`` in MoE layer
``l``: gate > 0 for ReLU routing, in the top k for TopK).

The calibration set is ``N`` sequences of ``S`` tokens from the dataset's documents: by default
the run's validation documents (the part of ``--split`` that training never read) when they
are enough, else all; documents drawn in a fixed random order, each giving at most its first
``4 S`` tokens, concatenated (as megatron's GPT dataset concatenates documents), and every
token keeps the index of its document (for the domains).

Torch and megatron-core are imported only by the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from remoe_patches.runs.run_directory import CHECKPOINT_PREFIX, is_checkpoint_dir

CALIBRATION_SEED = 1234


class AnalysisError(ValueError):
    """Input an analysis cannot work with; the message says what is missing."""


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(path) -> list:
    """``iter_*`` checkpoint directories of a run (oldest first), or ``[path]`` for one."""
    path = Path(path)
    if is_checkpoint_dir(path) or path.name.startswith(CHECKPOINT_PREFIX):
        return [path]
    found = sorted(
        p
        for p in path.glob(CHECKPOINT_PREFIX + "*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    )
    if not found:
        raise AnalysisError(f"{path} holds no checkpoint (iter_XXXXXXX directories)")
    return found


@dataclass
class LoadedCheckpoint:
    model: object
    tokenizer: object
    model_config: object
    run_config: object
    """The run's ``RunConfig``, as saved in the checkpoint."""
    iteration: Optional[int]
    directory: str


def load_moe_for_routing(load) -> LoadedCheckpoint:
    """An MoE checkpoint (``--save`` dir: its latest; or ``iter_XXXXXXX``) as an eval-mode model
    with its run's settings, ready to route; AnalysisError for a dense model."""
    from remoe_patches.train.checkpointing import read_run_config
    from remoe_patches.inference.trained_model import load_model_for_inference

    model, tokenizer, model_config = load_model_for_inference(str(load))
    if not model_config.is_moe:
        raise AnalysisError(f"{load} is a dense model: it has no routing to analyse")
    return LoadedCheckpoint(
        model,
        tokenizer,
        model_config,
        read_run_config(model.checkpoint_dir),
        model.checkpoint_iteration,
        model.checkpoint_dir,
    )


# ---------------------------------------------------------------------------------------------
# Calibration data


def data_prefix(data) -> str:
    """The (first, heaviest) dataset prefix the run trained on (``data``: its DataConfig)."""
    from remoe_patches.config.run_config import split_blend  # loads torch

    blend = data.data_path or data.valid_data_path or data.train_data_path
    if not blend:
        raise AnalysisError("the checkpoint records no --data-path; give the data path")
    prefixes, weights = split_blend(blend)
    if weights is None:
        return prefixes[0]
    return prefixes[int(np.argmax(weights))]


def document_range(num_documents: int, split: str, part: str) -> tuple:
    """``[begin, end)`` documents of ``part`` (train/valid/test/all) under megatron's ``split``."""
    if part == "all":
        return 0, num_documents
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = ("train", "valid", "test")
    if part not in parts:
        raise AnalysisError(f"documents must be one of all, {', '.join(parts)}; got {part!r}")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    bounds = matrix[parts.index(part)]
    if bounds is None:
        return 0, 0
    # megatron's BlendedMegatronDatasetBuilder cuts documents this way
    return int(round(bounds[0] * num_documents)), int(round(bounds[1] * num_documents))


@dataclass
class Calibration:
    """The fixed token set every routing analysis runs on."""

    tokens_NS: np.ndarray
    documents_NS: np.ndarray
    """Index (in the dataset) of each token's document."""
    prefix: str
    first_document: int
    end_document: int


def calibration_set(
    prefix: str,
    *,
    seq_length: int,
    num_sequences: int,
    documents: tuple = None,
    seed: Optional[int] = CALIBRATION_SEED,
    max_document_tokens: Optional[int] = None,
) -> Calibration:
    """Up to ``num_sequences`` sequences of ``seq_length`` tokens from the documents
    ``[begin, end)`` (default: all): documents drawn in a seeded random order (``seed=None``:
    dataset order), each contributing its first ``max_document_tokens`` tokens (default
    ``4 * seq_length``; 0 for whole documents), concatenated. Drawing and capping spread the
    set over many documents, so that a few long ones do not make it up."""
    dataset = _indexed_dataset(prefix)
    document_indices = dataset.document_indices
    begin, end = documents if documents is not None else (0, len(document_indices) - 1)
    cap = 4 * seq_length if max_document_tokens is None else max_document_tokens
    wanted = num_sequences * seq_length
    count = max(end - begin, 0)
    if seed is None:
        order = np.arange(begin, min(end, begin + wanted))
    else:  # at most `wanted` documents are needed: draw only those (memory stays bounded)
        order = begin + np.random.default_rng(seed).choice(
            count, size=min(count, wanted), replace=False
        )
    tokens, owners, have = [], [], 0
    for document in order:
        sequences = range(document_indices[document], document_indices[document + 1])
        chunk = np.concatenate(
            [np.asarray(dataset[i], dtype=np.int64) for i in sequences] or [np.zeros(0, np.int64)]
        )
        if cap:
            chunk = chunk[:cap]
        tokens.append(chunk)
        owners.append(np.full(len(chunk), document, dtype=np.int64))
        have += len(chunk)
        if have >= wanted:
            break
    found = min(num_sequences, have // seq_length)
    if found == 0:
        raise AnalysisError(
            f"documents {begin}..{end - 1} of {prefix} give {have} tokens, fewer than one "
            f"sequence of {seq_length}; use more documents (e.g. documents='all')"
        )
    used = found * seq_length
    return Calibration(
        tokens_NS=np.concatenate(tokens)[:used].reshape(found, seq_length),
        documents_NS=np.concatenate(owners)[:used].reshape(found, seq_length),
        prefix=prefix,
        first_document=begin,
        end_document=end,
    )


def _indexed_dataset(prefix: str):
    from remoe_patches.data.preprocess import import_indexed_dataset

    return import_indexed_dataset().IndexedDataset(prefix)


def _capped_tokens(dataset, begin: int, end: int, cap: int) -> int:
    """Tokens the documents ``[begin, end)`` give with at most ``cap`` each (0: no cap)."""
    if end <= begin:
        return 0
    indices = dataset.document_indices
    lengths = np.asarray(dataset.sequence_lengths[indices[begin] : indices[end]], dtype=np.int64)
    per_document = (
        np.add.reduceat(lengths, np.asarray(indices[begin:end]) - indices[begin])
        if lengths.size
        else np.zeros(0, np.int64)
    )
    return int(np.minimum(per_document, cap).sum() if cap else per_document.sum())


def default_calibration(
    checkpoint: LoadedCheckpoint,
    *,
    data_path: Optional[str] = None,
    num_sequences: int = 256,
    seq_length: Optional[int] = None,
    documents: str = "auto",
) -> Calibration:
    """The calibration set of a run: its data and sequence length, and the documents of
    ``documents``: ``train``/``valid``/``test`` (the run's ``--split``), ``all``, or ``auto``:
    the validation documents if they give ``num_sequences`` sequences, else all documents."""
    prefix = data_path or data_prefix(checkpoint.run_config.data)
    if not os.path.isfile(prefix + ".idx"):
        raise AnalysisError(f"dataset {prefix}.bin/.idx not found; give the data path")
    seq_length = seq_length or checkpoint.model_config.seq_length
    dataset = _indexed_dataset(prefix)
    num_documents = len(dataset.document_indices) - 1
    split = checkpoint.run_config.data.split or "969,30,1"
    part = "valid" if documents == "auto" else documents
    begin, end = document_range(num_documents, split, part)
    if (
        documents == "auto"
        and _capped_tokens(dataset, begin, end, 4 * seq_length) < num_sequences * seq_length
    ):
        begin, end = 0, num_documents
    return calibration_set(
        prefix, seq_length=seq_length, num_sequences=num_sequences, documents=(begin, end)
    )


# ---------------------------------------------------------------------------------------------
# Routing masks


def moe_routers(model) -> list:
    """``[(layer_number, router)]`` of every MoE layer (ReLURouter or megatron's TopKRouter)."""
    from megatron.core.transformer.moe.router import Router

    routers = [
        (module.layer_number, module) for module in model.modules() if isinstance(module, Router)
    ]
    if not routers:
        raise AnalysisError("the model has no MoE router")
    return sorted(routers, key=lambda item: item[0])


def route(model, tokens_NS: np.ndarray, *, batch_size: int = 16) -> tuple:
    """Routing masks ``mask_NSLE`` (bool) of ``tokens_NS`` and the MoE layer numbers.

    Forward hooks on the routers take each router's ``routing_map`` (``[S*B, E]``, megatron's
    sequence-major token order) during an eval-mode forward pass.
    """
    import torch

    routers = moe_routers(model)
    captured = {}

    def hook_for(layer_number):
        def hook(module, inputs, output):
            captured[layer_number] = output[1].detach()

        return hook

    handles = [router.register_forward_hook(hook_for(number)) for number, router in routers]
    device = next(model.parameters()).device
    num_sequences, seq_length = tokens_NS.shape
    masks = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, num_sequences, batch_size):
                batch = torch.as_tensor(tokens_NS[start : start + batch_size], device=device)
                positions = torch.arange(seq_length, device=device).expand_as(batch)
                captured.clear()
                model(batch, positions, None)
                per_layer = []
                for number, _ in routers:
                    routing_map = captured[number]  # [S*B, E], s-major
                    per_layer.append(
                        routing_map.view(seq_length, batch.shape[0], -1)
                        .transpose(0, 1)
                        .bool()
                        .cpu()
                    )
                masks.append(torch.stack(per_layer, dim=2))  # [B, S, L, E]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.cat(masks).numpy(), [number for number, _ in routers]


@dataclass
class RoutedSample:
    """A checkpoint's routing masks on a calibration set, with what the analyses need."""

    calibration: Calibration
    mask_NSLE: np.ndarray
    layers: list
    """Global layer numbers (1-based) of the MoE layers."""
    iteration: Optional[int]
    topk: int
    """k*G: the experts a TopK router gives every token (ReMoE's average at the target)."""
    target_sparsity: Optional[float]
    """ReMoE's 1 - k/E (None for TopK)."""
    router: str
    tokenizer: object = None
    checkpoint: str = ""


def route_checkpoint(
    checkpoint: LoadedCheckpoint, calibration: Calibration, *, batch_size: int = 16
) -> RoutedSample:
    """``checkpoint``'s routing masks on ``calibration``, with what the analyses need."""
    config = checkpoint.model_config
    if calibration.tokens_NS.shape[1] > config.seq_length:
        raise AnalysisError(
            f"calibration sequences of {calibration.tokens_NS.shape[1]} tokens "
            f"exceed the model's --seq-length {config.seq_length}"
        )
    mask, layers = route(checkpoint.model, calibration.tokens_NS, batch_size=batch_size)
    return RoutedSample(
        calibration=calibration,
        mask_NSLE=mask,
        layers=layers,
        iteration=checkpoint.iteration,
        topk=config.total_topk,
        router=config.router,
        tokenizer=checkpoint.tokenizer,
        target_sparsity=config.target_sparsity if config.kind.adaptive_l1 else None,
        checkpoint=checkpoint.directory,
    )
