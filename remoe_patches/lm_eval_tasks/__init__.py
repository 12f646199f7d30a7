"""Offline copies of lm-eval's task configs for the paper's seven zero-shot tasks.

Each ``<task>.yaml`` repeats the upstream lm-eval 0.4.13 task's prompt, target, choices and
metrics (``tests/test_evaluation.py`` checks that they still equal upstream's) but reads local
jsonl files: ``remoe_patches.evaluation.offline_task_configs`` fills in ``dataset_kwargs`` with
``DIR/<task>/<split>.jsonl``. The ``remoe_offline`` section of each file (removed before lm-eval
sees the config) names the split that is evaluated and the schema of its rows.
``functions.py`` hands the upstream task's Python helpers (hellaswag, race) to the YAML's
``!function`` entries.
"""
