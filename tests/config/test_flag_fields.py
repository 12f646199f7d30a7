"""Flags declared on config fields: every declared flag is parsed and lands in its field, the
parser's defaults are the fields' defaults, and a flag is declared once."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING

import pytest

from remoe_patches.cli.arguments import DECLARED_PARTS, build_parser, parse_run_config
from remoe_patches.config.flag_fields import declared_flags, flag_dest, flag_field, values_from_args

from command_lines import TINY_FLAGS

ATTRIBUTE = {
    "ParallelConfig": "parallel",
    "TrainingConfig": "training",
    "DataConfig": "data",
    "CheckpointConfig": "checkpoint",
    "LoggingConfig": "logging",
}

# Values the tiny run accepts where a generic change would not (the run's own flags, paths
# that must come in a set).
VALUES = {
    "--micro-batch-size": "1",
    "--train-iters": "12",
    "--lr": "0.002",
    "--global-batch-size": "4",
    "--lr-warmup-fraction": "0.1",
    "--rampup-batch-size": None,  # needs --train-samples: tests/train/test_batch_rampup.py
    "--data-path": ["data/a_text_document", "data/b_text_document"],
    "--train-data-path": None,
    "--valid-data-path": None,
    "--test-data-path": None,
    "--mock-data": None,
    "--demo-corpus": None,
    "--skip-train": None,
    "--tokenizer-type": None,
    "--tokenizer-model": None,
    "--overlap-param-gather": None,  # needs the distributed optimizer and grad overlap
    "--lr-decay-style": "cosine",
    "--pipeline-model-parallel-size": "2",  # divides the tiny model's 2 layers
    "--expert-model-parallel-size": None,  # a dense model has no experts to split
    "--sequence-parallel": None,  # turned off at TP=1, with a warning
    # GPT-2 BPE files come as a pair: (argv, the field's value)
    "--vocab-file": (["--vocab-file", "v.json", "--merge-file", "m.txt"], "v.json"),
    "--merge-file": (["--vocab-file", "v.json", "--merge-file", "m.txt"], "m.txt"),
    "--profile-ranks": (["--profile-ranks", "0", "2"], (0, 2)),
    "--memory-snapshot-path": "runs/memory.pickle",
    "--wandb-project": None,  # needs its name and the package: tests/train/test_wandb_log.py
    "--wandb-exp-name": "n",
    "--wandb-save-dir": "runs/w",
    "--wandb-entity": "team",
}


def _given(option: dataclasses.Field, flag: str):
    """(argv for ``flag``, the value the field should then hold), or None to skip."""
    if flag in VALUES:
        value = VALUES[flag]
        if value is None:
            return None
        if isinstance(value, tuple):
            return value
        words = value if isinstance(value, list) else [value]
        expected = tuple(value) if isinstance(value, list) else None
    else:
        kwargs = option.metadata["argparse"]
        if kwargs.get("action") in ("store_true", "store_false"):
            return [flag], kwargs["action"] == "store_true"
        if kwargs.get("choices"):
            words = [str(next(c for c in kwargs["choices"] if c != option.default))]
        elif option.default in (None, MISSING):
            words = ["7"] if kwargs.get("type") is int else ["runs/x"]
        else:
            words = [str(type(option.default)(option.default * 3 + 1))]
        expected = None
    if expected is None:
        kind = option.metadata["argparse"].get("type") or type(option.default)
        expected = words[0] if kind in (str, type(None)) else kind(words[0])
    return [flag, *words], expected


@pytest.mark.parametrize("part", DECLARED_PARTS, ids=lambda part: part.__name__)
def test_every_declared_flag_lands_in_its_field(part):
    attribute = ATTRIBUTE[part.__name__]
    checked = 0
    for option, flag in declared_flags(part):
        given = _given(option, flag)
        if given is None:
            continue
        argv, expected = given
        config = parse_run_config([*TINY_FLAGS, *argv])
        assert getattr(getattr(config, attribute), option.name) == expected, flag
        checked += 1
    assert checked  # the others (VALUES: None) are tested with their own rules elsewhere


def test_parser_defaults_are_the_fields_defaults():
    parser = build_parser()
    for part in DECLARED_PARTS:
        for option, flag in declared_flags(part):
            default = parser.get_default(option.metadata["argparse"].get("dest") or flag_dest(flag))
            if option.default is MISSING:
                assert default is None, flag
            elif "parser_default" not in option.metadata["argparse"]:
                assert default == option.default, flag


def test_values_from_args_converts_switches_and_lists():
    @dataclasses.dataclass
    class Example:
        paths: tuple = flag_field(None, flag="--paths", help="", nargs="*")
        quiet: bool = flag_field(
            False, flag="--quiet", help="", action="store_true", parser_default=None
        )
        steps: int = flag_field(3, flag="--steps", help="")

    args = argparse.Namespace(paths=["a", "b"], quiet=None, steps=5)
    assert values_from_args(Example, args) == dict(paths=("a", "b"), quiet=False, steps=5)


def test_a_flag_is_declared_once():
    flags = [flag for part in DECLARED_PARTS for _, flag in declared_flags(part)]
    assert len(flags) == len(set(flags))
    build_parser()  # argparse refuses a flag added twice
