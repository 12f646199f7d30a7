"""Tokenizers under Megatron-LM's names: ids, EOD, round trips, padding and error messages."""

import io
import json
import pickle

import pytest

from remoe_patches.data.tokenizer import build_tokenizer, vocab_size_with_padding

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def double(x):\n    return x * 2  # twice\n"
    "Ünïcödé café naïve — 日本語のテキスト 🐍\n"
) * 30
ROUND_TRIP_TEXTS = [
    "hello world, the lazy dog",
    "  two  spaces\tand a tab\n",
    "café naïve 日本語 🐍",
]


def write_gpt2_bpe_files(directory):
    """Train a ~300-token GPT-2 style byte-level BPE; return (vocab.json, merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        SAMPLE_TEXT.splitlines(),
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    trainer.save_model(str(directory))
    return str(directory / "vocab.json"), str(directory / "merges.txt")


def write_sentencepiece_model(path, eos_id=2):
    """Train a ~200-piece SentencePiece BPE model at ``path``."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_TEXT.splitlines()),
        model_writer=model,
        vocab_size=200,
        hard_vocab_limit=False,
        model_type="bpe",
        eos_id=eos_id,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return str(path)


def write_tokenizer_json(path, special_tokens=("<unk>", "<s>", "</s>")):
    """Train a tiny whitespace BPE saved as a Hugging Face tokenizer.json at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=250, special_tokens=list(special_tokens), show_progress=False
    )
    tokenizer.train_from_iterator(SAMPLE_TEXT.splitlines(), trainer=trainer)
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def gpt2_files(fixture_dir):
    return write_gpt2_bpe_files(fixture_dir)


def test_gpt2_bpe_matches_byte_level_bpe_and_eod(gpt2_files):
    from tokenizers import ByteLevelBPETokenizer

    vocab_file, merge_file = gpt2_files
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    vocab = json.load(open(vocab_file, encoding="utf-8"))
    assert tokenizer.kind == "GPT2BPETokenizer"
    assert tokenizer.vocab_size == len(vocab)
    assert tokenizer.eod == vocab["<|endoftext|>"]
    reference = ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False)
    for text in ROUND_TRIP_TEXTS + [SAMPLE_TEXT]:
        ids = tokenizer.tokenize(text)
        assert ids == reference.encode(text).ids
        assert tokenizer.detokenize(ids) == text
    # No prefix space, as in GPT-2: a leading space is a different token sequence.
    assert tokenizer.tokenize("fox") != tokenizer.tokenize(" fox")


def test_gpt2_bpe_treats_literal_endoftext_as_text(gpt2_files):
    # Megatron-LM's GPT-2 tokenizer never turns document text into EOD.
    vocab_file, merge_file = gpt2_files
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    ids = tokenizer.tokenize("a<|endoftext|>b")
    assert tokenizer.eod not in ids
    assert tokenizer.detokenize(ids) == "a<|endoftext|>b"
    assert tokenizer.detokenize([tokenizer.eod]) == "<|endoftext|>"


def test_sentencepiece_ids_and_eos_as_eod(fixture_dir):
    import sentencepiece

    path = write_sentencepiece_model(fixture_dir / "sp.model", eos_id=2)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=path)
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    assert tokenizer.kind == "SentencePieceTokenizer"
    assert tokenizer.eod == processor.eos_id() == 2
    assert tokenizer.vocab_size == processor.vocab_size()
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids == processor.encode(text)
        assert tokenizer.detokenize(ids) == processor.decode(ids)
    assert tokenizer.detokenize(tokenizer.tokenize("the lazy dog")) == "the lazy dog"


def test_sentencepiece_without_eos_is_a_clear_error(fixture_dir):
    path = write_sentencepiece_model(fixture_dir / "sp_no_eos.model", eos_id=-1)
    with pytest.raises(ValueError, match=r"sp_no_eos\.model has no EOS"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=path)


def test_huggingface_tokenizer_json_and_directory(fixture_dir):
    from tokenizers import Tokenizer

    path = write_tokenizer_json(fixture_dir / "tokenizer.json")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
    reference = Tokenizer.from_file(path)
    assert tokenizer.kind == "HuggingFaceTokenizer"
    assert tokenizer.eod == reference.token_to_id("</s>")
    assert tokenizer.vocab_size == reference.get_vocab_size()
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.tokenize(text) == reference.encode(text).ids
    assert tokenizer.detokenize(tokenizer.tokenize("the lazy dog")) == "the lazy dog"
    from_directory = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(fixture_dir))
    assert from_directory.tokenize("the lazy dog") == tokenizer.tokenize("the lazy dog")


def test_huggingface_eod_candidates_in_order(tmp_path):
    from tokenizers import Tokenizer

    path = write_tokenizer_json(tmp_path / "both.json", special_tokens=("<unk>", "[SEP]", "<eos>"))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
    assert tokenizer.eod == Tokenizer.from_file(path).token_to_id("<eos>")


def test_huggingface_without_eod_names_file_and_candidates(tmp_path):
    path = write_tokenizer_json(tmp_path / "no_eod.json", special_tokens=("<unk>", "<pad>"))
    with pytest.raises(ValueError) as raised:
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
    message = str(raised.value)
    assert "no_eod.json" in message
    for candidate in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
        assert candidate in message


def test_tokenizers_survive_pickling(gpt2_files, fixture_dir):
    # Worker processes receive the tokenizer by pickle.
    vocab_file, merge_file = gpt2_files
    tokenizers = [
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file),
        build_tokenizer(
            "SentencePieceTokenizer",
            tokenizer_model=write_sentencepiece_model(fixture_dir / "pickled.model"),
        ),
        build_tokenizer(
            "HuggingFaceTokenizer",
            tokenizer_model=write_tokenizer_json(fixture_dir / "pickled.json"),
        ),
    ]
    for tokenizer in tokenizers:
        copy = pickle.loads(pickle.dumps(tokenizer))
        assert (copy.kind, copy.vocab_size, copy.eod) == (
            tokenizer.kind,
            tokenizer.vocab_size,
            tokenizer.eod,
        )
        assert copy.tokenize(SAMPLE_TEXT) == tokenizer.tokenize(SAMPLE_TEXT)


def test_unknown_type_lists_the_choices():
    with pytest.raises(ValueError) as raised:
        build_tokenizer("Foo")
    assert str(raised.value) == (
        "unknown --tokenizer-type 'Foo'; choose one of GPT2BPETokenizer, "
        "SentencePieceTokenizer, HuggingFaceTokenizer"
    )


def test_missing_files_name_the_flag_and_path(tmp_path, gpt2_files):
    vocab_file, merge_file = gpt2_files
    missing = str(tmp_path / "gpt2-vocab.json")
    with pytest.raises(ValueError, match=f"^--vocab-file {missing} does not exist$"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing, merge_file=merge_file)
    with pytest.raises(ValueError, match="^--merge-file .*nope.txt does not exist$"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=vocab_file, merge_file=str(tmp_path / "nope.txt")
        )
    with pytest.raises(ValueError, match="^--tokenizer-model .*x.model does not exist$"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "x.model"))
    with pytest.raises(ValueError, match="^--tokenizer-model .*tokenizer.json does not exist$"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file)
    with pytest.raises(ValueError, match="SentencePieceTokenizer needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")


def test_malformed_files_are_value_errors(tmp_path, gpt2_files):
    vocab_file, merge_file = gpt2_files
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="garbage.bin is not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(garbage))
    with pytest.raises(ValueError, match="garbage.bin is not a tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(garbage))
    with pytest.raises(ValueError, match="cannot read GPT-2 BPE files"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(garbage), merge_file=merge_file)


@pytest.mark.parametrize(
    "vocab_size, divisible_by, tensor_parallel_size, padded",
    [
        (50257, 128, 1, 50304),  # GPT-2 with Megatron-LM's default
        (50257, 1024, 1, 51200),  # the ReMoE scripts' --make-vocab-size-divisible-by 1024
        (50257, 128, 8, 51200),
        (4096, 1024, 1, 4096),  # already a multiple: unchanged
        (4097, 1024, 2, 6144),
        (1, 1, 1, 1),
    ],
)
def test_vocab_size_with_padding_matches_megatron(
    vocab_size, divisible_by, tensor_parallel_size, padded
):
    assert vocab_size_with_padding(vocab_size, divisible_by, tensor_parallel_size) == padded


def test_vocab_size_with_padding_rejects_nonpositive():
    with pytest.raises(ValueError):
        vocab_size_with_padding(0, 128)
    with pytest.raises(ValueError):
        vocab_size_with_padding(100, 0)
