"""``remoe-lm-eval``: lm-eval's own command line with the ``remoe`` model registered.

lm-eval finds models only among those imported before its CLI runs, so this entry point imports
``remoe_patches.eval.evaluation`` (which registers ``remoe``) and hands every argument to lm-eval's
CLI unchanged. One convenience is added: ``--data_dir DIR`` stands for lm-eval's
``--include_path <the offline task YAMLs> --metadata '{"data_dir": "DIR"}'``, so that the paper's
seven tasks read ``DIR/<task>/<split>.jsonl`` instead of the Hugging Face hub::

    remoe-lm-eval --model remoe --model_args load=runs/demo,batch_size=16 \\
        --tasks arc_easy,piqa --data_dir benchmarks/zero_shot --output_path results/
    python -m remoe_patches.eval.lm_eval_cli ...     # the same without the installed script

A wrong ``--model_args`` entry (no ``load=DIR``, a misspelt key, a directory without a
checkpoint) or a task file without the task's fields ends in one line saying so.
"""

from __future__ import annotations

import json
import os
import sys


def expand_data_dir(argv: list) -> list:
    """``--data_dir DIR`` as lm-eval's ``--include_path`` and ``--metadata`` (merged with a
    ``--metadata`` given too); the hub is not reached for datasets then."""
    argv = list(argv)
    for spelling in ("--data_dir", "--data-dir"):
        if spelling in argv:
            index = argv.index(spelling)
            data_dir = argv[index + 1] if index + 1 < len(argv) else None
            del argv[index : index + 2]
            break
    else:
        return argv
    if not data_dir or not os.path.isdir(data_dir):
        raise SystemExit(f"remoe-lm-eval: error: --data_dir {data_dir} is not a directory")
    from remoe_patches.eval.evaluation import TASKS_DIR

    metadata = {}
    if "--metadata" in argv:
        index = argv.index("--metadata")
        metadata = json.loads(argv[index + 1])
        del argv[index : index + 2]
    metadata["data_dir"] = os.path.abspath(data_dir)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return argv + ["--include_path", str(TASKS_DIR), "--metadata", json.dumps(metadata)]


def main(argv=None) -> None:
    argv = expand_data_dir(sys.argv[1:] if argv is None else argv)
    from remoe_patches.eval.evaluation import ModelArgsError  # registers the "remoe" model
    from remoe_patches.eval.lm_eval_tasks import TaskDataError
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (ModelArgsError, TaskDataError) as error:
        # the user's --model_args or task files: one line that says what to change
        print(f"remoe-lm-eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
