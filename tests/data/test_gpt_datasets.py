"""data: split sanity, megatron's GPT datasets as configured here, and the resumable batch order.

The datasets are built from indexed files written here with known documents (document ``i`` is
``100+10i, ..., 106+10i, EOD``), so every sample can be traced back to the documents of its
split. The batch order is checked against the rule of the module's docstring: step ``i`` takes
global samples ``[i*G, (i+1)*G)`` in chunks of ``micro_batch * DP``, rank ``r`` the ``r``-th slice.
"""

from __future__ import annotations

import json
import os
import types

import numpy
import pytest
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

from remoe_patches.data.gpt_datasets import (
    EVAL_SEED,
    MAX_TOKEN_ID_SUFFIX,
    build_splits,
    check_data_paths,
    check_token_ids,
    collate,
    drop_empty_splits,
    evaluation_batches,
    largest_token_id,
    micro_batches,
    to_device,
)

EOD = 0
TOKENIZER = types.SimpleNamespace(
    vocab_size=1000, eod=EOD, unique_identifiers={"class": "test_data"}
)


def document(i):
    return [100 + 10 * i + j for j in range(7)] + [EOD]


def write_dataset(prefix, documents):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for doc in documents:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def ten_documents(tmp_path):
    return write_dataset(tmp_path / "ten", [document(i) for i in range(10)])


# --- drop_empty_splits ------------------------------------------------------------------------


def test_splits_too_small_for_the_corpus_are_dropped(ten_documents):
    """969,30,1-style splits on 10 documents: validation [9.8, 9.9) and test [9.9, 10) round to
    no document; a split that gets one keeps its weight."""
    assert drop_empty_splits([ten_documents], "98,1,1") == ("0.98,0,0", ["validation", "test"])
    assert drop_empty_splits([ten_documents], "8,1,1") == ("0.8,0.1,0.1", [])
    assert drop_empty_splits([ten_documents], "1,0,0") == ("1,0,0", [])  # already zero: kept


def test_a_split_is_dropped_when_any_dataset_of_the_blend_gives_it_nothing(tmp_path):
    """Blend of 10 and 100 documents at 90,5,5: the small one's test share [9.5, 10) rounds to
    [10, 10), empty; its validation share [9, 10) has one document."""
    small = write_dataset(tmp_path / "small", [document(i) for i in range(10)])
    large = write_dataset(tmp_path / "large", [document(i % 50) for i in range(100)])
    assert drop_empty_splits(["1.0", small, "3.0", large], "90,5,5") == ("0.9,0.05,0", ["test"])
    assert drop_empty_splits([large], "90,5,5") == ("0.9,0.05,0.05", [])


def test_a_training_split_without_documents_is_an_error(tmp_path):
    two = write_dataset(tmp_path / "two", [document(0), document(1)])
    with pytest.raises(ValueError, match=r"--split 1,98,1 leaves the training split without"):
        drop_empty_splits([two], "1,98,1")


def test_dropped_splits_build_as_none_and_kept_ones_from_their_documents(ten_documents):
    """With the returned split megatron builds no dataset for a dropped split (the original one
    would loop forever looking for tokens)."""
    split, _ = drop_empty_splits([ten_documents], "98,1,1")
    splits = build_splits(
        data_path=[ten_documents],
        split=split,
        seq_length=6,
        tokenizer=TOKENIZER,
        num_samples=(4, 2, 2),
        seed=1,
    )
    assert splits.valid is None and splits.test is None
    assert len(splits.train) >= 4


# --- check_data_paths ---------------------------------------------------------------------------


def test_data_paths_are_checked_prefix_by_prefix(tmp_path, ten_documents):
    check_data_paths([ten_documents])  # both files present
    check_data_paths(["0.3", ten_documents, "0.7", ten_documents])
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=rf"^--data-path: {missing}\.bin does not exist"):
        check_data_paths(["0.5", ten_documents, "0.5", missing])
    (tmp_path / "half.bin").write_bytes(b"")  # .bin present, .idx missing
    with pytest.raises(ValueError, match=r"half\.idx does not exist"):
        check_data_paths([str(tmp_path / "half")])


def test_an_empty_data_path_is_named():
    """``--data-path`` given without prefixes: the one-line error says so."""
    with pytest.raises(ValueError, match="--data-path is empty"):
        check_data_paths([])


# --- build_splits -------------------------------------------------------------------------------


def tokens_of(documents):
    return {t for i in documents for t in document(i)}


def sample_stream(sample):
    """The sample's ``seq_length + 1`` consecutive tokens: tokens, then the last label."""
    return sample["tokens"].tolist() + [int(sample["labels"][-1])]


def assert_contiguous(stream):
    """Consecutive tokens of the document stream: within a document, or EOD then a new one."""
    for a, b in zip(stream, stream[1:]):
        if a == EOD:
            assert b % 10 == 0 and b >= 100, stream  # a document's first token
        elif a % 10 == 6:
            assert b == EOD, stream  # a document's last token
        else:
            assert b == a + 1, stream


def test_samples_are_next_token_windows_of_their_splits_documents(ten_documents):
    """8,1,1 of 10 documents: train draws on documents 0-7, validation on 8, test on 9; labels
    are the tokens shifted by one; the loss covers every position (EOD included) and positions
    run 0..S-1 across document boundaries (no resets, as configured)."""
    seq_length = 6
    splits = build_splits(
        data_path=[ten_documents],
        split="8,1,1",
        seq_length=seq_length,
        tokenizer=TOKENIZER,
        num_samples=(12, 3, 2),
        seed=3,
    )
    expected_documents = {"train": range(8), "valid": [8], "test": [9]}
    crossed_eod = False
    for name, requested in (("train", 12), ("valid", 3), ("test", 2)):
        dataset = getattr(splits, name)
        assert len(dataset) >= requested
        allowed = tokens_of(expected_documents[name])
        for index in range(len(dataset)):
            sample = dataset[index]
            stream = sample_stream(sample)
            assert set(stream) <= allowed, (name, stream)
            assert_contiguous(stream)
            assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
            assert torch.equal(sample["loss_mask"], torch.ones(seq_length))
            assert torch.equal(sample["position_ids"], torch.arange(seq_length))
            crossed_eod |= EOD in sample["tokens"].tolist()
    assert crossed_eod  # the checks above did see document boundaries


def test_one_blend_per_split(tmp_path):
    """Without --data-path each split reads its own blend; a split without one is None."""
    train = write_dataset(tmp_path / "train", [document(i) for i in range(6)])
    valid = write_dataset(tmp_path / "valid", [document(i) for i in range(20, 23)])
    splits = build_splits(
        data_path=None,
        split="969,30,1",
        per_split_paths=([train], ["1.0", valid], None),
        seq_length=5,
        tokenizer=TOKENIZER,
        num_samples=(5, 2, 0),
        seed=1,
    )
    assert splits.test is None
    for dataset, documents in ((splits.train, range(6)), (splits.valid, range(20, 23))):
        seen = set()
        for index in range(len(dataset)):
            stream = sample_stream(dataset[index])
            assert set(stream) <= tokens_of(documents)
            seen |= set(stream)
        assert len(seen) > 5  # not a degenerate dataset


def test_mock_data_needs_no_files():
    splits = build_splits(
        data_path=None,
        split="98,1,1",
        seq_length=8,
        tokenizer=TOKENIZER,
        num_samples=(4, 2, 2),
        seed=1,
        mock=True,
    )
    for dataset in (splits.train, splits.valid, splits.test):
        sample = dataset[0]
        assert sample["tokens"].shape == (8,)
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])


# --- micro_batches, collate, to_device --------------------------------------------------------


class NumberedSamples:
    """Sample ``i`` is ``i`` at every position, as megatron's datasets return it (numpy)."""

    def __init__(self, size, seq_length=3):
        self.size, self.seq_length = size, seq_length

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        assert 0 <= index < self.size
        row = numpy.full(self.seq_length, index, dtype=numpy.int32)
        return dict(
            tokens=row,
            labels=row + 1000,
            loss_mask=numpy.ones(self.seq_length),
            position_ids=numpy.arange(self.seq_length),
        )


def ids(batch):
    """The sample numbers of a micro-batch, and a check that its rows are whole samples."""
    tokens = batch["tokens_BS"]
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))
    assert torch.equal(batch["labels_BS"], tokens + 1000)
    return tokens[:, 0].tolist()


def take(iterator, count):
    return [ids(next(iterator)) for _ in range(count)]


def test_each_rank_takes_its_slice_of_each_chunk():
    """consumed 4, micro-batch 2, DP 2: chunks [4..8), [8..12), ...; rank 1 takes the second
    half of each."""
    data = NumberedSamples(100)
    rank0 = micro_batches(
        data, consumed_samples=4, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2
    )
    rank1 = micro_batches(
        data, consumed_samples=4, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2
    )
    assert take(rank0, 3) == [[4, 5], [8, 9], [12, 13]]
    assert take(rank1, 3) == [[6, 7], [10, 11], [14, 15]]


@pytest.mark.parametrize("dp, micro_batch", [(1, 4), (1, 2), (2, 2), (2, 1), (4, 1), (4, 2)])
def test_a_steps_samples_do_not_depend_on_the_data_parallel_size(dp, micro_batch):
    """Global batch 8: step i uses samples [8i, 8i+8) whatever DP and micro-batch size."""
    global_batch, steps = 8, 3
    per_step = global_batch // (micro_batch * dp)
    data = NumberedSamples(1000)
    ranks = [
        micro_batches(
            data,
            consumed_samples=0,
            micro_batch_size=micro_batch,
            data_parallel_rank=r,
            data_parallel_size=dp,
        )
        for r in range(dp)
    ]
    for step in range(steps):
        used = []
        for rank, iterator in enumerate(ranks):
            for j, batch in enumerate(take(iterator, per_step)):
                first = step * global_batch + j * micro_batch * dp + rank * micro_batch
                assert batch == list(range(first, first + micro_batch))
                used += batch
        assert sorted(used) == list(range(step * global_batch, (step + 1) * global_batch))


def test_resuming_with_another_data_parallel_size_continues_with_the_same_samples():
    """Two steps at DP=2, then a resume at DP=1 from consumed_samples=16: step 3 is [16, 24)."""
    data = NumberedSamples(1000)
    resumed = micro_batches(
        data, consumed_samples=16, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1
    )
    assert sum(take(resumed, 2), []) == list(range(16, 24))
    straight = [
        micro_batches(
            data, consumed_samples=0, micro_batch_size=2, data_parallel_rank=r, data_parallel_size=2
        )
        for r in range(2)
    ]
    third_step = [take(it, 6)[4:] for it in straight]  # 2 micro-batches per rank and step
    assert sorted(sum(sum(third_step, []), [])) == list(range(16, 24))


def test_the_order_wraps_past_the_end_of_the_dataset():
    data = NumberedSamples(10)
    iterator = micro_batches(
        data, consumed_samples=8, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1
    )
    assert take(iterator, 3) == [[8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]


def test_collate_stacks_samples_into_the_batch_dict():
    samples = [NumberedSamples(5, seq_length=4)[i] for i in (3, 1)]
    samples[1]["loss_mask"] = numpy.array([1, 0, 1, 0])  # integers from a dataset
    batch = collate(samples)
    assert sorted(batch) == ["labels_BS", "loss_mask_BS", "position_ids_BS", "tokens_BS"]
    assert torch.equal(batch["tokens_BS"], torch.tensor([[3] * 4, [1] * 4]))
    assert torch.equal(batch["labels_BS"], torch.tensor([[1003] * 4, [1001] * 4]))
    assert torch.equal(batch["loss_mask_BS"], torch.tensor([[1.0] * 4, [1.0, 0.0, 1.0, 0.0]]))
    assert torch.equal(batch["position_ids_BS"], torch.arange(4).expand(2, -1))
    dtypes = {key: value.dtype for key, value in batch.items()}
    assert dtypes == dict(
        tokens_BS=torch.long,
        labels_BS=torch.long,
        loss_mask_BS=torch.float,
        position_ids_BS=torch.long,
    )


def test_to_device_moves_every_tensor():
    batch = collate([NumberedSamples(2)[i] for i in range(2)])
    moved = to_device(batch, torch.device("meta"))
    assert sorted(moved) == sorted(batch)
    for key, value in moved.items():
        assert value.device.type == "meta", key
        assert value.shape == batch[key].shape and value.dtype == batch[key].dtype


# --- token ids against the vocabulary (issue 26: IndexError at step 1) ----------------------


def test_largest_token_id_is_computed_once_and_cached_beside_the_data(ten_documents, tmp_path):
    assert largest_token_id(ten_documents) == 196  # document 9: 190..196, EOD
    cache = tmp_path / f"ten{MAX_TOKEN_ID_SUFFIX}"
    record = json.loads(cache.read_text())
    assert record["max_token_id"] == 196
    cache.write_text(json.dumps({**record, "max_token_id": 7}))
    assert largest_token_id(ten_documents) == 7  # read back, not recomputed
    write_dataset(tmp_path / "ten", [document(i) for i in range(12)])  # the data changed
    assert largest_token_id(ten_documents) == 216


def test_the_cache_goes_to_the_data_cache_path_when_the_data_directory_is_read_only(
    ten_documents, tmp_path, monkeypatch
):
    real_open = open

    def read_only_beside_the_data(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).startswith(str(tmp_path / "ten")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_beside_the_data)
    cache_dir = tmp_path / "cache"
    assert largest_token_id(ten_documents, str(cache_dir)) == 196
    assert not (tmp_path / f"ten{MAX_TOKEN_ID_SUFFIX}").exists()
    [cached] = cache_dir.iterdir()
    assert cached.name.endswith(MAX_TOKEN_ID_SUFFIX)


def test_token_ids_beyond_the_padded_vocabulary_are_refused_naming_the_data(ten_documents):
    check_token_ids([("--data-path", [ten_documents])], 197, tokenizer="T")
    with pytest.raises(ValueError) as error:
        check_token_ids(
            [("--data-path", ["1.0", ten_documents])],
            196,
            tokenizer="--tokenizer-type GPT2BPETokenizer (vocab.json, 150 tokens)",
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"--data-path: {ten_documents} holds token id 196, outside this "
        "run's vocabulary (--tokenizer-type GPT2BPETokenizer (vocab.json, "
        "150 tokens), padded to 196)"
    )
    assert "tools/preprocess_data.py" in message


@pytest.mark.integration
def test_data_of_another_tokenizer_is_one_line_at_start_up(tmp_path):
    from training_runs import authors_style_flags, run
    from remoe_patches.data.demo_corpus import build_demo_corpus

    corpus = build_demo_corpus(tmp_path / "corpus", vocab_size=384, max_chars_per_domain=5_000)
    # the same documents as a 50k-token tokenizer would number them
    other = write_dataset(tmp_path / "other", [[50_000 + j for j in range(40)] for _ in range(50)])
    save = tmp_path / "never"
    result = run(authors_style_flags(corpus, save, data_path=f"1.0 {other}"))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [text for text in result.stderr.splitlines() if text.startswith("error: ")]
    assert (
        f"--data-path: {other} holds token id 50039, outside this run's vocabulary "
        "(--tokenizer-type GPT2BPETokenizer" in line
    )
    assert "padded to 512)" in line
    assert not save.exists()


# --- the validation and test splits: an order that does not follow --seed, all of a split ------


def streams(dataset):
    return [sample_stream(dataset[index]) for index in range(len(dataset))]


@pytest.fixture
def thirty_documents(tmp_path):
    """50,25,25 of 30 documents: training 0-14, validation 15-21, test 22-29 (megatron rounds
    22.5 to 22); 8 tokens each."""
    return write_dataset(tmp_path / "thirty", [document(i) for i in range(30)])


def test_validation_and_test_keep_their_order_whatever_the_seed(thirty_documents):
    """Issue 22: the same checkpoint scored on another sample set under each --seed. Now the
    training split's order follows the seed, validation and test do not."""
    built = {
        seed: build_splits(
            data_path=[thirty_documents],
            split="50,25,25",
            seq_length=5,
            tokenizer=TOKENIZER,
            num_samples=(20, 6, 6),
            seed=seed,
        )
        for seed in (1, 2, 3)
    }
    for name in ("valid", "test"):
        assert (
            streams(getattr(built[1], name))
            == streams(getattr(built[2], name))
            == streams(getattr(built[3], name))
        ), name
    assert streams(built[1].train) != streams(built[2].train)


def test_no_number_of_samples_is_the_whole_split_once(thirty_documents, tmp_path):
    """--full-validation: validation is every token of documents 15-21 once, cut into
    (7 x 8 - 1) // 5 = 11 sequences; a weighted blend gives all of each dataset's split."""
    splits = build_splits(
        data_path=[thirty_documents],
        split="50,25,25",
        seq_length=5,
        tokenizer=TOKENIZER,
        num_samples=(20, None, None),
        seed=1,
    )
    assert len(splits.valid) == 11
    tokens = [token for stream in streams(splits.valid) for token in stream[:-1]]
    assert len(tokens) == 55 and set(tokens) == tokens_of(range(15, 22))  # 56 less the last
    other = write_dataset(tmp_path / "other", [document(i) for i in range(40, 70)])
    blend = build_splits(
        data_path=["0.9", thirty_documents, "0.1", other],
        split="50,25,25",
        seq_length=5,
        tokenizer=TOKENIZER,
        num_samples=(20, None, None),
        seed=1,
    )
    assert len(blend.valid) == 22
    assert {token for stream in streams(blend.valid) for token in stream} == tokens_of(
        range(15, 22)
    ) | tokens_of(range(55, 62))


def test_index_caches_of_the_one_seed_builds_are_not_reused(thirty_documents, tmp_path):
    """megatron keys its index caches by the seed and the split matrix. The validation split
    built as before (with the training seed, beside the other splits) leaves its cache; the new
    build, even with that seed, writes its own (its split matrix holds only validation and
    test), and records the fixed seed, whatever the training seed."""
    cache = tmp_path / "cache"

    def shuffle_indices(split):
        return sorted(
            name
            for name in os.listdir(cache)
            if name.endswith(f"-GPTDataset-{split}-shuffle_index.npy")
        )

    old_config = GPTDatasetConfig(
        random_seed=EVAL_SEED,
        sequence_length=5,
        blend=get_blend_from_list([thirty_documents]),
        split="50,25,25",
        path_to_cache=str(cache),
        mmap_bin_files=True,
        tokenizer=TOKENIZER,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    BlendedMegatronDatasetBuilder(GPTDataset, [20, 6, 6], lambda: True, old_config).build()
    old = shuffle_indices("valid")
    assert len(old) == 1
    splits = build_splits(
        data_path=[thirty_documents],
        split="50,25,25",
        seq_length=5,
        tokenizer=TOKENIZER,
        num_samples=(20, 6, 6),
        seed=7,
        cache_path=str(cache),
    )
    assert len(shuffle_indices("valid")) == 2 and old[0] in shuffle_indices("valid")
    valid = splits.valid.datasets[0] if hasattr(splits.valid, "datasets") else splits.valid
    train = splits.train.datasets[0] if hasattr(splits.train, "datasets") else splits.train
    assert valid.unique_identifiers["random_seed"] == EVAL_SEED
    assert valid.unique_identifiers["split_matrix"][0] is None
    assert train.unique_identifiers["random_seed"] == 7
    assert train.unique_identifiers["split_matrix"][1:] == [None, None]


@pytest.mark.parametrize("dp, micro_batch", [(1, 4), (1, 2), (2, 2), (2, 1), (4, 1)])
def test_an_evaluation_scores_each_sample_once_and_masks_the_filling(dp, micro_batch):
    """10 samples in global batches of 4: three batches, the last filled up with 2 samples whose
    loss mask is zero; every rank runs the same number of micro-batches."""
    data = NumberedSamples(12)
    scored, filling, per_rank = [], 0, []
    for rank in range(dp):
        batches = list(
            evaluation_batches(
                data,
                num_samples=10,
                global_batch_size=4,
                micro_batch_size=micro_batch,
                data_parallel_rank=rank,
                data_parallel_size=dp,
            )
        )
        per_rank.append(len(batches))
        for batch in batches:
            for row, number in enumerate(ids(batch)):
                if batch["loss_mask_BS"][row].all():
                    scored.append(number)
                else:
                    assert not batch["loss_mask_BS"][row].any()
                    filling += 1
    assert sorted(scored) == list(range(10))
    assert filling == 2
    assert per_rank == [12 // (micro_batch * dp)] * dp
