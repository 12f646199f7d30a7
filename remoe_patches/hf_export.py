"""Export a ``pretrain_gpt.py`` checkpoint to a standard format, and load such an export.

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

import json
import os
import re
import shutil
from typing import Optional

import torch

from remoe_patches.checkpointing import CheckpointError
from remoe_patches.config import ModelConfig
from remoe_patches.tokenizer import Tokenizer, build_tokenizer
from remoe_patches.trained_model import load_model_for_inference

EXPORT_FORMAT = "remoe-reference-gpt"
EXPORT_VERSION = 1
HF_REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote_code")



# transformer-engine layer specs fuse the norms into the following linear layer and group the
# experts' weights; the reference model uses the local layers' names.
_TE_RENAMES = (
    (re.compile(r"(.*)\.self_attention\.linear_qkv\.layer_norm_weight$"),
     r"\1.input_layernorm.weight"),
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
        (model_config.router not in ("dense", "topk", "relu"),
         f"the {model_config.router} router (it exports Dense, TopK MoE and ReMoE models)"),
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
            raise ValueError(f"the reference model does not implement {what}; evaluate or "
                             "sample the checkpoint itself (tools/evaluate.py, tools/generate.py "
                             "--load DIR)")
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
        path, {"eos_token_id": eod, "pad_token_id": eod, "use_cache": True,
               "suppress_tokens": padding_ids}))
    if tokenizer.hf_tokenizer is not None:
        if "tokenizer.json" not in config["tokenizer"]["files"].values():  # else copied already
            _write_atomically(os.path.join(output_dir, "tokenizer.json"),
                              lambda path: tokenizer.hf_tokenizer.save(path))
        _write_atomically(
            os.path.join(output_dir, "tokenizer_config.json"),
            lambda path: _write_json(path, {
                "tokenizer_class": "PreTrainedTokenizerFast",
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
