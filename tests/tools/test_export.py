"""tools/export_checkpoint.py and the self-contained reference model.

A dense run exports in HF Llama's layout, a MoE run in the reference layout; both load back
onto the reference model (``load_export_for_inference``), in float32 or bfloat16.

The reference model (plain PyTorch, ``remoe_patches/inference/reference_model.py``) must reproduce
the megatron-core model's logits for dense, TopK MoE and ReMoE checkpoints. Tolerance: float32 on
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
    from remoe_patches.inference.trained_model import megatron_logits

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

    from remoe_patches.inference.hf_export import load_export_for_inference
    from remoe_patches.inference.trained_model import load_model_for_inference

    load = checkpoint(tmp_path_factory, "relu")
    out = tmp_path / "export"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            load,
            "--output",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "configuration_remoe.py",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "modeling_remoe.py",
        "reference_model.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    # readable as the umask allows, like any file the user writes (not 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    # a second export into the same directory is refused; --force overwrites
    again = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            load,
            "--output",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert again.returncode == 2
    assert f"{out} is not empty; export into a new directory, or pass --force" in again.stderr
    (out / "keep.txt").write_text("mine")
    forced = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            load,
            "--output",
            str(out),
            "--force",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "mine"

    model, tokenizer, model_config = load_model_for_inference(load)
    weights = load_file(str(out / "model.safetensors"))
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], value), name
    assert "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight" in weights

    config = json.loads((out / "config.json").read_text())
    assert {
        k: config[k]
        for k in (
            "router",
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "head_dim",
            "num_experts",
            "topk",
            "granularity",
            "expert_ffn_hidden_size",
            "rotary_base",
            "norm_epsilon",
            "vocab_size",
            "seq_length",
            "iteration",
        )
    } == dict(
        router="relu",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        num_experts=8,
        topk=1,
        granularity=1,
        expert_ffn_hidden_size=128,
        rotary_base=1e6,
        norm_epsilon=1e-5,
        vocab_size=512,
        seq_length=SEQ,
        iteration=3,
    )
    assert config["tokenizer"] == {
        "type": "GPT2BPETokenizer",
        "files": {"vocab_file": "vocab.json", "merge_file": "merges.txt"},
    }

    reference, exported_tokenizer, _ = load_export_for_inference(str(out))
    text = "def main():\n    return 'tokenizers agree'\n"
    assert exported_tokenizer.tokenize(text) == tokenizer.tokenize(text)
    assert exported_tokenizer.eod == tokenizer.eod
    assert_logits_match(model, reference, tokens_for(tokenizer.vocab_size))


LLAMA_LAYER_NAMES = [
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
]


def rounded_to_bf16(model):
    """``model`` with every weight rounded to bfloat16 (and kept in float32), in place."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return model


@pytest.mark.integration
def test_a_dense_export_is_a_llama_model(single_rank, tmp_path_factory, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from remoe_patches.inference.hf_export import load_export_for_inference
    from remoe_patches.inference.reference_model import SwiGLU
    from remoe_patches.inference.trained_model import load_model_for_inference

    load = checkpoint(tmp_path_factory, "dense")
    exports = {}
    for name, flags in (("fp32", []), ("bf16", ["--bf16"])):
        exports[name] = tmp_path / name
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "export_checkpoint.py"),
                "--load",
                load,
                "--output",
                str(exports[name]),
                *flags,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=clean_env(),
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # no remote code: transformers' own LlamaForCausalLM runs it (test_hf_export.py)
        assert sorted(p.name for p in exports[name].iterdir()) == [
            "config.json",
            "generation_config.json",
            "merges.txt",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
        ]

    config = json.loads((exports["fp32"] / "config.json").read_text())
    assert {
        k: config[k]
        for k in (
            "architectures",
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
            "vocab_size",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "hidden_act",
            "torch_dtype",
            "eos_token_id",
            "iteration",
        )
    } == dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=SEQ,
        vocab_size=512,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        torch_dtype="float32",
        eos_token_id=0,
        iteration=3,
    )
    assert "auto_map" not in config
    bf16_config = json.loads((exports["bf16"] / "config.json").read_text())
    assert bf16_config.pop("torch_dtype") == "bfloat16"
    assert bf16_config == {k: v for k, v in config.items() if k != "torch_dtype"}

    weights = load_file(str(exports["fp32"] / "model.safetensors"))
    assert sorted(weights) == sorted(
        ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
        + [f"model.layers.{i}.{name}" for i in range(2) for name in LLAMA_LAYER_NAMES]
    )
    assert {value.dtype for value in weights.values()} == {torch.float32}
    with safe_open(str(exports["fp32"] / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers' own files carry
    halves = load_file(str(exports["bf16"] / "model.safetensors"))
    assert sorted(halves) == sorted(weights)
    for name, value in weights.items():
        assert halves[name].dtype == torch.bfloat16
        assert torch.equal(halves[name], value.to(torch.bfloat16)), name
    assert os.path.getsize(exports["bf16"] / "model.safetensors") < 0.51 * os.path.getsize(
        exports["fp32"] / "model.safetensors"
    )

    # the project's own loader maps the Llama weights back onto the reference model
    model, tokenizer, _ = load_model_for_inference(load)
    reference, exported_tokenizer, loaded = load_export_for_inference(str(exports["fp32"]))
    assert (loaded["router"], loaded["seq_length"]) == ("dense", SEQ)
    assert isinstance(reference.decoder.layers[0].mlp, SwiGLU)
    assert exported_tokenizer.tokenize("def main():") == tokenizer.tokenize("def main():")
    tokens = tokens_for(tokenizer.vocab_size)
    fp32_logits = assert_logits_match(model, reference, tokens)
    rounded, _, _ = load_export_for_inference(str(exports["bf16"]))
    assert_logits_match(rounded_to_bf16(model), rounded, tokens)
    with torch.no_grad():  # and the rounding is real
        assert float((rounded(tokens) - fp32_logits).abs().max()) > (
            RELATIVE_TOLERANCE * float(fp32_logits.abs().max())
        )


@pytest.mark.integration
def test_a_bf16_moe_export_keeps_the_reference_layout(single_rank, tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    from remoe_patches.inference.hf_export import export_checkpoint, load_export_for_inference
    from remoe_patches.inference.trained_model import load_model_for_inference

    load = checkpoint(tmp_path_factory, "relu")
    fp32 = Path(export_checkpoint(load, str(tmp_path / "fp32")))
    bf16 = Path(export_checkpoint(load, str(tmp_path / "bf16"), dtype="bfloat16"))
    assert sorted(p.name for p in bf16.iterdir()) == sorted(p.name for p in fp32.iterdir())
    assert "modeling_remoe.py" in {p.name for p in bf16.iterdir()}
    config, bf16_config = (json.loads((d / "config.json").read_text()) for d in (fp32, bf16))
    assert (config.pop("torch_dtype"), bf16_config.pop("torch_dtype")) == ("float32", "bfloat16")
    assert bf16_config == config
    weights = load_file(str(fp32 / "model.safetensors"))
    halves = load_file(str(bf16 / "model.safetensors"))
    assert sorted(halves) == sorted(weights)
    for name, value in weights.items():
        assert torch.equal(halves[name], value.to(torch.bfloat16)), name

    model, tokenizer, _ = load_model_for_inference(load)
    reference, _, _ = load_export_for_inference(str(bf16))
    assert_logits_match(rounded_to_bf16(model), reference, tokens_for(tokenizer.vocab_size))


def test_an_unknown_dtype_is_refused_before_anything_is_read(tmp_path):
    from remoe_patches.inference.hf_export import export_checkpoint

    with pytest.raises(ValueError) as error:
        export_checkpoint(str(tmp_path / "no_run"), str(tmp_path / "out"), dtype="float16")
    assert str(error.value) == "dtype 'float16' is not exported; use one of float32, bfloat16"
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
@pytest.mark.parametrize("router", ROUTERS)
def test_reference_model_matches_megatron(single_rank, tmp_path_factory, tmp_path, router):
    from remoe_patches.inference.hf_export import (
        export_checkpoint,
        load_export_for_inference,
        reference_from_megatron,
    )
    from remoe_patches.inference.trained_model import load_model_for_inference
    from remoe_patches.inference.reference_model import MoE, SwiGLU

    load = checkpoint(tmp_path_factory, router)
    model, tokenizer, model_config = load_model_for_inference(load)
    assert model_config.router == router
    reference, _, config = load_export_for_inference(
        export_checkpoint(load, str(tmp_path / "export"))
    )
    assert config["router"] == router
    assert isinstance(reference.decoder.layers[0].mlp, SwiGLU if router == "dense" else MoE)
    for seed, length in ((0, SEQ), (1, 7)):
        assert_logits_match(
            model, reference, tokens_for(tokenizer.vocab_size, length=length, seed=seed)
        )

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
    single_rank, tmp_path_factory, tmp_path, name
):
    from safetensors.torch import load_file

    from remoe_patches.inference.hf_export import export_checkpoint

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
    from remoe_patches.inference.hf_export import reference_state

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
    assert sorted(state) == sorted(
        [
            "decoder.layers.0.input_layernorm.weight",
            "decoder.layers.0.self_attention.linear_qkv.weight",
            "decoder.layers.0.pre_mlp_layernorm.weight",
            "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
            "decoder.layers.1.mlp.experts.local_experts.11.linear_fc2.weight",
            "decoder.layers.1.pre_mlp_layernorm.weight",
        ]
    )
    assert all(value.dtype == torch.float32 for value in state.values())


@pytest.mark.integration
def test_reference_model_imports_no_megatron():
    source = (REPO / "remoe_patches" / "inference" / "reference_model.py").read_text()
    assert "megatron" not in "\n".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import", "from"))
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, remoe_patches.inference.reference_model; "
            "print(any(m.startswith('megatron') for m in sys.modules))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.integration
def test_the_readmes_export_directory_is_not_tracked():
    # README: tools/export_checkpoint.py --output export/demo, beside runs/ (also ignored)
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("export/demo/model.safetensors", "runs/demo/metrics.jsonl"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is not in .gitignore"
