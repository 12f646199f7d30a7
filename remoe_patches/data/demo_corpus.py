"""The embedded demo corpus: a small multi-domain training set built from Python itself.

Every Python install carries enough text for a CPU-sized language model, so the demo needs no
download. Three domains, kept apart for per-domain routing analysis:

- ``code``: standard-library source files (tests, site-packages and codec tables left out);
- ``docs``: the module, class and function docstrings of those files;
- ``prose``: the pydoc topic texts (``pydoc_data.topics``), split at paragraph breaks.

``build_demo_corpus`` writes ``corpus.jsonl``, trains a byte-level BPE tokenizer on it (saved as
GPT-2 ``vocab.json`` + ``merges.txt`` and as ``tokenizer.json``), tokenizes it into the indexed
dataset ``demo_text_document.bin/.idx`` and records each document's domain in ``domains.json``.
``ensure_demo_corpus`` keeps one built copy in a cache directory.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import random
import shutil
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from remoe_patches.data.preprocess import import_indexed_dataset, preprocess_jsonl
from remoe_patches.data.tokenizer import GPT2_EOD_TOKEN, build_tokenizer

DOMAINS = ("code", "docs", "prose")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_CHARS_PER_DOMAIN = 3_000_000
DEFAULT_SEED = 1234
CACHE_DIR_ENV = "REMOE_DATA_CACHE"

# Bump when the corpus contents or layout change, so old caches are rebuilt.
FORMAT_VERSION = 1

CORPUS_FILE = "corpus.jsonl"
VOCAB_FILE = "vocab.json"
MERGE_FILE = "merges.txt"
TOKENIZER_JSON = "tokenizer.json"
DOMAINS_FILE = "domains.json"
MANIFEST_FILE = "MANIFEST.json"
OUTPUT_PREFIX = "demo"  # preprocess_jsonl names the dataset demo_text_document

# Generated tables and fixtures are not the code a model should learn from.
_SKIPPED_STDLIB_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",
    "encodings",
}
_MAX_SOURCE_FILE_BYTES = 100_000
# A budget remainder smaller than this is not worth a truncated document.
_MIN_DOCUMENT_CHARS = 200
# pydoc topics run up to ~50k characters; shorter documents give the per-domain routing
# analysis more samples and let every validation split see some prose.
_MAX_PROSE_DOCUMENT_CHARS = 4000


@dataclass(frozen=True)
class DemoCorpus:
    """Paths of a built demo corpus; ``data_prefix`` is the indexed dataset without .bin/.idx."""

    root: str
    data_prefix: str
    vocab_file: str
    merge_file: str
    tokenizer_json: str
    domains_file: str
    corpus_jsonl: str
    num_tokens: int


def default_cache_dir() -> Path:
    """``$REMOE_DATA_CACHE``, else ``<repo>/data/cache/demo`` (git-ignored).

    Outside a source checkout (an installed package) the fallback is ``~/.cache/remoe/demo``
    rather than a directory inside site-packages.
    """
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    repo = Path(__file__).resolve().parent.parent.parent
    if (repo / "setup.py").is_file():
        return repo / "data" / "cache" / "demo"
    return Path.home() / ".cache" / "remoe" / "demo"


def build_demo_corpus(
    out_dir,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN,
    seed: int = DEFAULT_SEED,
) -> DemoCorpus:
    """Build the demo corpus, its tokenizer and its indexed dataset into ``out_dir``.

    Deterministic for a given Python installation and arguments. ``MANIFEST.json`` is written
    last, so its presence marks a complete build. Prefer ``ensure_demo_corpus``, which caches
    the result and never leaves a half-built directory at the cache path.

    Args:
        out_dir: directory to write into (created if missing).
        vocab_size: BPE vocabulary size, ``<|endoftext|>`` included; a tiny corpus may yield
            fewer tokens (``MANIFEST.json`` records the actual size).
        max_chars_per_domain: character budget of each domain.
        seed: picks which stdlib files fill the budget and interleaves the domains' documents.
    """
    started = time.monotonic()
    params = _build_parameters(vocab_size, max_chars_per_domain, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    documents = collect_documents(max_chars_per_domain, seed)
    corpus_path = out / CORPUS_FILE
    with open(corpus_path, "w", encoding="utf-8") as corpus:
        for text, domain in documents:
            corpus.write(json.dumps({"text": text, "domain": domain}, ensure_ascii=False) + "\n")
    # One name per document, in document order: entry i is the domain of sequence i of the
    # indexed dataset.
    (out / DOMAINS_FILE).write_text(json.dumps([domain for _, domain in documents]) + "\n")

    _train_tokenizer((text for text, _ in documents), vocab_size, out)
    tokenizer = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=str(out / VOCAB_FILE), merge_file=str(out / MERGE_FILE)
    )
    prefixes = preprocess_jsonl(
        str(corpus_path), str(out / OUTPUT_PREFIX), tokenizer, append_eod=True, workers=1
    )
    data_prefix = prefixes["text"]

    dataset = import_indexed_dataset().IndexedDataset(data_prefix)
    if len(dataset) != len(documents):  # the domain list relies on one sequence per document
        raise RuntimeError(
            f"{data_prefix} has {len(dataset)} sequences for {len(documents)} documents"
        )
    num_tokens = int(dataset.sequence_lengths.sum())
    del dataset  # release the memory map before the directory may be renamed

    manifest = dict(
        params,
        vocab_size_actual=tokenizer.vocab_size,
        eod_token=GPT2_EOD_TOKEN,
        eod_id=tokenizer.eod,
        num_documents=len(documents),
        num_tokens=num_tokens,
        domains={
            domain: {
                "documents": sum(1 for _, d in documents if d == domain),
                "chars": sum(len(text) for text, d in documents if d == domain),
            }
            for domain in DOMAINS
        },
        files={path.name: path.stat().st_size for path in sorted(out.iterdir()) if path.is_file()},
        build_seconds=round(time.monotonic() - started, 1),
    )
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return _corpus_at(out, num_tokens)


def ensure_demo_corpus(cache_dir=None, *, on_build=None, **build_kwargs) -> DemoCorpus:
    """Return the demo corpus in ``cache_dir``, building it first if needed.

    A cache counts only when its ``MANIFEST.json`` exists and records the same parameters
    (``build_kwargs`` of ``build_demo_corpus``, the Python version and the corpus format).
    Otherwise the corpus is built in a temporary sibling directory and renamed into place, so
    an interrupted build never leaves a half-built cache.

    Args:
        cache_dir: defaults to ``default_cache_dir()``.
        on_build: called (no arguments) before a build, not when the cache is used.
        **build_kwargs: ``vocab_size``, ``max_chars_per_domain``, ``seed``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    params = _build_parameters(**build_kwargs)
    cached = _read_matching_manifest(cache, params)
    if cached is not None:
        return _corpus_at(cache, cached["num_tokens"])

    if on_build is not None:
        on_build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.building-", dir=cache.parent))
    stale = None
    try:
        build_demo_corpus(staging, **build_kwargs)
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would make a shared cache private
        cached = _read_matching_manifest(cache, params)
        if cached is not None:  # another process finished the same build meanwhile
            return _corpus_at(cache, cached["num_tokens"])
        if cache.exists():
            # A directory cannot be renamed over a non-empty one: move the stale cache aside.
            stale = Path(tempfile.mkdtemp(prefix=f".{cache.name}.stale-", dir=cache.parent))
            os.rename(cache, stale / cache.name)
        try:
            os.rename(staging, cache)
        except OSError:
            # Another process finished the same build first; use its copy if it matches.
            cached = _read_matching_manifest(cache, params)
            if cached is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return _corpus_at(cache, _read_matching_manifest(cache, params)["num_tokens"])


def collect_documents(max_chars_per_domain: int, seed: int) -> list:
    """Return ``[(text, domain), ...]`` for all domains, interleaved in a seeded order.

    Interleaving matters: Megatron's ``--split`` cuts the document sequence into contiguous
    train/valid/test ranges, and each range should see every domain.
    """
    source_files = stdlib_source_files(seed)
    texts_by_domain = {
        "code": _code_texts(source_files),
        "docs": _docstring_texts(source_files),
        "prose": _prose_texts(),
    }
    documents = [
        (text, domain)
        for domain in DOMAINS
        for text in _within_budget(texts_by_domain[domain], max_chars_per_domain)
    ]
    empty = [domain for domain in DOMAINS if all(d != domain for _, d in documents)]
    if empty:
        raise ValueError(
            f"max_chars_per_domain={max_chars_per_domain} is too small: no documents for "
            f"{', '.join(empty)}"
        )
    random.Random(seed).shuffle(documents)
    return documents


def stdlib_source_files(seed: int) -> list:
    """Standard-library ``.py`` files, minus tests and generated tables, in a seeded order.

    Sorted first, so the order depends only on the seed; then shuffled, so that a budget
    smaller than the library samples all of it rather than the packages starting with 'a'.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(stdlib):
        subdirectories[:] = [
            name
            for name in subdirectories
            if name not in _SKIPPED_STDLIB_DIRS and not name.startswith("config-")
        ]
        for name in names:
            path = Path(directory) / name
            if name.endswith(".py") and path.stat().st_size <= _MAX_SOURCE_FILE_BYTES:
                files.append(path)
    files.sort()
    random.Random(seed).shuffle(files)
    return files


def _code_texts(files: Iterable[Path]):
    for path in files:
        text = _read_text(path)
        if text and text.strip():
            yield text


def _docstring_texts(files: Iterable[Path]):
    """One document per file: its docstrings, cleaned of indentation, blank-line separated."""
    for path in files:
        text = _read_text(path)
        if not text:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old modules' strings
                tree = ast.parse(text, filename=str(path))
        except (SyntaxError, ValueError):
            continue
        docstrings = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=True)
                if docstring and docstring.strip():
                    docstrings.append(docstring.strip())
        if docstrings:
            yield "\n\n".join(docstrings)


def _prose_texts():
    """The pydoc topic texts in key order, cut at paragraph breaks into bounded documents."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield from _split_paragraphs(topics[key].strip(), _MAX_PROSE_DOCUMENT_CHARS)


def _split_paragraphs(text: str, max_chars: int):
    chunk = ""
    for paragraph in text.split("\n\n"):
        if chunk and len(chunk) + 2 + len(paragraph) > max_chars:
            yield chunk
            chunk = paragraph
        else:
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
    if chunk.strip():
        yield chunk


def _within_budget(texts: Iterable[str], max_chars: int):
    """Take texts until ``max_chars``; the one that overflows is cut at a line break."""
    remaining = max_chars
    for text in texts:
        if len(text) <= remaining:
            yield text
            remaining -= len(text)
            continue
        cut = text.rfind("\n", 0, remaining)
        if cut >= _MIN_DOCUMENT_CHARS:
            yield text[:cut]
        return


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    # GPT-2's setup: byte level (every string encodes), no prefix space, <|endoftext|> as EOD.
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[GPT2_EOD_TOKEN],
        show_progress=False,
    )
    tokenizer.save_model(str(out))  # vocab.json + merges.txt, GPT-2's file format
    tokenizer.save(str(out / TOKENIZER_JSON))


def _build_parameters(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Everything the corpus depends on: a cache with other values is rebuilt."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOD), got {vocab_size}")
    if max_chars_per_domain < 1:
        raise ValueError(f"max_chars_per_domain must be positive, got {max_chars_per_domain}")
    return {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "max_chars_per_domain": max_chars_per_domain,
        "seed": seed,
        "python": platform.python_version(),
    }


def _read_matching_manifest(root: Path, params: dict) -> Optional[dict]:
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(key) != value for key, value in params.items()):
        return None
    return manifest


def _corpus_at(root: Path, num_tokens: int) -> DemoCorpus:
    root = Path(root).resolve()
    return DemoCorpus(
        root=str(root),
        data_prefix=str(root / f"{OUTPUT_PREFIX}_text_document"),
        vocab_file=str(root / VOCAB_FILE),
        merge_file=str(root / MERGE_FILE),
        tokenizer_json=str(root / TOKENIZER_JSON),
        domains_file=str(root / DOMAINS_FILE),
        corpus_jsonl=str(root / CORPUS_FILE),
        num_tokens=num_tokens,
    )
