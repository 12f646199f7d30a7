"""An export loads in transformers (the release installed from the registry): a MoE export
through AutoConfig, AutoModelForCausalLM and AutoTokenizer with ``trust_remote_code=True``, a
dense one as transformers' own ``LlamaForCausalLM`` without it; the logits equal the
megatron-core model's, the loss is the training loss, and ``generate()`` gives the text
tools/generate.py gives; with a left-padded batch and its key/value cache, each row's tokens are
those the megatron-core model gives the prompt alone. A bfloat16 export loads in bfloat16, close
to the float32 logits, and in float32 gives the logits of the megatron model with its weights
rounded to bfloat16. transformers runs in a subprocess with its own HF_HOME (it copies the
remote code into its module cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trained_checkpoints import RELATIVE_TOLERANCE, SEQ, checkpoint, clean_env, tokens_for

pytestmark = pytest.mark.integration

TRANSFORMERS_SIDE = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
export, tokens_file, out = sys.argv[1:4]
config = AutoConfig.from_pretrained(export, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
tokens = torch.load(tokens_file)
with torch.no_grad():
    logits = model(tokens).logits
    loss = model(tokens, labels=tokens).loss
prompt = tokenizer("def main(", return_tensors="pt").input_ids
generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
torch.save(dict(logits=logits, loss=loss), out)
print(json.dumps(dict(config_class=type(config).__name__, model_class=type(model).__name__,
                      router=config.router, prompt_ids=prompt[0].tolist(),
                      new_ids=generated[0, prompt.shape[1]:].tolist(),
                      text=tokenizer.decode(generated[0]))))
"""


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_transformers_loads_an_export_and_agrees_with_megatron(
    single_rank, tmp_path_factory, tmp_path, router
):
    from remoe_patches.inference.hf_export import export_checkpoint
    from remoe_patches.inference.trained_model import load_model_for_inference, megatron_logits

    load = checkpoint(tmp_path_factory, router)
    export = export_checkpoint(load, str(tmp_path / "export"))
    model, tokenizer, model_config = load_model_for_inference(load)
    tokens = tokens_for(tokenizer.vocab_size, length=SEQ)
    torch.save(tokens, tmp_path / "tokens.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            TRANSFORMERS_SIDE,
            export,
            str(tmp_path / "tokens.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert (seen["config_class"], seen["model_class"], seen["router"]) == (
        "RemoeConfig",
        "RemoeForCausalLM",
        router,
    )

    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = megatron_logits(model, tokens)
    scale = float(expected.abs().max())
    assert float((out["logits"] - expected).abs().max()) <= RELATIVE_TOLERANCE * scale
    # AutoTokenizer reads the exported files as the training tokenizer does; generate() picks
    # the tokens tools/generate.py picks
    same_loss_and_greedy_text(out, seen, expected, tokens, model, tokenizer)
    config = json.loads((Path(export) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_remoe.RemoeForCausalLM"


# Without trust_remote_code; the model in the dtype config.json names (transformers' default)
# and in float32.
LLAMA_SIDE = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
export, tokens_file, out = sys.argv[1:4]
config = AutoConfig.from_pretrained(export)
model = AutoModelForCausalLM.from_pretrained(export).eval()
as_fp32 = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
tokens = torch.load(tokens_file)
with torch.no_grad():
    logits, logits_fp32 = model(tokens).logits, as_fp32(tokens).logits
    loss = as_fp32(tokens, labels=tokens).loss
prompt = tokenizer("def main(", return_tensors="pt").input_ids
generated = as_fp32.generate(prompt, max_new_tokens=12, do_sample=False)
torch.save(dict(logits=logits, logits_fp32=logits_fp32, loss=loss), out)
print(json.dumps(dict(config_class=type(config).__name__, model_class=type(model).__name__,
                      dtypes=sorted({str(p.dtype) for p in model.parameters()}),
                      prompt_ids=prompt[0].tolist(),
                      new_ids=generated[0, prompt.shape[1]:].tolist(),
                      text=tokenizer.decode(generated[0]))))
"""


def run_transformers(script, export, tokens, tmp_path):
    """(the JSON line the script printed, the tensors it saved)."""
    torch.save(tokens, tmp_path / "tokens.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            export,
            str(tmp_path / "tokens.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "out.pt")


def max_error(got, expected) -> float:
    """max |got - expected| in units of max |expected|."""
    return float((got.float() - expected).abs().max()) / float(expected.abs().max())


def test_a_dense_export_is_transformers_own_llama(single_rank, tmp_path_factory, tmp_path):
    from remoe_patches.inference.hf_export import export_model
    from remoe_patches.inference.trained_model import load_model_for_inference, megatron_logits

    model, tokenizer, model_config = load_model_for_inference(checkpoint(tmp_path_factory, "dense"))
    # weights drawn large: attention far from uniform, so a wrong rotary layout would show
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "layernorm" in name else 0.3 * noise)
    export = export_model(model, model_config, tokenizer, str(tmp_path / "export"))
    tokens = tokens_for(tokenizer.vocab_size, length=SEQ)
    seen, out = run_transformers(LLAMA_SIDE, export, tokens, tmp_path)
    assert (seen["config_class"], seen["model_class"], seen["dtypes"]) == (
        "LlamaConfig",
        "LlamaForCausalLM",
        ["torch.float32"],
    )

    with torch.no_grad():
        expected = megatron_logits(model, tokens)
    assert float(expected.std()) > 1.0
    assert max_error(out["logits"], expected) <= RELATIVE_TOLERANCE
    # generate() (with Llama's key/value cache) picks the tokens tools/generate.py picks
    same_loss_and_greedy_text(out, seen, expected, tokens, model, tokenizer)


def test_a_bf16_dense_export_loads_in_bf16(single_rank, tmp_path_factory, tmp_path):
    from remoe_patches.inference.hf_export import export_model
    from remoe_patches.inference.trained_model import load_model_for_inference, megatron_logits

    model, tokenizer, model_config = load_model_for_inference(checkpoint(tmp_path_factory, "dense"))
    export = export_model(
        model, model_config, tokenizer, str(tmp_path / "export"), dtype="bfloat16"
    )
    tokens = tokens_for(tokenizer.vocab_size, length=SEQ)
    seen, out = run_transformers(LLAMA_SIDE, export, tokens, tmp_path)
    assert (seen["model_class"], seen["dtypes"]) == ("LlamaForCausalLM", ["torch.bfloat16"])
    with torch.no_grad():
        expected = megatron_logits(model, tokens)
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
        rounded = megatron_logits(model, tokens)
    # computed in bf16: within bf16's rounding of the float32 logits (measured 0.5%)
    assert max_error(out["logits"], expected) <= 2e-2
    assert max_error(out["logits"], expected) > RELATIVE_TOLERANCE
    # loaded in float32: exactly the bf16-rounded weights
    assert max_error(out["logits_fp32"], rounded) <= RELATIVE_TOLERANCE


# config.json of a bf16 MoE export says bfloat16, but the remote code (reference_model.py)
# computes in float32: it is loaded with dtype=torch.float32.
REMOTE_FP32_SIDE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
export, tokens_file, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True,
                                             dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.load(tokens_file)).logits
torch.save(dict(logits=logits), out)
print(json.dumps(dict(model_class=type(model).__name__)))
"""


def test_a_bf16_moe_export_loads_with_its_remote_code(single_rank, tmp_path_factory, tmp_path):
    from remoe_patches.inference.hf_export import export_checkpoint
    from remoe_patches.inference.trained_model import load_model_for_inference, megatron_logits

    load = checkpoint(tmp_path_factory, "relu")
    export = export_checkpoint(load, str(tmp_path / "export"), dtype="bfloat16")
    model, tokenizer, _ = load_model_for_inference(load)
    tokens = tokens_for(tokenizer.vocab_size, length=SEQ)
    seen, out = run_transformers(REMOTE_FP32_SIDE, export, tokens, tmp_path)
    assert seen["model_class"] == "RemoeForCausalLM"
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
        rounded = megatron_logits(model, tokens)
    assert max_error(out["logits"], rounded) <= RELATIVE_TOLERANCE


GENERATE_SIDE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
export, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
tokenizer.pad_token = tokenizer.eos_token
inputs = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
forwards = []  # (rows, positions fed, the cache's class) of each forward generate() makes
forward = model.forward
def spy(*args, **kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    forwards.append([*kwargs["input_ids"].shape, type(cache).__name__])
    return forward(*args, **kwargs)
model.forward = spy
out = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_logits=True,
                     return_dict_in_generate=True)
model.forward = forward
width = inputs.input_ids.shape[1]
# each step's logits against the whole padded batch recomputed without a cache
errors = []
with torch.no_grad():
    for step, logits in enumerate(out.logits):
        mask = torch.cat([inputs.attention_mask, torch.ones(len(prompts), step).long()], 1)
        full = model(out.sequences[:, :width + step], attention_mask=mask, use_cache=False).logits
        errors.append(float((logits - full[:, -1]).abs().max() / full[:, -1].abs().max()))
print(json.dumps(dict(new_ids=out.sequences[:, width:].tolist(), forwards=forwards,
                      mask=inputs.attention_mask.tolist(), errors=errors,
                      eos=tokenizer.eos_token_id)))
"""


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_transformers_generates_a_left_padded_batch_with_its_cache(
    single_rank, tmp_path_factory, tmp_path, router
):
    from remoe_patches.inference.generation import SamplingConfig, generate
    from remoe_patches.inference.hf_export import export_checkpoint
    from remoe_patches.inference.trained_model import load_model_for_inference, megatron_logits

    load = checkpoint(tmp_path_factory, router)
    export = export_checkpoint(load, str(tmp_path / "export"))
    prompts = ["def main(", "import os", "class Point:\n    def __init__("]
    result = subprocess.run(
        [sys.executable, "-c", GENERATE_SIDE, export, json.dumps(prompts)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # left padding, and the cache used: the prompts once, then one position per step
    lengths = [sum(row) for row in seen["mask"]]
    assert len(set(lengths)) == 3 and all(row[-1] == 1 for row in seen["mask"])
    width = len(seen["mask"][0])
    assert seen["forwards"][0] == [3, width, "DynamicCache"]
    assert seen["forwards"][1:] == [[3, 1, "DynamicCache"]] * (len(seen["forwards"]) - 1)
    assert max(seen["errors"]) <= RELATIVE_TOLERANCE

    # each row: the tokens megatron-core gives its prompt alone, without a cache, to the first
    # end-of-document token (after which transformers pads the row)
    model, tokenizer, _ = load_model_for_inference(load)
    eos = seen["eos"]
    assert max(lengths) + 12 <= SEQ  # transformers does not slide a window past the context
    alone = generate(
        lambda t: megatron_logits(model, t),
        [tokenizer.tokenize(prompt) for prompt in prompts],
        SamplingConfig(temperature=0, max_new_tokens=12, stop_at_eod=False),
        vocab_size=tokenizer.vocab_size,
        context_length=SEQ,
        use_cache=False,
    )

    def to_first_eos(ids):
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    assert [to_first_eos(row) for row in seen["new_ids"]] == [to_first_eos(row) for row in alone]
    assert len({tuple(row) for row in alone}) == 3


def same_loss_and_greedy_text(out, seen, expected, tokens, model, tokenizer) -> None:
    """transformers' loss is the training loss of megatron's logits ``expected``, and its greedy
    continuation of "def main(" is the one generation.generate gives the megatron model."""
    from remoe_patches.inference.generation import SamplingConfig, generate
    from remoe_patches.inference.trained_model import megatron_logits

    training_loss = torch.nn.functional.cross_entropy(
        expected[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
    )
    assert float(out["loss"]) == pytest.approx(float(training_loss), rel=1e-5)
    assert seen["prompt_ids"] == tokenizer.tokenize("def main(")
    [ours] = generate(
        lambda t: megatron_logits(model, t),
        [seen["prompt_ids"]],
        SamplingConfig(temperature=0, max_new_tokens=12, stop_at_eod=False),
        vocab_size=tokenizer.vocab_size,
        context_length=SEQ,
        use_cache=False,
    )
    assert seen["new_ids"] == ours
    assert seen["text"] == "def main(" + tokenizer.detokenize(ours)
