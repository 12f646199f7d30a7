"""The ``!function`` entries of these task YAMLs: upstream lm-eval's document helpers (imported,
not copied, so documents are processed exactly as upstream does) and the offline dataset loader.

Every task here is lm-eval 0.4.13's own (prompts, targets, choices, metrics) with one change: its
documents come from local files, ``DATA_DIR/<task>/<split>.jsonl`` in the upstream Hugging Face
dataset's schema (``OFFLINE``), through ``custom_dataset: !function functions.offline_dataset``.
``DATA_DIR`` is the ``data_dir`` of lm-eval's task metadata (``--metadata '{"data_dir": DIR}'``
or ``TaskManager(metadata={"data_dir": DIR})``), else the ``REMOE_ZERO_SHOT_DIR`` variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.race.preprocess_race import (  # noqa: F401
    doc_to_choice as race_doc_to_choice,
    doc_to_target as race_doc_to_target,
    doc_to_text as race_doc_to_text,
)

from remoe_patches.eval.lm_eval_tasks import TaskDataError, TaskFileMissing

DATA_DIR_VARIABLE = "REMOE_ZERO_SHOT_DIR"
# The upstream task's splits, in the order lm-eval looks for few-shot examples.
SPLITS = ("train", "validation", "test")

ARC_SCHEMA = (
    '{"id": str, "question": str, "choices": {"text": [str, ...], "label": [str, ...]}, '
    '"answerKey": str (one of choices.label)}'
)
ARC_FIELDS = ("question", "choices", "answerKey")
# task: the upstream dataset, the split lm-eval evaluates, one row of it, and the fields of a row
# that the task's prompt, target and choices read (checked before lm-eval renders a prompt).
OFFLINE = {
    "arc_challenge": dict(
        dataset="allenai/ai2_arc, ARC-Challenge",
        eval_split="test",
        schema=ARC_SCHEMA,
        fields=ARC_FIELDS,
    ),
    "arc_easy": dict(
        dataset="allenai/ai2_arc, ARC-Easy", eval_split="test", schema=ARC_SCHEMA, fields=ARC_FIELDS
    ),
    "boolq": dict(
        dataset="super_glue, boolq",
        eval_split="validation",
        fields=("question", "passage", "label"),
        schema='{"question": str, "passage": str, "idx": int, "label": int (0 = no, 1 = yes)}',
    ),
    "hellaswag": dict(
        dataset="Rowan/hellaswag",
        eval_split="validation",
        fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        schema='{"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str, '
        '"endings": [str, str, str, str], "source_id": str, "split": str, "split_type": '
        'str, "label": str (the index of the right ending, as a string: "0".."3")}',
    ),
    "lambada_openai": dict(
        dataset="EleutherAI/lambada_openai, default",
        eval_split="test",
        fields=("text",),
        schema='{"text": str (a passage whose last space-separated word is the target)}',
    ),
    "piqa": dict(
        dataset="baber/piqa",
        eval_split="validation",
        fields=("goal", "sol1", "sol2", "label"),
        schema='{"goal": str, "sol1": str, "sol2": str, "label": int (0 = sol1, 1 = sol2)}',
    ),
    "race": dict(
        dataset="EleutherAI/race, high",
        eval_split="test",
        fields=("article", "problems"),
        schema='{"article": str, "problems": str (a Python literal of a list of {"question": '
        'str, "options": [str, str, str, str], "answer": "A".."D"}; the last problem is '
        "the one scored, the earlier ones are shown answered)}",
    ),
}


def data_dir_of(data_dir=None) -> Path:
    """The directory holding the task files: the argument, else the environment variable."""
    data_dir = data_dir or os.environ.get(DATA_DIR_VARIABLE)
    if not data_dir:
        raise ValueError(
            'no data directory for the offline tasks: pass --metadata \'{"data_dir": "DIR"}\' '
            f"to lm-eval (TaskManager(metadata=...) from Python) or set {DATA_DIR_VARIABLE}=DIR"
        )
    return Path(data_dir)


def offline_files(task: str, data_dir) -> dict:
    """``{split: path}`` of a task's files; FileNotFoundError naming the task, the expected path
    and the row schema when its evaluated split is missing."""
    if task not in OFFLINE:
        raise ValueError(f"task {task!r} has no offline files; offline tasks: {', '.join(OFFLINE)}")
    info = OFFLINE[task]
    task_dir = data_dir_of(data_dir) / task
    expected = task_dir / f"{info['eval_split']}.jsonl"
    if not expected.is_file():
        raise TaskFileMissing(
            f"task {task}: expected {expected} (not found): the {info['eval_split']} split of "
            f"{info['dataset']}, one JSON object per line with the schema {info['schema']}"
        )
    return {
        split: str(task_dir / f"{split}.jsonl")
        for split in SPLITS
        if (task_dir / f"{split}.jsonl").is_file()
    }


def offline_dataset(remoe_task: str, data_dir=None, **unused):
    """lm-eval's ``custom_dataset``: the task's splits from local jsonl files, as a DatasetDict.

    An upstream split without a file (say, the training split few-shot examples come from) is
    the evaluated split's documents, which is where lm-eval draws few-shot examples from when a
    task has no training split.
    """
    import datasets

    files = offline_files(remoe_task, data_dir)
    info = OFFLINE[remoe_task]
    expected = (
        f"expected one JSON object per line with the schema {info['schema']} ({info['dataset']})"
    )
    loaded = {}
    # each file on its own: datasets casts the files of one load to the first file's fields
    for split, path in files.items():
        try:
            rows = datasets.load_dataset("json", data_files={split: path}, split=split)
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise TaskDataError(
                f"task {remoe_task}: cannot read {path} ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}): "
                f"{expected}"
            ) from None
        # otherwise lm-eval fails later, rendering a prompt ("'goal' is undefined")
        missing = [field for field in info["fields"] if field not in rows.column_names]
        if missing:
            raise TaskDataError(
                f"task {remoe_task}: the rows of {path} lack {', '.join(missing)} (they have "
                f"{', '.join(rows.column_names) or 'no fields'}): {expected}"
            )
        loaded[split] = rows
    evaluated = loaded[info["eval_split"]]
    return datasets.DatasetDict(
        {split: loaded[split] if split in loaded else evaluated for split in SPLITS}
    )
