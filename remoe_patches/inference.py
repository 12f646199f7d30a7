"""Load a ``pretrain_gpt.py`` checkpoint for inference, and export it to a standard format.

``load_model_for_inference(load_dir)`` rebuilds everything from the checkpoint itself: the run's
arguments are in its common state (``args``), so the model config, the tokenizer and the padded
vocabulary come out exactly as at training time (the vocabulary was padded to a multiple of
``--make-vocab-size-divisible-by`` times the *saved* tensor-parallel size). The model is built
on one process (TP = PP = EP = 1, megatron's parallel groups started as a one-rank group when
they are not yet) and megatron's distributed checkpointing reshards whatever layout the
checkpoint was saved with (TP, EP, PP, DP) into it. The model is returned in eval mode; ReLU
routers record nothing in eval.

``export_checkpoint(load_dir, output_dir)`` writes what ``remoe_patches.reference_model`` loads:

    OUT/model.safetensors   the 1-process model's weights, megatron's parameter names, float32
                            (all parallel shards merged; TE-fused norm weights and grouped-GEMM
                            expert weights renamed to the local-layer names)
    OUT/config.json         the architecture (``reference_model.GPTConfig`` fields) plus the
                            tokenizer, the source checkpoint and the iteration
    OUT/<tokenizer files>   vocab.json + merges.txt (GPT-2 BPE), tokenizer.model (SentencePiece)
                            or tokenizer.json (Hugging Face), as named in config.json

and what transformers needs to load it with ``trust_remote_code=True``: ``config.json`` also
carries ``model_type``, ``architectures`` and ``auto_map``; ``configuration_remoe.py``,
``modeling_remoe.py`` (from ``remoe_patches/hf_remote_code/``) and a copy of
``reference_model.py`` are the model's code; ``generation_config.json``; and for tokenizers of the
``tokenizers`` library (GPT-2 BPE, tokenizer.json) ``tokenizer.json`` + ``tokenizer_config.json``
for ``AutoTokenizer`` (a SentencePiece tokenizer is not written in a form AutoTokenizer reads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
from typing import NamedTuple, Optional

import torch

from remoe_patches.config import ModelConfig
from remoe_patches.tokenizer import Tokenizer, build_tokenizer, vocab_size_with_padding

EXPORT_FORMAT = "remoe-reference-gpt"
EXPORT_VERSION = 1
HF_REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote_code")


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Tokenizer
    model_config: ModelConfig


class CheckpointError(ValueError):
    """A directory that is not a loadable checkpoint; the message says what is missing."""


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint


def resolve_checkpoint_dir(load_dir: str) -> str:
    """``<save>`` (follows ``latest_checkpointed_iteration.txt``) or ``<save>/iter_XXXXXXX``."""
    from remoe_patches.checkpointing import LATEST_FILE, checkpoint_dir, latest_iteration

    load_dir = os.fspath(load_dir)
    if os.path.isfile(os.path.join(load_dir, "metadata.json")):
        return load_dir
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
    iteration = latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(
            f"{load_dir} holds no checkpoint: expected {LATEST_FILE} (a pretrain_gpt.py --save "
            "directory) or a megatron distributed checkpoint (iter_XXXXXXX with metadata.json)"
        )
    directory = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{os.path.join(load_dir, LATEST_FILE)} names iteration {iteration}, but {directory} "
            "is missing"
        )
    return directory


def read_checkpoint_state(directory: str) -> dict:
    """The checkpoint's common (non-sharded) state: ``args``, ``iteration``, ..."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(directory)
    if not common.get("args"):
        raise CheckpointError(
            f"{directory} has no saved arguments ('args' in its common state): it was not "
            "written by pretrain_gpt.py"
        )
    return common


def checkpoint_args(saved: dict) -> argparse.Namespace:
    """The saved arguments over pretrain_gpt.py's defaults (for keys an older run lacked)."""
    from remoe_patches.arguments import build_parser

    values = vars(build_parser().parse_args([]))
    values.update(saved)
    values["given"] = frozenset()
    return argparse.Namespace(**values)


def tokenizer_from_args(args, tokenizer_dir: Optional[str] = None) -> Tokenizer:
    """The run's tokenizer; ``tokenizer_dir`` replaces the saved files' directories (moved files)."""
    files = dict(vocab_file=args.vocab_file, merge_file=args.merge_file,
                 tokenizer_model=args.tokenizer_model)
    if tokenizer_dir is not None:
        files = {k: (os.path.join(tokenizer_dir, os.path.basename(v)) if v else v)
                 for k, v in files.items()}
    try:
        return build_tokenizer(args.tokenizer_type, **files)
    except ValueError as error:
        raise CheckpointError(
            f"cannot rebuild the checkpoint's tokenizer ({error}); the checkpoint records the "
            "tokenizer files by path: pass tokenizer_dir=DIR holding them if they moved"
        ) from None


def padded_vocab_size(args, tokenizer: Tokenizer) -> int:
    """The vocabulary size the model was built with (padding uses the saved TP size)."""
    return vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)


def _ensure_single_rank_groups() -> None:
    from megatron.core import parallel_state

    from remoe_patches.config import ParallelConfig
    from remoe_patches.parallel import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(ParallelConfig())
        return
    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_expert_model_parallel_world_size())
    if sizes != (1, 1, 1):
        raise RuntimeError(
            f"inference builds a 1-process model, but megatron's groups are TP/PP/EP={sizes}")


def load_model_for_inference(
    load_dir: str, *, tokenizer_dir: Optional[str] = None
) -> LoadedModel:
    """(model, tokenizer, model_config) of the checkpoint in ``load_dir``, on one process.

    ``load_dir`` is a ``--save`` directory (its latest checkpoint) or one ``iter_XXXXXXX``.
    The model is megatron-core's GPTModel in eval mode (float32), on the GPU when there is one.
    """
    from megatron.core import dist_checkpointing

    from remoe_patches.arguments import model_config_from_args, transformer_overrides_from_args
    from remoe_patches.config import ParallelConfig
    from remoe_patches.model import HAVE_TE, build_model

    directory = resolve_checkpoint_dir(load_dir)
    common = read_checkpoint_state(directory)
    args = checkpoint_args(common["args"])
    tokenizer = tokenizer_from_args(args, tokenizer_dir)
    model_config = model_config_from_args(args, vocab_size=padded_vocab_size(args, tokenizer))
    # One expert MLP per expert (megatron's SequentialMLP) whatever the run used: dist
    # checkpointing maps grouped-GEMM weights onto them, and the export names are theirs.
    model_config = dataclasses.replace(model_config, moe_grouped_gemm=False)

    _ensure_single_rank_groups()
    use_cuda = torch.cuda.is_available()
    use_te = HAVE_TE and args.transformer_impl == "transformer_engine"
    overrides = transformer_overrides_from_args(
        args, cuda_available=use_cuda, transformer_engine_available=use_te)
    for key in ("recompute_granularity", "recompute_method", "recompute_num_layers",
                "recompute_modules"):
        overrides.pop(key, None)
    built = build_model(model_config, ParallelConfig(), use_transformer_engine=use_te,
                        **overrides)
    model = built.model
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
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


# ---------------------------------------------------------------------------------------------
# Export

# transformer-engine layer specs fuse the norms into the following linear layer and group the
# experts' weights; the reference model uses the local layers' names.
_TE_RENAMES = (
    (re.compile(r"(.*)\.self_attention\.linear_qkv\.layer_norm_weight$"), r"\1.input_layernorm.weight"),
    (re.compile(r"(.*)\.mlp\.linear_fc1\.layer_norm_weight$"), r"\1.pre_mlp_layernorm.weight"),
    (re.compile(r"(.*)\.mlp\.experts\.linear_fc([12])\.weight(\d+)$"),
     r"\1.mlp.experts.local_experts.\3.linear_fc\2.weight"),
)


def reference_state(model) -> dict:
    """The megatron model's weights under the reference model's (= local layers') names."""
    state = {}
    for name, value in model.state_dict().items():
        if not torch.is_tensor(value) or name.endswith("_extra_state"):
            continue
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue
        for pattern, replacement in _TE_RENAMES:
            name = pattern.sub(replacement, name)
        state[name] = value.detach().to("cpu", torch.float32).contiguous()
    return state


def reference_config(model, model_config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """``config.json``'s architecture fields (``reference_model.GPTConfig``), checked."""
    tc = model.config
    unsupported = [
        (tc.rotary_interleaved, "interleaved rotary embedding"),
        (tc.qk_layernorm, "query/key layer norm"),
        (tc.add_bias_linear, "linear biases"),
        (getattr(tc, "moe_router_score_function", "softmax") != "softmax",
         f"router score function {getattr(tc, 'moe_router_score_function', None)}"),
        (getattr(tc, "moe_shared_expert_intermediate_size", None), "shared experts"),
        (getattr(tc, "moe_router_enable_expert_bias", False), "router expert bias"),
        (getattr(tc, "moe_router_group_topk", None), "group-limited top-k"),
    ]
    for present, what in unsupported:
        if present:
            raise ValueError(f"the reference model does not implement {what}")
    config = dict(
        vocab_size=model_config.vocab_size,
        num_layers=model_config.num_layers,
        hidden_size=model_config.hidden_size,
        num_attention_heads=model_config.num_attention_heads,
        num_query_groups=tc.num_query_groups or model_config.num_attention_heads,
        head_dim=tc.kv_channels,
        seq_length=model_config.seq_length,
        rotary_base=float(model_config.rotary_base),
        norm_epsilon=float(tc.layernorm_epsilon),
        router=model_config.router,
        ffn_hidden_size=model_config.dense_ffn_hidden_size,
    )
    if model_config.is_moe:
        config.update(
            num_experts=model_config.total_experts,
            topk=model_config.total_topk,
            expert_ffn_hidden_size=model_config.expert_ffn_hidden_size,
            moe_router_pre_softmax=bool(tc.moe_router_pre_softmax),
            moe_router_topk_scaling_factor=tc.moe_router_topk_scaling_factor,
            # informational: E and k before granularity, the ReLU router's target sparsity
            num_experts_before_granularity=model_config.num_experts,
            topk_before_granularity=model_config.topk,
            granularity=model_config.granularity,
            target_sparsity=model_config.target_sparsity,
        )
    config.update(tokenizer_vocab_size=tokenizer.vocab_size, eod_token_id=tokenizer.eod)
    return config


def _tokenizer_files(tokenizer: Tokenizer) -> dict:
    """{build_tokenizer keyword: (source path, file name in the export)}."""
    source = tokenizer._source
    if tokenizer.kind == "GPT2BPETokenizer":
        return {"vocab_file": (source["vocab_file"], "vocab.json"),
                "merge_file": (source["merge_file"], "merges.txt")}
    if tokenizer.kind == "SentencePieceTokenizer":
        return {"tokenizer_model": (source["tokenizer_model"], "tokenizer.model")}
    return {"tokenizer_model": (source["tokenizer_model"], "tokenizer.json")}


def export_checkpoint(load_dir: str, output_dir: str, *,
                      tokenizer_dir: Optional[str] = None, force: bool = False) -> str:
    """Write ``model.safetensors``, ``config.json`` and the tokenizer files to ``output_dir``.

    A non-empty ``output_dir`` is refused unless ``force`` (then the export's files replace
    theirs; other files stay). Each file is written under a temporary name and renamed into
    place, readable as the umask allows (like any file the user writes).
    """
    from safetensors.torch import save_file

    from remoe_patches.reference_model import CONFIG_FILE, WEIGHTS_FILE

    if os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
        raise CheckpointError(
            f"{output_dir} is not empty; export into a new directory, or pass --force to "
            "overwrite the exported files in it")
    model, tokenizer, model_config = load_model_for_inference(load_dir, tokenizer_dir=tokenizer_dir)
    config = reference_config(model, model_config, tokenizer)
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    for keyword, (source, name) in _tokenizer_files(tokenizer).items():
        _write_atomically(os.path.join(output_dir, name),
                          lambda path, source=source: shutil.copyfile(source, path))
        files[keyword] = name
    config.update(
        format=EXPORT_FORMAT,
        format_version=EXPORT_VERSION,
        tokenizer={"type": tokenizer.kind, "files": files},
        source_checkpoint=os.path.abspath(model.checkpoint_dir),
        iteration=model.checkpoint_iteration,
    )
    config.update(_transformers_files(output_dir, tokenizer, config))
    state = reference_state(model)
    _write_atomically(os.path.join(output_dir, WEIGHTS_FILE),
                      lambda path: save_file(state, path, metadata={"format": EXPORT_FORMAT}))
    _write_atomically(os.path.join(output_dir, CONFIG_FILE),
                      lambda path: _write_json(path, config))
    return output_dir


def _transformers_files(output_dir: str, tokenizer: Tokenizer, config: dict) -> dict:
    """Write the model code and tokenizer files transformers loads; config.json's fields for it."""
    import remoe_patches.reference_model as reference_model

    sources = [os.path.join(HF_REMOTE_CODE, name)
               for name in ("configuration_remoe.py", "modeling_remoe.py")]
    for source in sources + [reference_model.__file__]:
        _write_atomically(os.path.join(output_dir, os.path.basename(source)),
                          lambda path, source=source: shutil.copyfile(source, path))
    eod = tokenizer.eod
    # Ids past the tokenizer's vocabulary (the padding rows of the output layer) are never
    # generated, as in tools/generate.py; the logits themselves stay those of training.
    padding_ids = list(range(tokenizer.vocab_size, config["vocab_size"]))
    _write_atomically(os.path.join(output_dir, "generation_config.json"), lambda path: _write_json(
        path, {"eos_token_id": eod, "pad_token_id": eod, "use_cache": False,
               "suppress_tokens": padding_ids}))
    if tokenizer.hf_tokenizer is not None:
        if "tokenizer.json" not in config["tokenizer"]["files"].values():  # else copied already
            _write_atomically(os.path.join(output_dir, "tokenizer.json"),
                              lambda path: tokenizer.hf_tokenizer.save(path))
        _write_atomically(os.path.join(output_dir, "tokenizer_config.json"), lambda path: _write_json(
            path, {"tokenizer_class": "PreTrainedTokenizerFast",
                   "eos_token": tokenizer.hf_tokenizer.id_to_token(eod),
                   "model_max_length": config["seq_length"],
                   "clean_up_tokenization_spaces": False}))
    return {
        "model_type": "remoe",
        "architectures": ["RemoeForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_remoe.RemoeConfig",
                     "AutoModelForCausalLM": "modeling_remoe.RemoeForCausalLM"},
        "eos_token_id": eod,
        "torch_dtype": "float32",
        "use_cache": False,
    }


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_atomically(path: str, write) -> None:
    """``write(temporary path)``, then the umask's permissions and a rename onto ``path``."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def is_export_dir(path: str) -> bool:
    from remoe_patches.reference_model import CONFIG_FILE, WEIGHTS_FILE

    return all(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_FILE, WEIGHTS_FILE))


def load_export_for_inference(export_dir: str, device=None) -> tuple:
    """(reference model, tokenizer, config dict) of an exported directory."""
    from remoe_patches.reference_model import CONFIG_FILE, load_exported

    with open(os.path.join(export_dir, CONFIG_FILE)) as f:
        config = json.load(f)
    spec = config["tokenizer"]
    tokenizer = build_tokenizer(
        spec["type"], **{k: os.path.join(export_dir, v) for k, v in spec["files"].items()})
    return load_exported(export_dir, device=device), tokenizer, config


def reference_from_megatron(model, model_config: ModelConfig, tokenizer: Tokenizer, device=None):
    """The reference model holding a loaded megatron model's weights (no files written)."""
    from remoe_patches.reference_model import GPT, GPTConfig

    reference = GPT(GPTConfig.from_dict(reference_config(model, model_config, tokenizer)))
    reference.load_state_dict(reference_state(model))
    return reference.to(device or "cpu").eval()
