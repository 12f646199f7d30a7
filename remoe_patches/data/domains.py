"""Which domain each document, and each scored token, comes from.

Shape suffixes: S = positions of a sample, D = domains.

A domain list names one domain per document of a Megatron indexed dataset, in document order:
the demo corpus's ``domains.json``, or a jsonl corpus with the domain at a key (The Pile's
``meta.pile_set_name``). ``TokenDomains`` follows megatron's GPT dataset from a sample to the
documents it concatenates, so that every label position gets its document's domain; the
validation loss per domain is the token mean over the positions of each domain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DEFAULT_KEY = "domain"


class DomainsError(ValueError):
    """A domain list that does not fit the data; the message says what and how to fix it."""


def read_domains(path, key: Optional[str] = None) -> list:
    """One domain name per document, in document order.

    ``path``: a JSON list (the demo corpus's ``domains.json``), or the jsonl corpus itself with
    the domain at ``key`` (dotted for nested keys, e.g. ``meta.pile_set_name`` for The Pile;
    default ``domain``).
    """
    path = Path(path)
    if not path.is_file():
        raise DomainsError(
            f"no domain list at {path}: give a JSON list of domain names, one "
            "per document, or the jsonl corpus the data was built from"
        )
    if path.suffix == ".json":
        domains = json.loads(path.read_text())
        if not isinstance(domains, list):
            raise DomainsError(f"{path} must hold a JSON list of domain names")
        return [str(d) for d in domains]
    parts = (key or DEFAULT_KEY).split(".")
    domains = []
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            value = json.loads(line)
            for part in parts:
                if not isinstance(value, dict) or part not in value:
                    raise DomainsError(
                        f"{path}, line {number}: no {'.'.join(parts)} (choose "
                        "the key with --eval-domain-key)"
                    )
                value = value[part]
            domains.append(str(value))
    return domains


class TokenDomains:
    """The domain of every label position of a megatron ``GPTDataset``'s samples.

    ``names``: the domains, sorted; a position's domain is its index in ``names``, -1 for the
    padding after the data ends.
    """

    def __init__(
        self,
        domain_per_document: Sequence[str],
        document_indices: np.ndarray,
        source: str = "the domain list",
    ):
        num_documents = len(document_indices) - 1
        if len(domain_per_document) != num_documents:
            raise DomainsError(
                f"{source} names {len(domain_per_document)} documents, but the dataset holds "
                f"{num_documents}: give the domain list of the documents the dataset was "
                "built from, in their order"
            )
        self.names = sorted(set(domain_per_document))
        index = {name: i for i, name in enumerate(self.names)}
        domain_of_document = np.array([index[d] for d in domain_per_document], dtype=np.int64)
        # megatron's GPT dataset counts sequences (a document may hold several: --split-sentences)
        sequences_per_document = np.diff(np.asarray(document_indices))
        self._domain_of_sequence = np.repeat(domain_of_document, sequences_per_document)

    @classmethod
    def for_dataset(
        cls, domain_per_document: Sequence[str], dataset, source: str = "the domain list"
    ) -> "TokenDomains":
        """For a megatron ``GPTDataset``, or a ``BlendedDataset`` of one prefix (``--data-path
        1.0 PREFIX``): the documents of its indexed dataset."""
        prefixes = {part.dataset.path_prefix for part in gpt_datasets(dataset)}
        if len(prefixes) != 1:
            raise DomainsError(
                f"--eval-domains needs the data from one dataset prefix, the one its list "
                f"describes; this split blends {len(prefixes)}: {', '.join(sorted(prefixes))}"
            )
        return cls(domain_per_document, gpt_datasets(dataset)[0].dataset.document_indices, source)

    def of_sample(self, dataset, index: int) -> np.ndarray:
        """``domain_S``: the domain of each label of ``dataset[index]`` (a ``GPTDataset`` or a
        ``BlendedDataset`` of them)."""
        while hasattr(dataset, "dataset_sample_index"):  # a blend: the sample it reads
            dataset[index]  # loads the blend's index arrays (memory-mapped)
            dataset, index = (
                dataset.datasets[dataset.dataset_index[index]],
                int(dataset.dataset_sample_index[index]),
            )
        sequence_S = sample_sequences(dataset, index)
        domain_S = np.where(
            sequence_S >= 0, self._domain_of_sequence[np.maximum(sequence_S, 0)], -1
        )
        return domain_S

    def one_hot(self, domain_BS: np.ndarray) -> np.ndarray:
        """``domains_BSD``: 1.0 where a position belongs to a domain (padding: none)."""
        eye = np.eye(len(self.names), dtype=np.float32)
        return np.where(domain_BS[..., None] >= 0, eye[np.maximum(domain_BS, 0)], 0.0)


def gpt_datasets(dataset) -> list:
    """The GPT datasets a (possibly blended) split reads from."""
    if hasattr(dataset, "datasets"):
        return [part for inner in dataset.datasets for part in gpt_datasets(inner)]
    if not hasattr(dataset, "document_index"):  # mock data
        raise DomainsError(
            f"--eval-domains needs data read from a dataset prefix, not a {type(dataset).__name__}"
        )
    return [dataset]


def sample_sequences(dataset, index: int) -> np.ndarray:
    """``sequence_S``: the indexed-dataset sequence each label of ``dataset[index]`` was read
    from (-1 for padding), following ``GPTDataset._query_document_sample_shuffle_indices``."""
    dataset._query_document_sample_shuffle_indices(0)  # loads its index arrays (memory-mapped)
    config = dataset.config
    extra = int(config.add_extra_token_to_sequence)
    sample = dataset.shuffle_index[index]
    first, first_offset = (int(v) for v in dataset.sample_index[sample])
    last, last_offset = (int(v) for v in dataset.sample_index[sample + 1])
    lengths = dataset.dataset.sequence_lengths
    owners = []
    for position in range(first, last + 1):
        sequence = int(dataset.document_index[position])
        begin = first_offset if position == first else 0
        end = last_offset + extra if position == last else int(lengths[sequence])
        owners.append(np.full(end - begin, sequence, dtype=np.int64))
    text = np.concatenate(owners)
    wanted = config.sequence_length + extra
    text = np.concatenate([text, np.full(wanted - len(text), -1, dtype=np.int64)])
    # labels are the text shifted by one (megatron's add_extra_token_to_sequence)
    return text[1:] if extra else np.concatenate([text[1:], [-1]])


def evaluation_domains(path, key: Optional[str] = None, **splits) -> dict:
    """``TokenDomains`` for each named split (``val=..., test=...``; None: skipped) from the
    domain list at ``path`` (``--eval-domains``); {} without one."""
    if not path:
        return {}
    domain_per_document = read_domains(path, key)
    out = {}
    for name, dataset in splits.items():
        if dataset is not None:
            out[name] = TokenDomains.for_dataset(domain_per_document, dataset, source=str(path))
    return out
