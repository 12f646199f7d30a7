"""The embedded demo corpus, built small: domains, tokenizer, dataset, cache behaviour."""

import json
import os
from pathlib import Path

import pytest

from remoe_patches.data import demo_corpus
from remoe_patches.data.demo_corpus import (
    DOMAINS,
    build_demo_corpus,
    default_cache_dir,
    ensure_demo_corpus,
)
from remoe_patches.data.preprocess import import_indexed_dataset
from remoe_patches.data.tokenizer import build_tokenizer

SMALL = dict(vocab_size=600, max_chars_per_domain=30_000, seed=7)
ROUND_TRIP_TEXTS = [
    "def main(argv=None):\n    return 0  # plain ascii\n",
    "  leading spaces,\ttabs\nand <|endoftext|> as text",
    "naïve café — 日本語のテキスト, emoji 🐍, Ω≈ç√",
]


@pytest.fixture
def counted_builds(monkeypatch):
    """Count the builds ensure_demo_corpus runs."""
    builds = []

    def counting_build(out_dir, **kwargs):
        builds.append(out_dir)
        return build_demo_corpus(out_dir, **kwargs)

    monkeypatch.setattr(demo_corpus, "build_demo_corpus", counting_build)
    return builds


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return ensure_demo_corpus(tmp_path_factory.mktemp("cache") / "demo", **SMALL)


def read_jsonl(path):
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def test_every_domain_present_and_within_budget(small_corpus):
    documents = read_jsonl(small_corpus.corpus_jsonl)
    domains = json.loads(Path(small_corpus.domains_file).read_text())
    assert domains == [document["domain"] for document in documents]
    assert set(domains) == set(DOMAINS)
    for domain in DOMAINS:
        chars = sum(len(d["text"]) for d in documents if d["domain"] == domain)
        assert 0 < chars <= SMALL["max_chars_per_domain"]
    assert all(document["text"].strip() for document in documents)
    # Interleaved, not one block per domain, so each contiguous --split range mixes domains.
    assert sum(a != b for a, b in zip(domains, domains[1:])) > len(DOMAINS) - 1


def test_domains_hold_what_they_say(small_corpus):
    documents = read_jsonl(small_corpus.corpus_jsonl)
    code = [d["text"] for d in documents if d["domain"] == "code"]
    assert any("def " in text or "import " in text for text in code)
    from pydoc_data.topics import topics

    topic_text = "\n\n".join(topics.values())
    assert all(d["text"] in topic_text for d in documents if d["domain"] == "prose")


def test_tokenizer_round_trips_text(small_corpus):
    gpt2 = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=small_corpus.vocab_file, merge_file=small_corpus.merge_file
    )
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=small_corpus.tokenizer_json)
    assert gpt2.vocab_size == hf.vocab_size == SMALL["vocab_size"]
    assert gpt2.eod == hf.eod
    for text in ROUND_TRIP_TEXTS:
        assert gpt2.detokenize(gpt2.tokenize(text)) == text
        assert hf.detokenize(hf.tokenize(text)) == text
        if "<|endoftext|>" not in text:  # tokenizer.json registers it as a special token
            assert hf.tokenize(text) == gpt2.tokenize(text)
    # Trained merges, not just bytes.
    assert len(gpt2.tokenize(ROUND_TRIP_TEXTS[0])) < 0.75 * len(ROUND_TRIP_TEXTS[0].encode())


def test_dataset_has_one_sequence_per_document(small_corpus):
    documents = read_jsonl(small_corpus.corpus_jsonl)
    dataset = import_indexed_dataset().IndexedDataset(small_corpus.data_prefix)
    assert len(dataset) == len(documents)
    assert len(dataset.document_indices) == len(documents) + 1
    assert int(dataset.sequence_lengths.sum()) == small_corpus.num_tokens
    tokenizer = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=small_corpus.vocab_file, merge_file=small_corpus.merge_file
    )
    for index in (0, len(documents) // 2, len(documents) - 1):
        expected = tokenizer.tokenize(documents[index]["text"]) + [tokenizer.eod]
        assert dataset[index].tolist() == expected
    manifest = json.loads((Path(small_corpus.root) / "MANIFEST.json").read_text())
    assert manifest["num_tokens"] == small_corpus.num_tokens
    assert manifest["num_documents"] == len(documents)
    assert {k: manifest[k] for k in SMALL} == SMALL


def test_cached_corpus_is_reused(small_corpus, counted_builds):
    manifest = Path(small_corpus.root) / "MANIFEST.json"
    before = manifest.stat().st_mtime_ns
    again = ensure_demo_corpus(small_corpus.root, **SMALL)
    assert again == small_corpus
    assert counted_builds == []
    assert manifest.stat().st_mtime_ns == before


def test_rebuilds_without_manifest_or_with_other_parameters(tmp_path, counted_builds):
    cache = tmp_path / "demo"
    first = ensure_demo_corpus(cache, **SMALL)
    assert len(counted_builds) == 1

    (cache / "MANIFEST.json").unlink()  # as if a build had died before finishing
    rebuilt = ensure_demo_corpus(cache, **SMALL)
    assert len(counted_builds) == 2
    assert rebuilt == first and (cache / "MANIFEST.json").is_file()

    other = ensure_demo_corpus(cache, **dict(SMALL, seed=8))
    assert len(counted_builds) == 3
    assert json.loads((cache / "MANIFEST.json").read_text())["seed"] == 8
    assert other.root == first.root
    assert os.listdir(tmp_path) == ["demo"]  # no staging or stale directories left


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def failing_build(out_dir, **kwargs):
        (Path(out_dir) / "corpus.jsonl").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_corpus, "build_demo_corpus", failing_build)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_corpus(tmp_path / "demo", **SMALL)
    assert os.listdir(tmp_path) == []


def test_build_is_deterministic(tmp_path, small_corpus):
    again = build_demo_corpus(tmp_path / "again", **SMALL)
    for name in ("corpus.jsonl", "domains.json", "vocab.json", "merges.txt"):
        first_bytes = (Path(small_corpus.root) / name).read_bytes()
        assert (Path(again.root) / name).read_bytes() == first_bytes
    first_tokens = Path(small_corpus.data_prefix + ".bin").read_bytes()
    assert Path(again.data_prefix + ".bin").read_bytes() == first_tokens


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REMOE_DATA_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("REMOE_DATA_CACHE")
    repo = Path(demo_corpus.__file__).resolve().parent.parent.parent
    assert default_cache_dir() == repo / "data" / "cache" / "demo"


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        ensure_demo_corpus(tmp_path / "demo", vocab_size=100)
    with pytest.raises(ValueError, match="too small: no documents for code, docs, prose"):
        ensure_demo_corpus(tmp_path / "demo", max_chars_per_domain=50)
    with pytest.raises(TypeError):
        ensure_demo_corpus(tmp_path / "demo", vocab=100)
    assert os.listdir(tmp_path) == []


def test_the_launch_says_building_only_when_it_builds(tmp_path, monkeypatch, capsys):
    from remoe_patches.cli import launch
    from remoe_patches.config.model_config import ModelConfig, ParallelConfig
    from remoe_patches.config.run_config import RunConfig, TrainingConfig

    monkeypatch.setenv(demo_corpus.CACHE_DIR_ENV, str(tmp_path / "demo"))
    real = demo_corpus.ensure_demo_corpus
    monkeypatch.setattr(demo_corpus, "ensure_demo_corpus", lambda **kw: real(**kw, **SMALL))
    model = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=600,
        seq_length=16,
    )
    config = RunConfig(
        model=model,
        parallel=ParallelConfig(),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=1, lr=1e-3),
    )
    launch.use_demo_corpus(config)
    assert "demo corpus: building on first use" in capsys.readouterr().out
    launch.use_demo_corpus(config)
    assert capsys.readouterr().out.startswith(f" demo corpus: {tmp_path / 'demo'} (")
