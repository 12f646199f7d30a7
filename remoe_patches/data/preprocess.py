"""Tokenize a jsonl corpus into megatron-core indexed datasets (``.bin`` + ``.idx``).

The output is what Megatron-LM's ``tools/preprocess_data.py`` writes without
``--split-sentences``: for each json key, ``<prefix>_<key>_document.bin/.idx``, one sequence
and one document per jsonl line, tokens stored as uint16 when the vocabulary is below 65500
ids and int32 otherwise. Megatron-LM and megatron-core's ``GPTDataset`` read it as is.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
import warnings
from contextlib import closing
from typing import Iterator, Optional, Sequence

# Documents handed to the pool per round: bounds memory (Pool.imap would otherwise queue the
# whole file at once) while keeping every worker busy.
_DOCUMENTS_PER_ROUND = 4096
_IMAP_CHUNKSIZE = 32


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """Return Megatron-LM's dataset prefix for one json key: ``<prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


def import_indexed_dataset():
    """Import ``megatron.core.datasets.indexed_dataset`` without its import-time noise.

    Importing megatron.core pulls in most of the package, which warns that Transformer Engine
    and Apex are missing (expected on CPU) and about its own deprecated imports; none of it
    concerns the data files, so warnings are silenced for the duration of the import only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    tokenizer,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: Optional[int] = None,
) -> dict:
    """Tokenize ``input_path`` (one json object per line) into indexed datasets.

    Args:
        input_path: the jsonl file; blank lines are skipped.
        output_prefix: outputs are ``<output_prefix>_<key>_document.bin/.idx``; missing
            parent directories are created.
        tokenizer: an object with ``tokenize(text) -> list[int]``, ``vocab_size`` and ``eod``
            (see ``remoe_patches.data.tokenizer.build_tokenizer``); it must pickle when workers > 1.
        json_keys: the keys to tokenize, each into its own dataset.
        append_eod: append ``tokenizer.eod`` to every document.
        workers: tokenizer processes; document order is kept whatever the count.
        log_interval: report progress every this many documents on stderr (a tqdm bar instead
            when tqdm is importable and stderr is a terminal); None is silent.

    Returns:
        ``{key: dataset prefix}`` for each key, the prefix without ``.bin``/``.idx``.

    Raises:
        ValueError: missing input, a malformed line (naming the file, the 1-based line number
            and the problem), or no tokens at all. Nothing is left at the output paths then:
            outputs are written under temporary names and renamed only once all are complete.
    """
    json_keys = tuple(json_keys)
    if not json_keys:
        raise ValueError("--json-keys needs at least one key")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not os.path.isfile(input_path):
        raise ValueError(f"input file {input_path} does not exist")

    indexed_dataset = import_indexed_dataset()
    dtype = indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size)

    output_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(output_dir, exist_ok=True)
    final_prefixes = {key: output_prefix_for_key(output_prefix, key) for key in json_keys}
    # Same directory as the outputs, so the final rename is atomic and never crosses devices.
    temp_suffix = f".tmp-{os.getpid()}"
    temp_paths = {
        key: (prefix + ".bin" + temp_suffix, prefix + ".idx" + temp_suffix)
        for key, prefix in final_prefixes.items()
    }

    builders = {}
    try:
        for key, (temp_bin, _) in temp_paths.items():
            builders[key] = indexed_dataset.IndexedDatasetBuilder(temp_bin, dtype=dtype)
        document_count, tokens_per_key = _write_documents(
            input_path, tokenizer, json_keys, append_eod, workers, builders, log_interval
        )
        if document_count == 0:
            raise ValueError(f"{input_path} holds no documents")
        for key, token_count in tokens_per_key.items():
            if token_count == 0:
                # An empty .bin cannot be memory-mapped, so Megatron could not read it.
                raise ValueError(
                    f"{input_path}: key {key!r} of its {document_count} documents has no tokens"
                )
        for key, (_, temp_idx) in temp_paths.items():
            builders[key].finalize(temp_idx)
        for key, prefix in final_prefixes.items():
            temp_bin, temp_idx = temp_paths[key]
            # The .idx goes last and an older one first: a crash in between leaves a .bin
            # without .idx (which readers reject), never a new .bin under an old .idx.
            if os.path.exists(prefix + ".idx"):
                os.remove(prefix + ".idx")
            os.replace(temp_bin, prefix + ".bin")
            os.replace(temp_idx, prefix + ".idx")
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()  # the builder has no abort(); close its open .bin
        for paths in temp_paths.values():
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)
        raise
    return final_prefixes


def _write_documents(input_path, tokenizer, json_keys, append_eod, workers, builders, log_interval):
    """Tokenize every document in file order into ``builders``.

    Returns ``(document count, {key: token count})``.
    """
    document_count = 0
    tokens_per_key = dict.fromkeys(json_keys, 0)
    progress = _Progress(input_path, log_interval)
    with open(input_path, "rb") as lines, closing(progress):
        numbered_lines = (
            (line_number, raw) for line_number, raw in enumerate(lines, start=1) if raw.strip()
        )
        # closing(): on a bad line, stop the worker pool now rather than at garbage collection.
        results = _encode_all(numbered_lines, tokenizer, json_keys, append_eod, workers)
        with closing(results):
            for line_number, tokens_by_key, problem, size in results:
                if problem is not None:
                    raise ValueError(f"{input_path}, line {line_number}: {problem}")
                for key in json_keys:
                    tokens = tokens_by_key[key]
                    # add_document == add_item + end_document: one sequence, one document; unlike
                    # add_item it takes a plain list (add_item wants a torch.Tensor).
                    builders[key].add_document(tokens, [len(tokens)])
                    tokens_per_key[key] += len(tokens)
                document_count += 1
                progress.update(document_count, size)
    progress.report_done(document_count, sum(tokens_per_key.values()))
    return document_count, tokens_per_key


def _encode_all(numbered_lines, tokenizer, json_keys, append_eod, workers) -> Iterator[tuple]:
    """Yield ``(line_number, {key: tokens}, problem, bytes)`` per line, in file order."""
    if workers == 1:
        for item in numbered_lines:
            yield _encode_line(item, tokenizer, json_keys, append_eod)
        return
    # Spawned, not forked: the caller may hold threads (torch's, tokenizers' thread pool, a test
    # runner's) whose locks a forked child would inherit held, and a deadlocked worker leaves
    # Pool.imap waiting forever.
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(
        workers, initializer=_init_worker, initargs=(tokenizer, json_keys, append_eod)
    )
    with pool:  # leaving early (an error) terminates the workers
        while True:
            batch = list(itertools.islice(numbered_lines, _DOCUMENTS_PER_ROUND))
            if not batch:
                break
            yield from pool.imap(_encode_line_in_worker, batch, chunksize=_IMAP_CHUNKSIZE)


_worker_state: tuple = ()


def _init_worker(tokenizer, json_keys, append_eod) -> None:
    global _worker_state
    _worker_state = (tokenizer, json_keys, append_eod)


def _encode_line_in_worker(item):
    return _encode_line(item, *_worker_state)


def _encode_line(item, tokenizer, json_keys, append_eod) -> tuple:
    """Return ``(line_number, {key: tokens}, problem, bytes)``; ``problem`` is None when valid.

    A problem is returned rather than raised so that it crosses the process boundary as a plain
    string and the parent reports the first bad line in file order.
    """
    line_number, raw = item
    texts, problem = _texts_of_line(raw, json_keys)
    if problem is not None:
        return line_number, None, problem, len(raw)
    tokens_by_key = {}
    for key, text in texts.items():
        tokens = list(tokenizer.tokenize(text))
        if append_eod:
            tokens.append(tokenizer.eod)
        tokens_by_key[key] = tokens
    return line_number, tokens_by_key, None, len(raw)


def _texts_of_line(raw: bytes, json_keys) -> tuple:
    """Return ``({key: text}, None)`` for a valid jsonl line, else ``(None, problem)``."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return None, f"not valid UTF-8 ({error.reason} at byte {error.start})"
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg}, column {error.colno})"
    if not isinstance(document, dict):
        return None, f"not a JSON object (got {type(document).__name__})"
    texts = {}
    for key in json_keys:
        if key not in document:
            return None, f"missing key {key!r}"
        if not isinstance(document[key], str):
            return None, f"key {key!r} is not a string (got {type(document[key]).__name__})"
        texts[key] = document[key]
    return texts, None


class _Progress:
    """A tqdm bar over input bytes on a terminal, else a stderr line every log_interval docs."""

    def __init__(self, input_path: str, log_interval: Optional[int]) -> None:
        self.log_interval = log_interval
        self.start = time.monotonic()
        self.bytes_done = 0
        self.bar = None
        if log_interval is None:
            return
        try:
            import tqdm
        except ImportError:
            return
        if sys.stderr.isatty():
            self.bar = tqdm.tqdm(
                total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="tokenizing"
            )

    def update(self, documents: int, size: int) -> None:
        self.bytes_done += size
        if self.bar is not None:
            self.bar.update(size)
        elif self.log_interval and documents % self.log_interval == 0:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            print(
                f"processed {documents} documents ({documents / elapsed:.0f} docs/s, "
                f"{self.bytes_done / elapsed / 2**20:.2f} MB/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def report_done(self, documents: int, tokens: int) -> None:
        self.close()
        if self.log_interval is not None:
            elapsed = time.monotonic() - self.start
            print(
                f"tokenized {documents} documents, {tokens} tokens in {elapsed:.1f} s",
                file=sys.stderr,
                flush=True,
            )
