"""preprocess_jsonl and tools/preprocess_data.py: what megatron-core reads back is what the
tokenizer produced, document by document, and failures leave nothing behind."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from remoe_patches.data.preprocess import import_indexed_dataset, preprocess_jsonl
from remoe_patches.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def double(x):\n    return x * 2  # twice\n"
    "Ünïcödé café naïve — 日本語のテキスト 🐍\n"
) * 30
DOCUMENTS = [
    "The quick brown fox.",
    "def double(x):\n    return x * 2\n",
    "",  # an empty document still gets its own sequence (just EOD with --append-eod)
    "café naïve — 日本語 🐍",
    "lazy dog " * 50,
    "a<|endoftext|>b",
]


def open_indexed_dataset(prefix):
    return import_indexed_dataset().IndexedDataset(prefix)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """Tiny GPT-2 BPE files, a SentencePiece model and a tokenizer.json, trained here."""
    import sentencepiece
    from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import trainers

    directory = tmp_path_factory.mktemp("tokenizer_files")
    lines = TRAINING_TEXT.splitlines()

    gpt2 = ByteLevelBPETokenizer()
    gpt2.train_from_iterator(
        lines, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False
    )
    gpt2.save_model(str(directory))

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=200,
        hard_vocab_limit=False,
        model_type="bpe",
        minloglevel=2,
    )
    (directory / "sp.model").write_bytes(model.getvalue())

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=250, special_tokens=["<unk>", "</s>"], show_progress=False
    )
    hf.train_from_iterator(lines, trainer=trainer)
    hf.save(str(directory / "tokenizer.json"))

    return {
        "GPT2BPETokenizer": dict(
            vocab_file=str(directory / "vocab.json"), merge_file=str(directory / "merges.txt")
        ),
        "SentencePieceTokenizer": dict(tokenizer_model=str(directory / "sp.model")),
        "HuggingFaceTokenizer": dict(tokenizer_model=str(directory / "tokenizer.json")),
    }


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def read_back(prefix):
    """Token lists of every sequence, after checking one sequence per document."""
    dataset = open_indexed_dataset(prefix)
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", TOKENIZER_TYPES)
def test_round_trip_per_tokenizer(tmp_path, tokenizer_files, kind, workers):
    tokenizer = build_tokenizer(kind, **tokenizer_files[kind])
    # Enough documents for several pool chunks, so a reordering would show.
    texts = [f"{text} #{number}" if text else text for number in range(12) for text in DOCUMENTS]
    rows = [{"text": text, "id": i} for i, text in enumerate(texts)]
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)

    prefixes = preprocess_jsonl(
        input_path, str(tmp_path / "out" / "P"), tokenizer, append_eod=True, workers=workers
    )

    assert prefixes == {"text": str(tmp_path / "out" / "P_text_document")}
    expected = [tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]
    assert read_back(prefixes["text"]) == expected
    assert open_indexed_dataset(prefixes["text"]).index.dtype == numpy.uint16  # vocab < 65500
    assert sorted(os.listdir(tmp_path / "out")) == ["P_text_document.bin", "P_text_document.idx"]


def test_without_append_eod_and_with_several_keys(tmp_path, tokenizer_files):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    rows = [{"text": text, "title": f"title {i}"} for i, text in enumerate(DOCUMENTS)]
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)

    prefixes = preprocess_jsonl(
        input_path, str(tmp_path / "P"), tokenizer, json_keys=("text", "title")
    )

    assert read_back(prefixes["text"]) == [tokenizer.tokenize(text) for text in DOCUMENTS]
    assert read_back(prefixes["title"]) == [tokenizer.tokenize(row["title"]) for row in rows]
    assert read_back(prefixes["text"])[2] == []  # the empty document, kept in place


def test_large_vocabulary_is_stored_as_int32(tmp_path):
    class WideTokenizer:  # ids past uint16's range
        vocab_size = 70000
        eod = 69999

        def tokenize(self, text):
            return [65536 + len(word) for word in text.split()]

    input_path = write_jsonl(tmp_path / "in.jsonl", [{"text": "aa bbb c"}, {"text": "dddd"}])
    prefixes = preprocess_jsonl(input_path, str(tmp_path / "P"), WideTokenizer(), append_eod=True)
    prefix = prefixes["text"]

    assert open_indexed_dataset(prefix).index.dtype == numpy.int32
    assert read_back(prefix) == [[65538, 65539, 65537, 69999], [65540, 69999]]


def test_blank_lines_are_skipped(tmp_path, tokenizer_files):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    rows = ['{"text": "one"}', "", "   ", '{"text": "two"}']
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    prefix = preprocess_jsonl(input_path, str(tmp_path / "P"), tokenizer)["text"]
    assert read_back(prefix) == [tokenizer.tokenize("one"), tokenizer.tokenize("two")]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('{"title": "no text here"}', "missing key 'text'"),
        ('{"text": ["a", "list"]}', "key 'text' is not a string (got list)"),
        ('["not", "an", "object"]', "not a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line_and_leaves_nothing(
    tmp_path, tokenizer_files, bad_line, problem, workers
):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    rows = ['{"text": "one"}', '{"text": "two"}', bad_line, '{"text": "four"}']
    input_path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(ValueError) as raised:
        preprocess_jsonl(input_path, str(tmp_path / "P"), tokenizer, workers=workers)
    message = str(raised.value)
    assert message.startswith(f"{input_path}, line 3: ")
    assert problem in message
    assert "\n" not in message
    assert os.listdir(tmp_path) == ["broken.jsonl"]  # no .bin/.idx, no temporary files


def test_first_bad_line_in_file_order_with_workers(tmp_path, tokenizer_files):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    rows = [json.dumps({"text": f"document {i}"}) for i in range(200)]
    rows[69] = "not json"
    rows[150] = "{}"
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(ValueError, match=r", line 70: not valid JSON"):
        preprocess_jsonl(input_path, str(tmp_path / "P"), tokenizer, workers=2)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_invalid_utf8_is_reported_with_its_line(tmp_path, tokenizer_files):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    input_path = tmp_path / "in.jsonl"
    input_path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"in\.jsonl, line 2: not valid UTF-8"):
        preprocess_jsonl(str(input_path), str(tmp_path / "P"), tokenizer)


def test_failed_run_keeps_previous_outputs(tmp_path, tokenizer_files):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "kept"}])
    prefix = preprocess_jsonl(good, str(tmp_path / "P"), tokenizer)["text"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "new"}, "oops"])
    with pytest.raises(ValueError, match="line 2"):
        preprocess_jsonl(bad, str(tmp_path / "P"), tokenizer)
    assert read_back(prefix) == [tokenizer.tokenize("kept")]


def test_missing_or_empty_input(tmp_path, tokenizer_files):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    with pytest.raises(ValueError, match=r"^input file .*missing\.jsonl does not exist$"):
        preprocess_jsonl(str(tmp_path / "missing.jsonl"), str(tmp_path / "P"), tokenizer)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="holds no documents"):
        preprocess_jsonl(empty, str(tmp_path / "P"), tokenizer)
    # Without EOD, empty texts give an empty .bin, which megatron-core cannot memory-map.
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(ValueError, match="key 'text' of its 2 documents has no tokens"):
        preprocess_jsonl(blank, str(tmp_path / "P"), tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "empty.jsonl"]


def test_progress_lines_every_log_interval(tmp_path, tokenizer_files, capsys):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **tokenizer_files["GPT2BPETokenizer"])
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    preprocess_jsonl(input_path, str(tmp_path / "P"), tokenizer, log_interval=2)
    lines = capsys.readouterr().err.splitlines()
    counts = [line.split(" (")[0] for line in lines[:2]]
    assert counts == ["processed 2 documents", "processed 4 documents"]
    assert lines[2].startswith("tokenized 5 documents")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_cli_writes_megatron_named_outputs(tmp_path, tokenizer_files):
    files = tokenizer_files["GPT2BPETokenizer"]
    input_path = write_jsonl(tmp_path / "X.jsonl", [{"text": text} for text in DOCUMENTS])
    result = run_cli(
        "--input",
        input_path,
        "--output-prefix",
        str(tmp_path / "P"),
        "--json-keys",
        "text",
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        files["vocab_file"],
        "--merge-file",
        files["merge_file"],
        "--append-eod",
        "--workers",
        "2",
        "--log-interval",
        "100",
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr  # megatron's import-time warnings stay out
    assert (tmp_path / "P_text_document.bin").is_file()
    assert (tmp_path / "P_text_document.idx").is_file()
    tokenizer = build_tokenizer("GPT2BPETokenizer", **files)
    expected = [tokenizer.tokenize(text) + [tokenizer.eod] for text in DOCUMENTS]
    assert read_back(str(tmp_path / "P_text_document")) == expected


@pytest.mark.integration
def test_cli_errors_are_one_line(tmp_path, tokenizer_files):
    files = tokenizer_files["SentencePieceTokenizer"]
    common = [
        "--output-prefix",
        str(tmp_path / "P"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        files["tokenizer_model"],
    ]

    missing = run_cli("--input", str(tmp_path / "absent.jsonl"), *common)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"preprocess_data.py: error: input file {tmp_path / 'absent.jsonl'} does not exist"
    ]

    rows = ['{"text": "a"}', '{"text": "b"}', "{oops", '{"text": "d"}']
    broken = write_jsonl(tmp_path / "broken.jsonl", rows)
    malformed = run_cli("--input", broken, *common, "--log-interval", "1000")
    assert malformed.returncode == 1
    assert len(malformed.stderr.strip().splitlines()) == 1
    assert f"{broken}, line 3: not valid JSON" in malformed.stderr
    assert sorted(os.listdir(tmp_path)) == ["broken.jsonl"]

    unknown = run_cli("--input", broken, "--output-prefix", "P", "--tokenizer-type", "Foo")
    assert unknown.returncode == 1
    assert "unknown --tokenizer-type 'Foo'; choose one of" in unknown.stderr
