"""domains: reading a domain list, and the domain of every label of megatron's GPT samples.

The indexed dataset is written here so that every token names its document (document ``i``
holds ``1000 + 100 i + j``), with documents of many lengths (short ones that a sample crosses
several of, long ones that span samples) and one document stored as several sequences (as
``--split-sentences`` writes it). A label's domain is then read off its token and compared with
``TokenDomains``, which follows megatron's sample index instead.
"""

from __future__ import annotations

import json
import types

import numpy
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from remoe_patches.data.gpt_datasets import build_splits, evaluation_batches
from remoe_patches.data.domains import DomainsError, TokenDomains, evaluation_domains, read_domains

TOKENIZER = types.SimpleNamespace(vocab_size=4000, eod=0, unique_identifiers={"class": "domains"})
LENGTHS = [3, 17, 2, 9, 30, 1, 5, 12, 4, 8, 21, 6, 2, 14, 7, 3, 11, 5, 26, 2]
DOMAINS = ["code", "prose", "docs", "code", "docs"] * 4


def document_tokens(i):
    return [1000 + 100 * i + j for j in range(LENGTHS[i])]


def document_of(token):
    return (token - 1000) // 100


@pytest.fixture
def prefix(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=numpy.uint16)
    for i in range(len(LENGTHS)):
        tokens = document_tokens(i)
        # document 4 as three sequences, the others as one
        lengths = [10, 10, 10] if i == 4 else [len(tokens)]
        builder.add_document(torch.tensor(tokens), lengths)
    builder.finalize(str(tmp_path / "d.idx"))
    return str(tmp_path / "d")


def splits(prefix, num_samples=(20, None, None), seq_length=7):
    return build_splits(
        data_path=[prefix],
        split="50,30,20",
        seq_length=seq_length,
        tokenizer=TOKENIZER,
        num_samples=num_samples,
        seed=5,
    )


@pytest.mark.parametrize("seq_length", [7, 16])
def test_every_label_gets_the_domain_of_the_document_it_was_read_from(prefix, seq_length):
    built = splits(prefix, seq_length=seq_length)
    for dataset in (built.train, built.valid, built.test):
        domains = TokenDomains.for_dataset(DOMAINS, dataset)
        assert domains.names == ["code", "docs", "prose"]
        for index in range(len(dataset)):
            sample = dataset[index]
            got_S = domains.of_sample(dataset, index)
            for label, scored, got in zip(
                sample["labels"].tolist(), sample["loss_mask"].tolist(), got_S
            ):
                if scored:
                    assert domains.names[got] == DOMAINS[document_of(label)]
                else:  # padding (megatron pads a split's last sample only when asked to)
                    assert got == -1


def test_a_sample_crossing_several_documents_changes_domain_where_the_document_does(prefix):
    dataset = splits(prefix, seq_length=16).train
    domains = TokenDomains.for_dataset(DOMAINS, dataset)
    crossings = 0
    for index in range(len(dataset)):
        labels = dataset[index]["labels"].tolist()
        documents = [document_of(t) for t in labels]
        got = domains.of_sample(dataset, index)
        for a in range(len(labels) - 1):
            if DOMAINS[documents[a]] != DOMAINS[documents[a + 1]]:
                crossings += 1
                assert got[a] != got[a + 1]
    assert crossings > 0


def test_one_hot_marks_one_domain_per_position_and_none_for_padding():
    domains = TokenDomains(["a", "b", "a"], numpy.array([0, 1, 2, 3]))
    onehot_BSD = domains.one_hot(numpy.array([[0, 1, -1]]))
    assert onehot_BSD.tolist() == [[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]


def test_evaluation_batches_carry_the_domains_of_their_labels(prefix):
    valid = splits(prefix).valid
    domains = TokenDomains.for_dataset(DOMAINS, valid)
    batches = list(
        evaluation_batches(
            valid,
            num_samples=len(valid),
            global_batch_size=2,
            micro_batch_size=2,
            data_parallel_rank=0,
            data_parallel_size=1,
            token_domains=domains,
        )
    )
    for batch in batches:
        domain_BS = batch["domains_BSD"].argmax(-1)
        for labels, row in zip(batch["labels_BS"].tolist(), domain_BS.tolist()):
            assert [domains.names[d] for d in row] == [DOMAINS[document_of(t)] for t in labels]


def test_a_domain_list_of_another_length_is_refused_naming_both_counts(prefix):
    dataset = splits(prefix).valid
    with pytest.raises(DomainsError, match="names 19 documents, but the dataset holds 20"):
        TokenDomains.for_dataset(DOMAINS[:-1], dataset)


def test_read_domains_from_a_json_list_or_a_jsonl_key(tmp_path):
    listed = tmp_path / "domains.json"
    listed.write_text(json.dumps(["a", "b"]))
    assert read_domains(listed) == ["a", "b"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"text": "x", "meta": {"pile_set_name": "ArXiv"}}\n\n'
        '{"text": "y", "meta": {"pile_set_name": "Github"}}\n'
    )
    assert read_domains(corpus, "meta.pile_set_name") == ["ArXiv", "Github"]
    with pytest.raises(DomainsError, match="line 1: no domain .*--eval-domain-key"):
        read_domains(corpus)
    with pytest.raises(DomainsError, match="no domain list at .*missing.json"):
        read_domains(tmp_path / "missing.json")


def test_a_one_prefix_blend_is_followed_to_its_samples(prefix):
    """``--data-path 1.0 PREFIX`` (Megatron-LM's usual form) builds megatron BlendedDatasets."""
    built = build_splits(
        data_path=["1.0", prefix],
        split="50,30,20",
        seq_length=7,
        tokenizer=TOKENIZER,
        num_samples=(20, 6, 6),
        seed=5,
    )
    assert hasattr(built.valid, "dataset_index")  # a BlendedDataset
    domains = TokenDomains.for_dataset(DOMAINS, built.valid)
    for index in range(len(built.valid)):
        labels = built.valid[index]["labels"].tolist()
        assert [domains.names[d] for d in domains.of_sample(built.valid, index)] == [
            DOMAINS[document_of(t)] for t in labels
        ]


def test_evaluation_domains_need_each_split_from_the_one_prefix_of_the_list(prefix, tmp_path):
    listed = tmp_path / "domains.json"
    listed.write_text(json.dumps(DOMAINS))
    built = splits(prefix)
    assert evaluation_domains(None, val=built.valid) == {}
    assert list(evaluation_domains(str(listed), val=built.valid, test=None)) == ["val"]
    other = types.SimpleNamespace(
        document_index=None, dataset=types.SimpleNamespace(path_prefix="/data/other")
    )
    two_prefixes = types.SimpleNamespace(datasets=[built.valid, other])
    with pytest.raises(DomainsError, match="from one dataset prefix.*blends 2"):
        evaluation_domains(str(listed), val=two_prefixes)
    with pytest.raises(DomainsError, match="not a SimpleNamespace"):
        evaluation_domains(str(listed), val=types.SimpleNamespace())
