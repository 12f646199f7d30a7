"""Sampling (temperature, top-k, top-p, greedy) against independent computations, the generation
loop's stops and limits, and tools/generate.py on a trained checkpoint and on its export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from remoe_patches.generation import SamplingConfig, generate, next_token_distribution
from trained_checkpoints import checkpoint, clean_env
from training_runs import REPO

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])


def test_greedy_is_the_argmax():
    probs = next_token_distribution(LOGITS, SamplingConfig(temperature=0))
    assert probs.tolist() == [0, 0, 0, 0, 0, 1]


def test_temperature_top_k_and_top_p_against_the_definitions():
    probs = next_token_distribution(LOGITS, SamplingConfig(temperature=0.5))
    torch.testing.assert_close(probs, torch.softmax(LOGITS / 0.5, dim=0))

    probs = next_token_distribution(LOGITS, SamplingConfig(top_k=2))
    expected = torch.zeros(6)
    expected[[5, 0]] = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(probs, expected)

    # top-p: the smallest set of most likely tokens whose mass reaches p
    full = torch.softmax(LOGITS, dim=0)  # order: 5, 0, 1, 2, 3, 4
    p = float(full[5] + full[0]) + 1e-4  # needs a third token
    probs = next_token_distribution(LOGITS, SamplingConfig(top_p=p))
    kept = [5, 0, 1]
    expected = torch.zeros(6)
    expected[kept] = full[kept] / full[kept].sum()
    torch.testing.assert_close(probs, expected)
    assert next_token_distribution(LOGITS, SamplingConfig(top_p=1e-6)).tolist() == [0] * 5 + [1]


def test_generation_stops_at_eod_and_keeps_to_the_context_and_the_vocabulary():
    seen_lengths = []

    def logits_fn(tokens):
        seen_lengths.append(tokens.shape[1])
        logits = torch.zeros(1, tokens.shape[1], 10)
        logits[..., 8:] = 100.0  # padded vocabulary rows, never to be sampled
        logits[..., 3] = 5.0
        return logits

    config = SamplingConfig(temperature=0, max_new_tokens=6)
    assert generate(logits_fn, [1, 2], config, vocab_size=8, context_length=4) == [3] * 6
    assert seen_lengths == [2, 3, 4, 4, 4, 4]
    assert generate(logits_fn, [1], config, vocab_size=8, context_length=4, eod=3) == []


def test_the_same_seed_gives_the_same_tokens():
    def logits_fn(tokens):
        return torch.randn(1, tokens.shape[1], 50, generator=torch.Generator().manual_seed(
            int(tokens.sum())))

    def sample(seed):
        config = SamplingConfig(temperature=1.5, max_new_tokens=20, seed=seed)
        return generate(logits_fn, [1, 2, 3], config, vocab_size=50, context_length=64)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
        generate(lambda t: torch.zeros(1, 1, 4), [1], SamplingConfig(top_p=0.0), vocab_size=4,
                 context_length=8)


def cli(*argv):
    return subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=clean_env())


@pytest.mark.integration
def test_checkpoint_and_export_generate_the_same_text(tmp_path_factory, tmp_path):
    load = checkpoint(tmp_path_factory, "relu")
    export = tmp_path / "export"
    exported = subprocess.run([sys.executable, str(REPO / "tools" / "export_checkpoint.py"),
                               "--load", load, "--output", str(export)], cwd=REPO,
                              capture_output=True, text=True, timeout=600, env=clean_env())
    assert exported.returncode == 0, exported.stderr[-2000:]
    prompts = ["--prompt", "def main(", "--prompt", "import os"]
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--json", *prompts]
    from_checkpoint = cli("--load", load, *greedy)
    from_export = cli("--load", str(export), *greedy)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    rows = [json.loads(line) for line in from_checkpoint.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["def main(", "import os"]
    assert all(1 <= len(r["tokens"]) <= 12 for r in rows)
    assert from_checkpoint.stdout == from_export.stdout

    sampled = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "3",
               "--max-new-tokens", "12", *prompts]
    first, again = cli("--load", str(export), *sampled), cli("--load", str(export), *sampled)
    assert first.returncode == 0 and first.stdout == again.stdout
    assert first.stdout.startswith("def main(")

    bad = cli("--load", str(export), "--prompt", "x", "--top-p", "2")
    assert bad.returncode == 2
    # named as the flag given, not as the dataclass field behind it
    assert bad.stderr.strip() == "generate.py: error: --top-p 2.0: must be in (0, 1]"


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dense_llama_export_generates(tmp_path_factory, tmp_path, dtype):
    load = checkpoint(tmp_path_factory, "dense")
    export = tmp_path / "export"
    flags = ["--bf16"] if dtype == "bfloat16" else []
    exported = subprocess.run([sys.executable, str(REPO / "tools" / "export_checkpoint.py"),
                               "--load", load, "--output", str(export), *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=600, env=clean_env())
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == dtype
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--json",
              "--prompt", "def main(", "--prompt", "import os"]
    from_export = cli("--load", str(export), *greedy)
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    rows = [json.loads(line) for line in from_export.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["def main(", "import os"]
    if dtype == "float32":  # the same weights: the checkpoint's text
        from_checkpoint = cli("--load", load, *greedy)
        assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
        assert from_export.stdout == from_checkpoint.stdout
    else:  # rounded weights: some text (the logits themselves are checked in test_export.py)
        assert all(1 <= len(r["tokens"]) <= 12 for r in rows)


@pytest.mark.integration
def test_a_prompt_longer_than_the_context_is_said_to_be_cut(tmp_path_factory):
    load = checkpoint(tmp_path_factory, "relu")  # --seq-length 32
    long_prompt = "def main():\n" + "    x = x + 1\n" * 40
    result = cli("--load", load, "--prompt", "import os", "--prompt", long_prompt,
                 "--temperature", "0", "--max-new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("generate.py: ")]
    assert len(notes) == 1 and notes[0].startswith("generate.py: note: prompt 2 is ")
    assert notes[0].endswith(" tokens; the model sees only its last 32 (the checkpoint's "
                             "--seq-length)")
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == [
        "import os", long_prompt]
