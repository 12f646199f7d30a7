"""Offline copies of lm-eval's task configs for the paper's seven zero-shot tasks, and the errors
their loader raises (``TaskDataError``, ``TaskFileMissing``).

Each ``<task>.yaml`` repeats the upstream lm-eval 0.4.13 task's prompt, target, choices and
metrics (``tests/eval/test_evaluation.py`` checks that they still equal upstream's) but reads local
jsonl files, ``DATA_DIR/<task>/<split>.jsonl``, through ``custom_dataset: !function
functions.offline_dataset``; ``DATA_DIR`` is lm-eval's task metadata ``data_dir``, else the
``REMOE_ZERO_SHOT_DIR`` variable. ``functions.py`` also hands the upstream task's Python helpers
(hellaswag, race) to the YAML's ``!function`` entries.
"""


class TaskDataError(ValueError):
    """A task's file is missing or its rows lack the fields the task reads.

    Defined here, not in ``functions.py``: lm-eval loads that file as a module of its own, so a
    class defined there would not be the one callers catch.
    """


class TaskFileMissing(TaskDataError, FileNotFoundError):
    """The evaluated split's file of a task is not there."""
