"""Export a ``pretrain_gpt.py`` checkpoint to a standard format, and load such an export.

``export_checkpoint(load_dir, output_dir)`` writes one of two layouts, both with

    OUT/model.safetensors   the 1-process model's weights (all parallel shards merged), float32,
                            or bfloat16 with ``dtype="bfloat16"`` (``--bf16``)
    OUT/config.json         the architecture plus the tokenizer, the source checkpoint and the
                            iteration; ``torch_dtype`` names the weights' type
    OUT/<tokenizer files>   vocab.json + merges.txt (GPT-2 BPE), tokenizer.model (SentencePiece)
                            or tokenizer.json (Hugging Face), as named in config.json

- a **dense** run is a plain transformers ``LlamaForCausalLM`` (``llama_export``: Llama's names,
  ``linear_qkv`` and ``linear_fc1`` split; ``model_type: llama``, no remote code);
- a **MoE** run (TopK, ReMoE) keeps megatron's parameter names (TE-fused norm weights and
  grouped-GEMM expert weights renamed to the local-layer names) and ``config.json`` holds
  ``reference_model.GPTConfig``'s fields; transformers loads it with ``trust_remote_code=True``
  through ``model_type``, ``architectures`` and ``auto_map`` and the ``configuration_remoe.py``,
  ``modeling_remoe.py`` (from ``remoe_patches/inference/hf_remote_code/``) and copy of
  ``reference_model.py`` written beside the weights.

Both also get ``generation_config.json`` and, for tokenizers of the ``tokenizers`` library (GPT-2
BPE, tokenizer.json), ``tokenizer.json`` + ``tokenizer_config.json`` for ``AutoTokenizer`` (a
SentencePiece tokenizer is not written in a form AutoTokenizer reads).
``load_export_for_inference`` runs either layout on ``reference_model.GPT`` (no transformers
needed), mapping a Llama export's weights back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch

from remoe_patches.train.checkpointing import CheckpointError
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.inference.llama_export import (
    LLAMA_FORMAT,
    llama_config,
    llama_state,
    reference_config_from_llama,
    reference_state_from_llama,
)
from remoe_patches.data.tokenizer import Tokenizer, build_tokenizer
from remoe_patches.inference.trained_model import load_model_for_inference

EXPORT_FORMAT = "remoe-reference-gpt"
EXPORT_VERSION = 1
HF_REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote_code")
# config.json's torch_dtype names -> the weights' type in model.safetensors
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# transformer-engine layer specs fuse the norms into the following linear layer and group the
# experts' weights; the reference model uses the local layers' names.
_TE_RENAMES = (
    (
        re.compile(r"(.*)\.self_attention\.linear_qkv\.layer_norm_weight$"),
        r"\1.input_layernorm.weight",
    ),
    (re.compile(r"(.*)\.mlp\.linear_fc1\.layer_norm_weight$"), r"\1.pre_mlp_layernorm.weight"),
    (
        re.compile(r"(.*)\.mlp\.experts\.linear_fc([12])\.weight(\d+)$"),
        r"\1.mlp.experts.local_experts.\3.linear_fc\2.weight",
    ),
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
    from remoe_patches.inference.reference_model import ROUTERS as REFERENCE_ROUTERS

    tc = model.config
    unsupported = [
        (
            model_config.router not in REFERENCE_ROUTERS,
            f"the {model_config.router} router (it exports Dense, TopK MoE and ReMoE models)",
        ),
        (tc.rotary_interleaved, "interleaved rotary embedding"),
        (tc.qk_layernorm, "query/key layer norm"),
        (tc.add_bias_linear, "linear biases"),
        (
            getattr(tc, "moe_router_score_function", "softmax") != "softmax",
            f"router score function {getattr(tc, 'moe_router_score_function', None)}",
        ),
        (getattr(tc, "moe_shared_expert_intermediate_size", None), "shared experts"),
        (getattr(tc, "moe_router_enable_expert_bias", False), "router expert bias"),
        (getattr(tc, "moe_router_group_topk", None), "group-limited top-k"),
    ]
    for present, what in unsupported:
        if present:
            raise ValueError(
                f"the reference model does not implement {what}; evaluate or "
                "sample the checkpoint itself (tools/evaluate.py, tools/generate.py "
                "--load DIR)"
            )
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
        return {
            "vocab_file": (source["vocab_file"], "vocab.json"),
            "merge_file": (source["merge_file"], "merges.txt"),
        }
    if tokenizer.kind == "SentencePieceTokenizer":
        return {"tokenizer_model": (source["tokenizer_model"], "tokenizer.model")}
    return {"tokenizer_model": (source["tokenizer_model"], "tokenizer.json")}


def export_checkpoint(
    load_dir: str,
    output_dir: str,
    *,
    tokenizer_dir: Optional[str] = None,
    force: bool = False,
    dtype: str = "float32",
) -> str:
    """Write the checkpoint's export (see the module docstring) to ``output_dir``.

    A non-empty ``output_dir`` is refused unless ``force`` (then the export's files replace
    theirs; other files stay). ``dtype`` is ``float32`` (the default) or ``bfloat16``.
    """
    _check_dtype(dtype)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
        raise CheckpointError(
            f"{output_dir} is not empty; export into a new directory, or pass --force to "
            "overwrite the exported files in it"
        )
    model, tokenizer, model_config = load_model_for_inference(load_dir, tokenizer_dir=tokenizer_dir)
    return export_model(model, model_config, tokenizer, output_dir, dtype=dtype)


def export_model(
    model,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    output_dir: str,
    *,
    dtype: str = "float32",
) -> str:
    """Write a loaded model's export (``load_model_for_inference``'s three values) to
    ``output_dir``, replacing the export's files there.

    Each file is written under a temporary name and renamed into place, readable as the umask
    allows (like any file the user writes); config.json comes last.
    """
    from safetensors.torch import save_file

    from remoe_patches.inference.reference_model import CONFIG_FILE, WEIGHTS_FILE

    _check_dtype(dtype)
    reference = reference_config(model, model_config, tokenizer)
    state = {
        name: value.to(DTYPES[dtype]).contiguous() for name, value in reference_state(model).items()
    }
    if model_config.is_moe:
        layout, safetensors_format = EXPORT_FORMAT, EXPORT_FORMAT
        config = dict(reference, torch_dtype=dtype)
    else:
        layout, safetensors_format = LLAMA_FORMAT, "pt"  # "pt": as transformers' own files
        config = dict(
            llama_config(reference, dtype),
            eos_token_id=tokenizer.eod,
            bos_token_id=None,  # no BOS: training documents start without one
            tokenizer_vocab_size=tokenizer.vocab_size,
            eod_token_id=tokenizer.eod,
        )
        state = llama_state(state, reference)
    config.update(
        format=layout,
        format_version=EXPORT_VERSION,
        source_checkpoint=os.path.abspath(model.checkpoint_dir),
        iteration=model.checkpoint_iteration,
    )
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    for keyword, (source, name) in _tokenizer_files(tokenizer).items():
        _write_atomically(
            os.path.join(output_dir, name),
            lambda path, source=source: shutil.copyfile(source, path),
        )
        files[keyword] = name
    config["tokenizer"] = {"type": tokenizer.kind, "files": files}
    _generation_and_tokenizer_files(output_dir, tokenizer, reference, files)
    if model_config.is_moe:
        config.update(_remote_code_files(output_dir, tokenizer))
    _write_atomically(
        os.path.join(output_dir, WEIGHTS_FILE),
        lambda path: save_file(state, path, metadata={"format": safetensors_format}),
    )
    _write_atomically(os.path.join(output_dir, CONFIG_FILE), lambda path: _write_json(path, config))
    return output_dir


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not exported; use one of {', '.join(DTYPES)}")


def _generation_and_tokenizer_files(
    output_dir: str, tokenizer: Tokenizer, reference: dict, copied: dict
) -> None:
    """generation_config.json, and the tokenizer files AutoTokenizer reads (``copied``: the
    tokenizer's own files, already written)."""
    eod = tokenizer.eod
    # Ids past the tokenizer's vocabulary (the padding rows of the output layer) are never
    # generated, as in tools/generate.py; the logits themselves stay those of training.
    padding_ids = list(range(tokenizer.vocab_size, reference["vocab_size"]))
    _write_atomically(
        os.path.join(output_dir, "generation_config.json"),
        lambda path: _write_json(
            path,
            {
                "eos_token_id": eod,
                "pad_token_id": eod,
                "use_cache": True,
                "suppress_tokens": padding_ids,
            },
        ),
    )
    if tokenizer.hf_tokenizer is not None:
        if "tokenizer.json" not in copied.values():
            _write_atomically(
                os.path.join(output_dir, "tokenizer.json"),
                lambda path: tokenizer.hf_tokenizer.save(path),
            )
        _write_atomically(
            os.path.join(output_dir, "tokenizer_config.json"),
            lambda path: _write_json(
                path,
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": tokenizer.hf_tokenizer.id_to_token(eod),
                    "model_max_length": reference["seq_length"],
                    "clean_up_tokenization_spaces": False,
                },
            ),
        )


def _remote_code_files(output_dir: str, tokenizer: Tokenizer) -> dict:
    """Write the model code transformers runs with trust_remote_code; config.json's fields
    for it."""
    import remoe_patches.inference.reference_model as reference_model

    sources = [
        os.path.join(HF_REMOTE_CODE, name)
        for name in ("configuration_remoe.py", "modeling_remoe.py")
    ]
    for source in sources + [reference_model.__file__]:
        _write_atomically(
            os.path.join(output_dir, os.path.basename(source)),
            lambda path, source=source: shutil.copyfile(source, path),
        )
    return {
        "model_type": "remoe",
        "architectures": ["RemoeForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_remoe.RemoeConfig",
            "AutoModelForCausalLM": "modeling_remoe.RemoeForCausalLM",
        },
        "eos_token_id": tokenizer.eod,
        "use_cache": True,
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
    from remoe_patches.inference.reference_model import CONFIG_FILE, WEIGHTS_FILE

    return all(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_FILE, WEIGHTS_FILE))


def load_export_for_inference(export_dir: str, device=None) -> tuple:
    """(reference model, tokenizer, config dict) of an exported directory, either layout; the
    config dict of a Llama export also holds the reference model's fields (router, seq_length)."""
    from safetensors.torch import load_file

    from remoe_patches.inference.reference_model import (
        CONFIG_FILE,
        GPT,
        GPTConfig,
        WEIGHTS_FILE,
        load_exported,
    )

    with open(os.path.join(export_dir, CONFIG_FILE)) as f:
        config = json.load(f)
    layout = config.get("format")
    if layout == LLAMA_FORMAT:
        config.update(reference_config_from_llama(config))
        model = GPT(GPTConfig.from_dict(config))
        model.load_state_dict(
            reference_state_from_llama(load_file(os.path.join(export_dir, WEIGHTS_FILE)), config)
        )
        model = model.to(device or "cpu").eval()
    elif layout == EXPORT_FORMAT:
        model = load_exported(export_dir, device=device)
    else:
        raise CheckpointError(
            f"{export_dir} is not written by tools/export_checkpoint.py (config.json has format "
            f"{layout!r}, not {EXPORT_FORMAT} or {LLAMA_FORMAT}); load it with transformers, or "
            "export the training checkpoint with tools/export_checkpoint.py"
        )
    spec = config["tokenizer"]
    tokenizer = build_tokenizer(
        spec["type"], **{k: os.path.join(export_dir, v) for k, v in spec["files"].items()}
    )
    return model, tokenizer, config


def reference_from_megatron(model, model_config: ModelConfig, tokenizer: Tokenizer, device=None):
    """The reference model holding a loaded megatron model's weights (no files written)."""
    from remoe_patches.inference.reference_model import GPT, GPTConfig

    reference = GPT(GPTConfig.from_dict(reference_config(model, model_config, tokenizer)))
    reference.load_state_dict(reference_state(model))
    return reference.to(device or "cpu").eval()
