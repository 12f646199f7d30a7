"""A ``pretrain_gpt.py`` checkpoint as a model for inference, on one process.

``load_model_for_inference(load_dir)`` rebuilds everything from the checkpoint itself: its
``RunConfig`` (saved in every checkpoint) gives the model config (with the padded vocabulary it
was trained with), the layer options and the tokenizer. The model is built on one process
(TP = PP = EP = 1, megatron's parallel groups started as a one-rank group when they are not yet)
and megatron's distributed checkpointing reshards whatever layout the checkpoint was saved with
(TP, EP, PP, DP) into it. The model is returned in eval mode; ReLU routers record nothing in eval.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import torch

from remoe_patches.train.checkpointing import (
    CheckpointError,
    match_saved_names,
    read_checkpoint_state,
    resolve_checkpoint_dir,
)
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.config.run_config import DataConfig, RunConfig
from remoe_patches.data.tokenizer import Tokenizer, build_tokenizer


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Tokenizer
    model_config: ModelConfig


class TokenizerFilesError(CheckpointError):
    """The checkpoint's tokenizer files are not where it recorded them. The message names the
    command-line tools' ``--tokenizer-dir DIR``; ``naming(option)`` words it for another caller
    (lm-eval's ``tokenizer_dir=DIR``)."""

    def __init__(self, reason: str, option: str = "--tokenizer-dir DIR"):
        self.reason = reason
        super().__init__(
            f"cannot rebuild the checkpoint's tokenizer ({reason}); the checkpoint records the "
            f"tokenizer files by path: pass {option} holding them if they moved"
        )

    def naming(self, option: str) -> "TokenizerFilesError":
        return TokenizerFilesError(self.reason, option)


def tokenizer_from_config(data: DataConfig, tokenizer_dir: Optional[str] = None) -> Tokenizer:
    """The run's tokenizer; ``tokenizer_dir`` replaces the saved files' directories (moved
    files)."""
    files = dict(
        vocab_file=data.vocab_file, merge_file=data.merge_file, tokenizer_model=data.tokenizer_model
    )
    if tokenizer_dir is not None:
        files = {
            k: (os.path.join(tokenizer_dir, os.path.basename(v)) if v else v)
            for k, v in files.items()
        }
    try:
        return build_tokenizer(data.tokenizer_type, **files)
    except ValueError as error:
        raise TokenizerFilesError(str(error)) from None


def _ensure_single_rank_groups() -> None:
    from megatron.core import parallel_state

    from remoe_patches.config.model_config import ParallelConfig
    from remoe_patches.runtime.parallel import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(ParallelConfig())
        return
    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    if sizes != (1, 1, 1):
        raise RuntimeError(
            f"inference builds a 1-process model, but megatron's groups are TP/PP/EP={sizes}"
        )


def load_model_for_inference(load_dir: str, *, tokenizer_dir: Optional[str] = None) -> LoadedModel:
    """(model, tokenizer, model_config) of the checkpoint in ``load_dir``, on one process.

    ``load_dir`` is a ``--save`` directory (its latest checkpoint) or one ``iter_XXXXXXX``.
    The model is megatron-core's GPTModel in eval mode (float32), on the GPU when there is one.
    """
    from megatron.core import dist_checkpointing

    from remoe_patches.config.model_config import ParallelConfig
    from remoe_patches.model.build import build_model_for_run

    directory = resolve_checkpoint_dir(load_dir)
    common = read_checkpoint_state(directory)
    config = RunConfig.from_dict(common["run_config"])
    tokenizer = tokenizer_from_config(config.data, tokenizer_dir)
    # One expert MLP per expert (megatron's SequentialMLP) whatever the run used: dist
    # checkpointing maps grouped-GEMM weights onto them, and the export names are theirs.
    model_config = dataclasses.replace(config.model, moe_grouped_gemm=False)

    _ensure_single_rank_groups()
    # Either implementation reads either's checkpoint (checkpointing maps the norm keys).
    built = build_model_for_run(
        model_config,
        ParallelConfig(),
        config.layers.without_recomputation(),
        cuda_available=torch.cuda.is_available(),
    )
    model = built.model
    template = match_saved_names({"model": model.sharded_state_dict()}, directory)
    state = dist_checkpointing.load(template, directory)
    model.load_state_dict(state["model"])
    model.eval()
    model.checkpoint_dir = directory
    model.checkpoint_iteration = common.get("iteration")
    return LoadedModel(model, tokenizer, model_config)


@torch.no_grad()
def megatron_logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, S, vocab] of a megatron GPTModel for tokens at positions 0..S-1."""
    device = next(model.parameters()).device
    tokens_BS = tokens_BS.to(device)
    positions = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
    return model(tokens_BS, positions, None).float()
