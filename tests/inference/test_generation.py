"""Sampling (temperature, top-k, top-p, greedy) against independent computations, the generation
loop's stops and limits, batched decoding with the key/value cache against each prompt alone
recomputed (the loop before the cache), and tools/generate.py on a trained checkpoint and on its
export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from remoe_patches.inference import reference_model
from remoe_patches.inference.generation import (
    SamplingConfig,
    cache_unavailable_reason,
    generate,
    next_token_distribution,
)
from remoe_patches.config.router_registry import ROUTERS
from tiny_reference import VOCAB, random_rows, tiny_model
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
    assert generate(
        logits_fn, [[1, 2]], config, vocab_size=8, context_length=4, use_cache=False
    ) == [[3] * 6]
    assert seen_lengths == [2, 3, 4, 4, 4, 4]
    assert generate(
        logits_fn, [[1], [2, 2]], config, vocab_size=8, context_length=4, eod=3, use_cache=False
    ) == [[], []]


def test_the_same_seed_gives_the_same_tokens():
    def logits_fn(tokens):
        return torch.randn(
            1, tokens.shape[1], 50, generator=torch.Generator().manual_seed(int(tokens.sum()))
        )

    def sample(seed):
        config = SamplingConfig(temperature=1.5, max_new_tokens=20, seed=seed)
        return generate(
            logits_fn, [[1, 2, 3]], config, vocab_size=50, context_length=64, use_cache=False
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_bad_settings_are_refused():
    def zeros(tokens):
        return torch.zeros(1, tokens.shape[1], 4)

    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
        generate(
            zeros, [[1]], SamplingConfig(top_p=0.0), vocab_size=4, context_length=8, use_cache=False
        )
    with pytest.raises(
        ValueError,
        match=r"^prompts must be a list of token id lists; for one "
        r"prompt pass \[prompt_ids\]$",
    ):
        generate(zeros, [1, 2], SamplingConfig(), vocab_size=4, context_length=8, use_cache=False)
    with pytest.raises(ValueError, match=r"^prompt 2 is empty: give at least one token of text$"):
        generate(
            zeros, [[1], []], SamplingConfig(), vocab_size=4, context_length=8, use_cache=False
        )
    # a function of token ids has no cache to give: asking for one is an error, not a fallback
    with pytest.raises(
        ValueError,
        match=r"^a logits function keeps no key/value cache: pass "
        r"use_cache=False, or a reference_model.GPT",
    ):
        generate(zeros, [[1]], SamplingConfig(), vocab_size=4, context_length=8)


# ---------------------------------------------------------------------------------------------
# Batched decoding with the key/value cache, against each prompt alone, recomputed

# Prompts of different lengths (left-padded together); with a 24-position context, the longest
# rows slide past it while the shorter ones still decode from the cache.
PROMPT_LENGTHS = (3, 11, 7, 1, 17)
CONTEXT = 24


def one_at_a_time(model, prompts, config, eod=None) -> list:
    """The loop before the cache: each prompt alone, the whole context recomputed each token."""
    return [
        generate(
            lambda tokens: model(tokens),
            [prompt],
            config,
            vocab_size=VOCAB - 2,
            context_length=CONTEXT,
            eod=eod,
            use_cache=False,
        )[0]
        for prompt in prompts
    ]


def batched(model, prompts, config, eod=None, use_cache=True) -> list:
    return generate(
        model,
        prompts,
        config,
        vocab_size=VOCAB - 2,
        context_length=CONTEXT,
        eod=eod,
        use_cache=use_cache,
    )


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_greedy_tokens_with_the_cache_equal_each_prompt_alone_without_it(router):
    model = tiny_model(router, seq_length=CONTEXT)
    prompts = [row.tolist() for row in random_rows(*PROMPT_LENGTHS)]
    config = SamplingConfig(temperature=0, max_new_tokens=16)
    expected = one_at_a_time(model, prompts, config)
    assert batched(model, prompts, config) == expected
    assert batched(model, prompts, config, use_cache=False) == expected
    assert [batched(model, [prompt], config)[0] for prompt in prompts] == expected
    # the rows are real text, not one token repeated (which any model would agree on)
    assert all(len(row) == 16 and len(set(row)) >= 3 for row in expected)
    assert len({tuple(row) for row in expected}) == len(prompts)
    assert max(len(p) for p in prompts) + 16 > CONTEXT  # some rows do slide past the context


def test_rows_stop_at_the_end_of_document_and_leave_the_batch():
    model = tiny_model("relu", seq_length=CONTEXT)
    prompts = [row.tolist() for row in random_rows(*PROMPT_LENGTHS)]
    config = SamplingConfig(temperature=0, max_new_tokens=12)
    free = one_at_a_time(model, prompts, config)
    eod = free[1][5]  # the second row ends after 5 tokens; others may end elsewhere or not
    expected = [row[: row.index(eod)] if eod in row else row for row in free]
    assert 0 < len(expected[1]) < 12 and sorted(map(len, expected))[-1] == 12
    shapes = []
    hook = model.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape))
    try:
        assert batched(model, prompts, config, eod=eod) == expected
    finally:
        hook.remove()
    assert one_at_a_time(model, prompts, config, eod=eod) == expected
    # one prefill of every row, then one token per row still decoding (rows leave as they end)
    assert shapes[0] == (len(prompts), max(PROMPT_LENGTHS))
    rows_per_step = [rows for rows, width in shapes[1:] if width == 1]
    assert rows_per_step == sorted(rows_per_step, reverse=True)
    assert rows_per_step[-1] < len(prompts)


def test_sampled_text_is_the_same_alone_in_a_batch_and_without_the_cache():
    model = tiny_model("topk", seq_length=CONTEXT)
    prompts = [row.tolist() for row in random_rows(*PROMPT_LENGTHS)]
    config = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, seed=3, max_new_tokens=12)
    expected = one_at_a_time(model, prompts, config)
    assert batched(model, prompts, config) == expected
    other_seed = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, seed=4, max_new_tokens=12)
    assert batched(model, prompts, other_seed) != expected


def test_the_cache_is_used_only_where_the_registry_and_the_reference_model_allow():
    for name, kind in ROUTERS.items():
        reason = cache_unavailable_reason(name)
        if kind.routes_by_neighbours:
            assert reason == (
                f"{kind.title} routes a token by the other tokens of its sequence, "
                "so cached keys and values would go stale as the sequence grows"
            )
        elif name not in reference_model.ROUTERS:
            assert reason == (
                "the cache runs in the reference model, which implements Dense, "
                f"TopK MoE, ReMoE routing, not {kind.title}"
            )
        else:
            assert reason is None
    assert {name for name in ROUTERS if cache_unavailable_reason(name) is None} == {
        "dense",
        "topk",
        "relu",
    }


def test_a_cache_would_go_stale_under_expert_choice(single_rank):
    """What the refusal guards: under Expert Choice a token's experts depend on the tokens after
    it, so the logits of a prefix change when the sequence grows; cached keys and values of the
    prefix would be those of the shorter sequence."""
    from remoe_patches.config.model_config import ModelConfig, ParallelConfig
    from remoe_patches.model.build import build_model
    from remoe_patches.inference.trained_model import megatron_logits

    torch.manual_seed(3)
    config = ModelConfig(
        router="expert_choice",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        vocab_size=128,
        seq_length=64,
        moe_aux_loss_coeff=0.0,
        init_method_std=0.2,
    )
    model = build_model(config, ParallelConfig(), use_transformer_engine=False).model.eval()
    tokens = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    prefix = megatron_logits(model, tokens[:, :10])
    grown = megatron_logits(model, tokens)[:, :10]
    assert not torch.allclose(prefix, grown, atol=1e-4)


def cli(*argv):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "generate.py"), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )


@pytest.mark.integration
def test_checkpoint_and_export_generate_the_same_text(tmp_path_factory, tmp_path):
    load = checkpoint(tmp_path_factory, "relu")
    export = tmp_path / "export"
    exported = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            load,
            "--output",
            str(export),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    # three prompts of different lengths, two decoding together, then one
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(json.dumps("class Point:\n    def __init__(self") + "\n")
    prompts = [
        "--prompt",
        "def main(",
        "--prompt",
        "import os",
        "--prompt-file",
        str(prompt_file),
        "--batch-size",
        "2",
    ]
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--json", *prompts]
    from_checkpoint = cli("--load", load, *greedy)
    from_export = cli("--load", str(export), *greedy)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    rows = [json.loads(line) for line in from_checkpoint.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [
        "def main(",
        "import os",
        "class Point:\n    def __init__(self",
    ]
    assert all(1 <= len(r["tokens"]) <= 12 for r in rows)
    assert from_checkpoint.stdout == from_export.stdout
    # without the cache: each prompt alone, recomputed (the checkpoint on megatron-core)
    for directory in (load, str(export)):
        uncached = cli("--load", directory, *greedy, "--no-kv-cache")
        assert uncached.returncode == 0, uncached.stderr[-2000:]
        assert uncached.stdout == from_checkpoint.stdout
        assert "generate.py: note" not in uncached.stderr + from_checkpoint.stderr

    sampled = [
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
        *prompts,
    ]
    first, again = cli("--load", str(export), *sampled), cli("--load", str(export), *sampled)
    assert first.returncode == 0 and first.stdout == again.stdout
    assert first.stdout.startswith("def main(")
    assert cli("--load", str(export), *sampled, "--no-kv-cache").stdout == first.stdout

    bad = cli("--load", str(export), "--prompt", "x", "--top-p", "2")
    assert bad.returncode == 2
    # named as the flag given, not as the dataclass field behind it
    assert bad.stderr.strip() == "generate.py: error: --top-p 2.0: must be in (0, 1]"
    prompt_file.write_text("def main(\n")
    bad = cli("--load", str(export), "--prompt-file", str(prompt_file))
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"generate.py: error: --prompt-file {prompt_file} line 1 is "
        'not a JSON string; write each prompt as "text", escapes for '
        "newlines"
    )
    none = cli("--load", str(export))
    assert none.returncode == 2
    assert none.stderr.strip() == (
        "generate.py: error: no prompt: give --prompt TEXT (several "
        "times for several) or --prompt-file FILE"
    )


@pytest.mark.integration
def test_expert_choice_is_generated_without_the_cache_each_prompt_alone(tmp_path_factory):
    load = checkpoint(tmp_path_factory, "expert_choice")
    argv = [
        "--load",
        load,
        "--prompt",
        "def main(",
        "--prompt",
        "import os",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--json",
    ]
    asked = cli(*argv)
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert asked.stderr.strip().splitlines()[-1] == (
        "generate.py: note: no key/value cache: Expert Choice routes a token by the other tokens "
        "of its sequence, so cached keys and values would go stale as the sequence grows; each "
        "prompt is generated alone, its context recomputed for every token"
    )
    uncached = cli(*argv, "--no-kv-cache")
    assert uncached.returncode == 0, uncached.stderr[-2000:]
    assert "generate.py: note" not in uncached.stderr
    assert asked.stdout == uncached.stdout
    assert [json.loads(line)["prompt"] for line in asked.stdout.splitlines()] == [
        "def main(",
        "import os",
    ]


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dense_llama_export_generates(tmp_path_factory, tmp_path, dtype):
    load = checkpoint(tmp_path_factory, "dense")
    export = tmp_path / "export"
    flags = ["--bf16"] if dtype == "bfloat16" else []
    exported = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            load,
            "--output",
            str(export),
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == dtype
    greedy = [
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--json",
        "--prompt",
        "def main(",
        "--prompt",
        "import os",
    ]
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
    result = cli(
        "--load",
        load,
        "--prompt",
        "import os",
        "--prompt",
        long_prompt,
        "--temperature",
        "0",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("generate.py: ")]
    assert len(notes) == 1 and notes[0].startswith("generate.py: note: prompt 2 is ")
    assert notes[0].endswith(
        " tokens; the model sees only its last 32 (the checkpoint's --seq-length)"
    )
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == [
        "import os",
        long_prompt,
    ]


@pytest.mark.integration
def test_the_generation_benchmark_prints_its_table():
    """Not a timing test: the script runs its four modes and finds the same tokens in all."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "benchmark_generation.py"),
            "--router",
            "topk",
            "--prompts",
            "3",
            "--prompt-tokens",
            "4",
            "9",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "command: python tools/benchmark_generation.py --router topk --prompts 3 "
        "--prompt-tokens 4 9 --new-tokens 3 --repeats 1"
    )
    assert lines[3] == (
        "work: 3 prompts of 4-9 tokens, 3 new tokens each (9 in all), greedy; the median of 1 round"
    )
    rows = [line for line in lines if line.startswith("| ") and "seconds" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| recompute, each prompt alone (before the cache)",
        "| recompute, batched (left-padded)",
        "| key/value cache, each prompt alone",
        "| key/value cache, batched (tools/generate.py)",
    ]
    assert rows[0].endswith(" | 1.0x |")
    assert lines[-1] == "same tokens in all four modes: yes"
