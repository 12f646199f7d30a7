"""tools/export_checkpoint.py and the self-contained reference model.

The reference model (plain PyTorch, ``remoe_patches/reference_model.py``) must reproduce the
megatron-core model's logits for dense, TopK MoE and ReMoE checkpoints. Tolerance: float32 on
both sides, max |logit difference| <= 1e-5 x max |logit| (measured: about 1e-6 relative; the
sums are ordered differently, nothing else differs). The checkpoints are those of
``trained_checkpoints.py`` (cached for the session); each is checked as trained, and again with
all weights redrawn at a larger scale (std 0.3) so that attention is far from uniform and the
routers pick clearly different experts for different tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trained_checkpoints import (
    RELATIVE_TOLERANCE,
    SEQ,
    checkpoint,
    clean_env,
    tokens_for,
)
from training_runs import REPO

ROUTERS = ("dense", "topk", "relu")


def assert_logits_match(megatron, reference, tokens):
    from remoe_patches.trained_model import megatron_logits

    expected = megatron_logits(megatron, tokens)
    with torch.no_grad():
        got = reference(tokens)
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    error = float((got - expected).abs().max())
    assert error <= RELATIVE_TOLERANCE * scale, (error, scale)
    return expected


@pytest.mark.integration
def test_exported_files(single_rank, tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    from remoe_patches.hf_export import load_export_for_inference
    from remoe_patches.trained_model import load_model_for_inference

    load = checkpoint(tmp_path_factory, "relu")
    out = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_checkpoint.py"), "--load", load,
         "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_remoe.py", "generation_config.json", "merges.txt",
        "model.safetensors", "modeling_remoe.py", "reference_model.py", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"]
    # readable as the umask allows, like any file the user writes (not 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    # a second export into the same directory is refused; --force overwrites
    again = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_checkpoint.py"), "--load", load,
         "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=clean_env())
    assert again.returncode == 2
    assert f"{out} is not empty; export into a new directory, or pass --force" in again.stderr
    (out / "keep.txt").write_text("mine")
    forced = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_checkpoint.py"), "--load", load,
         "--output", str(out), "--force"], cwd=REPO, capture_output=True, text=True,
        timeout=600, env=clean_env())
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "mine"

    model, tokenizer, model_config = load_model_for_inference(load)
    weights = load_file(str(out / "model.safetensors"))
    expected = {k: v for k, v in model.state_dict().items()
                if torch.is_tensor(v) and not k.endswith("_extra_state")}
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], value), name
    assert "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight" in weights

    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in (
        "router", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
        "head_dim", "num_experts", "topk", "granularity", "expert_ffn_hidden_size",
        "rotary_base", "norm_epsilon", "vocab_size", "seq_length", "iteration")} == dict(
        router="relu", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        head_dim=16, num_experts=8, topk=1, granularity=1, expert_ffn_hidden_size=128,
        rotary_base=1e6, norm_epsilon=1e-5, vocab_size=512, seq_length=SEQ, iteration=3)
    assert config["tokenizer"] == {"type": "GPT2BPETokenizer",
                                   "files": {"vocab_file": "vocab.json",
                                             "merge_file": "merges.txt"}}

    reference, exported_tokenizer, _ = load_export_for_inference(str(out))
    text = "def main():\n    return 'tokenizers agree'\n"
    assert exported_tokenizer.tokenize(text) == tokenizer.tokenize(text)
    assert exported_tokenizer.eod == tokenizer.eod
    assert_logits_match(model, reference, tokens_for(tokenizer.vocab_size))


@pytest.mark.integration
@pytest.mark.parametrize("router", ROUTERS)
def test_reference_model_matches_megatron(single_rank, tmp_path_factory, tmp_path, router):
    from remoe_patches.hf_export import (
        export_checkpoint, load_export_for_inference, reference_from_megatron)
    from remoe_patches.trained_model import load_model_for_inference
    from remoe_patches.reference_model import MoE, SwiGLU

    load = checkpoint(tmp_path_factory, router)
    model, tokenizer, model_config = load_model_for_inference(load)
    assert model_config.router == router
    reference, _, config = load_export_for_inference(
        export_checkpoint(load, str(tmp_path / "export")))
    assert config["router"] == router
    assert isinstance(reference.decoder.layers[0].mlp, SwiGLU if router == "dense" else MoE)
    for seed, length in ((0, SEQ), (1, 7)):
        assert_logits_match(model, reference, tokens_for(tokenizer.vocab_size, length=length,
                                                         seed=seed))

    # the same weights redrawn larger: attention and routing far from their near-uniform init
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "layernorm" in name else 0.3 * noise)
    reference = reference_from_megatron(model, model_config, tokenizer)
    tokens = tokens_for(tokenizer.vocab_size, seed=2)
    logits = assert_logits_match(model, reference, tokens)
    assert float(logits.std()) > 1.0
    if router != "dense":
        hidden = reference.embedding.word_embeddings(tokens)
        layer = reference.decoder.layers[0]
        gates = layer.mlp.router(layer.pre_mlp_layernorm(hidden).reshape(-1, 64))
        active = (gates > 0).float()
        assert 0.0 < float(active.mean()) < 1.0
        assert int((active.sum(0) > 0).sum()) >= 4  # several experts used across tokens


@pytest.mark.integration
@pytest.mark.parametrize("name", ["relu-ep2", "relu-tp2", "relu-grouped-ep2"])
def test_export_of_a_sharded_checkpoint_equals_the_single_process_one(
        single_rank, tmp_path_factory, tmp_path, name):
    from safetensors.torch import load_file

    from remoe_patches.hf_export import export_checkpoint

    single = export_checkpoint(checkpoint(tmp_path_factory, "relu"), str(tmp_path / "single"))
    sharded = export_checkpoint(checkpoint(tmp_path_factory, name), str(tmp_path / "sharded"))
    a = load_file(str(Path(single) / "model.safetensors"))
    b = load_file(str(Path(sharded) / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config_a = json.loads((Path(single) / "config.json").read_text())
    config_b = json.loads((Path(sharded) / "config.json").read_text())
    for config in (config_a, config_b):
        config.pop("source_checkpoint")
    assert config_a == config_b


def test_transformer_engine_names_are_mapped_to_the_reference_names():
    from remoe_patches.hf_export import reference_state

    class FakeModel:
        def state_dict(self):
            names = [
                "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                "decoder.layers.0.self_attention.linear_qkv.weight",
                "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
                "decoder.layers.1.mlp.experts.linear_fc1.weight0",
                "decoder.layers.1.mlp.experts.linear_fc2.weight11",
                "decoder.layers.1.pre_mlp_layernorm.weight",
            ]
            state = {name: torch.ones(2, dtype=torch.bfloat16) for name in names}
            state["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
            return state

    state = reference_state(FakeModel())
    assert sorted(state) == sorted([
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
        "decoder.layers.1.mlp.experts.local_experts.11.linear_fc2.weight",
        "decoder.layers.1.pre_mlp_layernorm.weight",
    ])
    assert all(value.dtype == torch.float32 for value in state.values())


@pytest.mark.integration
def test_reference_model_imports_no_megatron():
    source = (REPO / "remoe_patches" / "reference_model.py").read_text()
    assert "megatron" not in "\n".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import", "from")))
    result = subprocess.run(
        [sys.executable, "-c", "import sys, remoe_patches.reference_model; "
         "print(any(m.startswith('megatron') for m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.integration
def test_the_readmes_export_directory_is_not_tracked():
    # README: tools/export_checkpoint.py --output export/demo, beside runs/ (also ignored)
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("export/demo/model.safetensors", "runs/demo/metrics.jsonl"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is not in .gitignore"
