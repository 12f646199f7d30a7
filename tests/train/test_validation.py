"""Validation that does not depend on the seed (issue 22): the validation and test splits keep
their sample order whatever ``--seed``, ``--full-validation`` scores every sample of them, and
``--skip-train`` evaluates a checkpoint without training or writing anything.

One tiny run is trained once and saved; the tests evaluate its checkpoint through the real entry
point, as Megatron-LM's ``--skip-train --load`` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy
import pytest

from training_runs import authors_style_flags, ok, run

from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.indexed_dataset import IndexedDataset

pytestmark = pytest.mark.integration

SEQ_LENGTH = 32
SPLIT = "60,30,10"  # several documents in each split of the small corpus (21 documents)
EVALUATION_LINE = re.compile(
    r" (validation|test) at iteration\s+(\d+) \| lm loss: ([\d.E+-]+) "
    r"\| lm loss PPL: [\d.E+-]+ \| samples: (\d+)"
)


def flags(corpus, save, **overrides):
    return authors_style_flags(
        corpus,
        save,
        **{
            "eval_interval": None,
            "save_interval": None,
            "split": SPLIT,
            "moe_relu_l1_reg_coeff_init": 1e-4,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A checkpoint trained far enough that its loss differs from sample to sample."""
    save = tmp_path_factory.mktemp("trained") / "run"
    ok(run(flags(corpus, save, train_iters=30, lr=3e-3, min_lr=3e-4)))
    return save


def evaluations(stdout) -> dict:
    """{'validation' | 'test': (iteration, loss, samples)} from the console."""
    return {m[1]: (int(m[2]), float(m[3]), int(m[4])) for m in EVALUATION_LINE.finditer(stdout)}


def skip_train(corpus, trained, *extra, save=None, **overrides):
    return ok(
        run(flags(corpus, save, **overrides) + ["--load", str(trained), "--skip-train", *extra])
    )


def snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def validation_samples(corpus, split=SPLIT) -> int:
    """The validation split's sample count, from the documents' lengths: megatron gives the
    split the documents [round(b*N), round(e*N)) and cuts their tokens into sequences of
    SEQ_LENGTH + 1 tokens overlapping by one."""
    dataset = IndexedDataset(corpus.data_prefix)
    lengths = numpy.array(dataset.sequence_lengths)  # a copy: the mmap goes with the dataset
    weights = parse_and_normalize_split(split)
    begin = int(round(weights[0] * len(lengths)))
    end = int(round((weights[0] + weights[1]) * len(lengths)))
    return (int(lengths[begin:end].sum()) - 1) // SEQ_LENGTH


@pytest.mark.parametrize("extra", [[], ["--full-validation"]], ids=["eval-iters", "full"])
def test_the_same_checkpoint_validates_alike_whatever_the_seed(corpus, trained, extra):
    """Before, the validation split was shuffled with --seed: one --eval-iters batch of this
    checkpoint scored other samples under each seed (4.933, 4.935, 5.063), and the whole split
    was cut into other sequences (losses apart by a few thousandths). Now each seed scores the
    same sequences in the same order: the same loss, to the printed digit."""
    losses = {}
    for seed in (1, 1234, 4321):
        found = evaluations(skip_train(corpus, trained, *extra, seed=seed).stdout)
        losses[seed] = found["validation"][1]
        assert found["test"]
    assert max(losses.values()) - min(losses.values()) < 0.01, losses
    assert len(set(losses.values())) == 1, losses


def test_skip_train_prints_both_losses_and_trains_and_saves_nothing(corpus, trained):
    before = snapshot(trained)
    # --save equal to --load (a launch script's usual pair) is not refused as an earlier run
    result = skip_train(corpus, trained, save=trained, train_iters=60)
    found = evaluations(result.stdout)
    assert set(found) == {"validation", "test"}
    assert found["validation"][0] == found["test"][0] == 30  # the checkpoint's iteration
    assert found["validation"][2] == 4  # --eval-iters 1 global batch of 4
    assert f"evaluating {trained / 'iter_0000030'} (iteration 30) without training" in result.stdout
    assert not re.search(r"^ iteration ", result.stdout, re.MULTILINE)  # no step line
    assert "done: iteration 30 (0 in this launch" in result.stdout
    assert snapshot(trained) == before  # no checkpoint, no metrics.jsonl record, nothing


def test_skip_train_needs_a_checkpoint_to_evaluate(corpus, tmp_path):
    empty = tmp_path / "empty"
    result = run(flags(corpus, empty) + ["--load", str(empty), "--skip-train"])
    assert result.returncode == 2
    assert f"--load {empty} does not exist" in result.stderr
    assert not empty.exists()


def test_full_validation_scores_every_validation_sample(corpus, trained, tmp_path):
    expected = validation_samples(corpus)
    assert expected % 4, "the last global batch should be a partial one"
    found = evaluations(skip_train(corpus, trained, "--full-validation").stdout)
    assert found["validation"][2] == expected
    # during training too, at each evaluation
    save = tmp_path / "run"
    result = ok(run(flags(corpus, save, train_iters=2, eval_interval=1) + ["--full-validation"]))
    assert [v for k, v in evaluations(result.stdout).items() if k == "validation"]
    records = [line for line in open(save / "metrics.jsonl") if "val_lm_loss" in line]
    assert len(records) == 2 and all(f'"val_samples": {expected}' in r for r in records)


PER_DOMAIN_LINE = re.compile(r"^   lm loss per domain \| (.*)$", re.MULTILINE)


def per_domain_losses(stdout) -> list:
    """[{domain: loss}] of each evaluation (validation, then test), from the console."""
    return [
        {name: float(value) for name, value in (part.split(": ") for part in m.split(" | "))}
        for m in PER_DOMAIN_LINE.findall(stdout)
    ]


def validation_documents(corpus, split=SPLIT) -> range:
    count = len(json.loads(Path(corpus.domains_file).read_text()))
    weights = parse_and_normalize_split(split)
    return range(int(round(weights[0] * count)), int(round((weights[0] + weights[1]) * count)))


def evaluate_per_domain(corpus, trained, domains_file, *layout, nproc=1):
    """(whole-split validation loss, {domain: loss} of validation) of --skip-train."""
    result = ok(
        run(
            flags(corpus, None)
            + [
                "--load",
                str(trained),
                "--skip-train",
                "--full-validation",
                "--eval-domains",
                str(domains_file),
                *layout,
            ],
            nproc=nproc,
        )
    )
    validation, _test = per_domain_losses(result.stdout)
    return evaluations(result.stdout)["validation"][1], validation


@pytest.fixture(scope="module")
def per_domain(corpus, trained):
    return evaluate_per_domain(corpus, trained, corpus.domains_file)


def test_the_validation_loss_per_domain(corpus, trained, tmp_path, per_domain):
    """--eval-domains: each domain of the validation documents gets the mean loss of its tokens;
    one domain for every document gives exactly the whole split's loss."""
    domains = json.loads(Path(corpus.domains_file).read_text())
    whole, validation = per_domain
    assert set(validation) == {domains[d] for d in validation_documents(corpus)}
    assert len(validation) > 1
    assert min(validation.values()) < whole < max(validation.values())
    one = tmp_path / "one.json"
    one.write_text(json.dumps(["all"] * len(domains)))
    assert evaluate_per_domain(corpus, trained, one)[1] == {"all": pytest.approx(whole, rel=1e-6)}


def test_the_validation_loss_per_domain_under_pipeline_parallelism(corpus, trained, per_domain):
    """Two stages: the last computes the losses, every rank prints them; they are one process's."""
    whole, validation = evaluate_per_domain(
        corpus, trained, corpus.domains_file, "--pipeline-model-parallel-size", "2", nproc=2
    )
    assert whole == pytest.approx(per_domain[0], rel=1e-4)
    assert validation == pytest.approx(per_domain[1], rel=1e-4)


def test_the_validation_loss_per_domain_during_training(corpus, tmp_path):
    save = tmp_path / "run"
    ok(
        run(
            flags(corpus, save, train_iters=2, eval_interval=1)
            + ["--eval-domains", corpus.domains_file]
        )
    )
    records = [json.loads(line) for line in open(save / "metrics.jsonl") if "val_lm_loss" in line]
    assert len(records) == 2
    for record in records:
        per_domain = record["val_lm_loss_per_domain"]
        assert len(per_domain) > 1
        assert min(per_domain.values()) < record["val_lm_loss"] < max(per_domain.values())
