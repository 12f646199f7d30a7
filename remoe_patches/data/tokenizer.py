"""Tokenizers under Megatron-LM's ``--tokenizer-type`` names, without Megatron-LM itself.

megatron-core ships no text tokenizers that read GPT-2 ``vocab.json``/``merges.txt`` without
extra dependencies, so this module rebuilds the three we need on top of the Hugging Face
``tokenizers`` library and ``sentencepiece``:

- ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``--vocab-file`` + ``--merge-file``.
- ``SentencePieceTokenizer``: a SentencePiece ``.model`` from ``--tokenizer-model``; EOD is the
  model's EOS id, as in Megatron-LM's ``GPTSentencePieceTokenizer``.
- ``HuggingFaceTokenizer``: a ``tokenizer.json`` (or a directory holding one) from
  ``--tokenizer-model``.

Every tokenizer exposes ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``,
``vocab_size``, ``eod`` and ``kind``.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer")

GPT2_EOD_TOKEN = "<|endoftext|>"

# Checked in this order for a tokenizer.json; the first one present is the end-of-document id.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


class Tokenizer:
    """A loaded tokenizer: ``tokenize``/``detokenize`` plus ``vocab_size``, ``eod`` and ``kind``.

    Pickling rebuilds it from its files (the wrapped library objects are not reliably
    picklable), which is what multiprocessing workers need.
    """

    def __init__(
        self,
        kind: str,
        vocab_size: int,
        eod: int,
        encode: Callable[[str], list],
        decode: Callable[[list], str],
        source: dict,
        hf_tokenizer=None,
    ) -> None:
        self.kind = kind
        # The ``tokenizers.Tokenizer`` behind GPT-2 BPE and tokenizer.json kinds (what an export
        # saves as tokenizer.json for transformers' AutoTokenizer); None for SentencePiece.
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eod = eod
        self._encode = encode
        self._decode = decode
        self._source = source
        # megatron-core's GPTDatasetConfig hashes this into its dataset cache names; the same
        # shape as its MegatronTokenizer's, so this object can be passed there directly.
        self.unique_identifiers = {"class": kind, "tokenizer_path": list(source.values())}

    def tokenize(self, text: str) -> list:
        """Return the token ids of ``text`` (no EOD appended)."""
        return self._encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Return the text of the token ids ``ids``."""
        return self._decode([int(i) for i in ids])

    def __reduce__(self):
        return (_rebuild_tokenizer, (self.kind, self._source))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _rebuild_tokenizer(kind: str, source: dict) -> Tokenizer:
    return build_tokenizer(kind, **source)


def build_tokenizer(
    tokenizer_type: str,
    *,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
) -> Tokenizer:
    """Load the tokenizer that Megatron-LM names ``tokenizer_type``.

    Args:
        tokenizer_type: ``GPT2BPETokenizer``, ``SentencePieceTokenizer`` or
            ``HuggingFaceTokenizer``.
        vocab_file: GPT-2 ``vocab.json`` (GPT2BPETokenizer).
        merge_file: GPT-2 ``merges.txt`` (GPT2BPETokenizer).
        tokenizer_model: SentencePiece ``.model`` file, or a ``tokenizer.json`` file or a
            directory holding one (HuggingFaceTokenizer).

    Raises:
        ValueError: unknown type, a missing or unreadable file, or no end-of-document token;
            the one-line message names the problem and the fix.
    """
    if tokenizer_type == "GPT2BPETokenizer":
        return _build_gpt2_bpe(vocab_file, merge_file)
    if tokenizer_type == "SentencePieceTokenizer":
        return _build_sentencepiece(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return _build_huggingface(tokenizer_model)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def vocab_size_with_padding(
    vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1
) -> int:
    """Pad ``vocab_size`` up to a multiple of ``divisible_by * tensor_parallel_size``.

    Same result as Megatron-LM's ``_vocab_size_with_padding`` (``--make-vocab-size-divisible-by``
    times ``--tensor-model-parallel-size``), so embedding shapes and checkpoints agree.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    if divisible_by < 1 or tensor_parallel_size < 1:
        raise ValueError(
            f"--make-vocab-size-divisible-by ({divisible_by}) and --tensor-model-parallel-size "
            f"({tensor_parallel_size}) must be positive"
        )
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _require_file(path: Optional[str], flag: str, tokenizer_type: str, what: str) -> str:
    if path is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} does not exist")
    return os.fspath(path)


def _build_gpt2_bpe(vocab_file: Optional[str], merge_file: Optional[str]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab_file = _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer", "GPT-2 vocab.json")
    merge_file = _require_file(merge_file, "--merge-file", "GPT2BPETokenizer", "GPT-2 merges.txt")
    try:
        model = models.BPE.from_file(vocab_file, merge_file)
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(
            f"cannot read GPT-2 BPE files --vocab-file {vocab_file} --merge-file {merge_file}: "
            f"{error}"
        ) from None
    hf = HFTokenizer(model)
    # GPT-2: byte-level with its regex split and no prefix space, so every string round-trips.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    # <|endoftext|> is deliberately not registered as a special token: like Megatron-LM's GPT-2
    # tokenizer, the literal string in a document is encoded as ordinary text, never as EOD.
    eod = hf.token_to_id(GPT2_EOD_TOKEN)
    if eod is None:
        raise ValueError(
            f"--vocab-file {vocab_file} has no {GPT2_EOD_TOKEN} token; use a GPT-2 style vocab.json"
        )
    return _hf_backed_tokenizer(
        "GPT2BPETokenizer", hf, eod, {"vocab_file": vocab_file, "merge_file": merge_file}
    )


def _build_sentencepiece(tokenizer_model: Optional[str]) -> Tokenizer:
    import sentencepiece

    path = _require_file(
        tokenizer_model, "--tokenizer-model", "SentencePieceTokenizer", "a SentencePiece .model"
    )
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(path)
    except Exception as error:  # sentencepiece raises OSError or RuntimeError, by version
        raise ValueError(
            f"--tokenizer-model {path} is not a SentencePiece model: {error}"
        ) from None
    eod = processor.eos_id()
    if eod < 0:
        raise ValueError(
            f"SentencePiece model {path} has no EOS piece (eos_id = -1); retrain it with "
            "eos_id >= 0 to use it as the end-of-document token"
        )
    return Tokenizer(
        kind="SentencePieceTokenizer",
        vocab_size=processor.GetPieceSize(),
        eod=eod,
        encode=lambda text: processor.EncodeAsIds(text),
        decode=lambda ids: processor.DecodeIds(ids),
        source={"tokenizer_model": path},
    )


def _build_huggingface(tokenizer_model: Optional[str]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if tokenizer_model is not None and os.path.isdir(tokenizer_model):
        tokenizer_model = os.path.join(tokenizer_model, "tokenizer.json")
    path = _require_file(
        tokenizer_model, "--tokenizer-model", "HuggingFaceTokenizer", "a tokenizer.json file"
    )
    try:
        hf = HFTokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(
            f"--tokenizer-model {path} is not a tokenizer.json file: {error}"
        ) from None
    eod = next(
        (hf.token_to_id(token) for token in HF_EOD_CANDIDATES if hf.token_to_id(token) is not None),
        None,
    )
    if eod is None:
        raise ValueError(
            f"{path} has none of the end-of-document tokens {', '.join(HF_EOD_CANDIDATES)}; "
            "add one of them to the tokenizer"
        )
    return _hf_backed_tokenizer("HuggingFaceTokenizer", hf, eod, {"tokenizer_model": path})


def _hf_backed_tokenizer(kind: str, hf, eod: int, source: dict) -> Tokenizer:
    """A ``Tokenizer`` over the ``tokenizers.Tokenizer`` ``hf`` (GPT-2 BPE, tokenizer.json)."""
    return Tokenizer(
        kind=kind,
        vocab_size=hf.get_vocab_size(with_added_tokens=True),
        eod=eod,
        # encode() adds the tokenizer's own special tokens (e.g. BOS of a tokenizer.json), as
        # transformers does for Megatron-LM's HuggingFaceTokenizer; GPT-2 BPE has none.
        encode=lambda text: hf.encode(text).ids,
        decode=lambda ids: hf.decode(ids, skip_special_tokens=False),
        source=source,
        hf_tokenizer=hf,
    )
