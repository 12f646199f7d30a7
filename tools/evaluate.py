#!/usr/bin/env python
"""Zero-shot evaluation of ReMoE / TopK-MoE / dense checkpoints with lm-eval, as in the paper's
Table 2.

    python tools/evaluate.py --load ckpt/182m_remoe --load ckpt/182m_moe \\
        --data-dir benchmarks/ --output results.json

Each ``--load`` (a ``pretrain_gpt.py`` checkpoint directory, any parallel layout, or a directory
written by ``tools/export_checkpoint.py``) is one row of the printed markdown table: a column per
task with the paper's metric in percent (ARC-c acc_norm, ARC-e acc, BoolQ acc, HellaSwag
acc_norm, LAMBADA acc, PIQA acc_norm, RACE acc) and their average. ``--output`` receives
lm-eval's results JSON; with several ``--load`` values each model's JSON goes to
``<output stem>.<row number>.json`` instead (the table names them). ``--data-dir DIR`` reads the
tasks from local jsonl files, ``DIR/<task>/<split>.jsonl`` in each upstream dataset's schema
(see ``remoe_patches/eval/evaluation.py``); without it, lm-eval loads the datasets from the Hugging
Face hub.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_TASKS = "arc_challenge,arc_easy,boolq,hellaswag,lambada_openai,piqa,race"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Zero-shot lm-eval evaluation of ReMoE checkpoints (the paper's Table 2).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--load",
        action="append",
        required=True,
        metavar="DIR",
        help="Checkpoint (pretrain_gpt.py --save dir or iter_XXXXXXX) or export "
        "directory; repeat for several rows.",
    )
    parser.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="Row label per --load (default: router kind and directory name).",
    )
    parser.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help=f"Comma-separated lm-eval tasks (default: {DEFAULT_TASKS}).",
    )
    parser.add_argument("--num-fewshot", type=int, help="Few-shot examples (default: 0).")
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences per forward pass.")
    parser.add_argument(
        "--limit", type=float, help="At most this many documents per task (a fraction if < 1)."
    )
    parser.add_argument("--output", metavar="FILE.json", help="Write lm-eval's results JSON here.")
    parser.add_argument(
        "--data-dir", metavar="DIR", help="Read the tasks from DIR/<task>/<split>.jsonl (offline)."
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "megatron", "reference"],
        help="Model code: megatron-core, or the exported reference model "
        "(auto: by what the directory holds).",
    )
    parser.add_argument(
        "--max-length", type=int, help="Context length (default: the checkpoint's --seq-length)."
    )
    parser.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="Directory now holding the checkpoint's tokenizer files.",
    )
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval's random seeds.")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.load):
        parser.error(f"--label was given {len(args.label)} times for {len(args.load)} --load")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.limit is not None:
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not args.tasks:
        parser.error("--tasks is empty")
    for directory in args.load:
        if not os.path.isdir(directory):
            parser.error(f"--load {directory} is not a directory")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    return args


def output_paths(output, count: int) -> list:
    if output is None:
        return [None] * count
    if count == 1:
        return [output]
    path = Path(output)
    return [
        str(path.with_name(f"{path.stem}.{i + 1}{path.suffix or '.json'}")) for i in range(count)
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data_dir is not None:  # before datasets is imported: never reach for the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from remoe_patches.train.checkpointing import CheckpointError
    from remoe_patches.eval.evaluation import RemoeLM, markdown_table, offline_task_manager
    from remoe_patches.eval.lm_eval_tasks import TaskDataError
    from remoe_patches.config.router_registry import ROUTERS

    tasks = list(args.tasks)
    if args.data_dir is not None:
        try:
            task_manager = offline_task_manager(tasks, args.data_dir)
        except (FileNotFoundError, ValueError) as error:
            print(f"evaluate.py: error: {error}", file=sys.stderr)
            return 2
    else:
        task_manager = TaskManager()

    rows, paths = [], output_paths(args.output, len(args.load))
    for index, directory in enumerate(args.load):
        print(f"[{index + 1}/{len(args.load)}] {directory}", flush=True)
        try:
            lm = RemoeLM(
                load=directory,
                backend=args.backend,
                batch_size=args.batch_size,
                max_length=args.max_length,
                tokenizer_dir=args.tokenizer_dir,
            )
        except (CheckpointError, ValueError) as error:
            print(f"evaluate.py: error: --load {directory}: {error}", file=sys.stderr)
            return 2
        if args.label:
            label = args.label[index]
        else:
            label = f"{ROUTERS[lm.router].title} ({Path(directory).resolve().name})"
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=args.num_fewshot,
                limit=args.limit,
                batch_size=args.batch_size,
                log_samples=False,
                task_manager=task_manager,
                random_seed=args.seed,
                numpy_random_seed=args.seed,
                torch_random_seed=args.seed,
                fewshot_random_seed=args.seed,
            )
        except ConnectionError as error:  # datasets' own, raised when the hub is out of reach
            print(
                f"evaluate.py: error: {error}: there is no network here; pass --data-dir DIR "
                "with the tasks' files (DIR/<task>/<split>.jsonl, see "
                "remoe_patches/eval/lm_eval_tasks/functions.py for each task's file and schema)",
                file=sys.stderr,
            )
            return 2
        except TaskDataError as error:
            print(f"evaluate.py: error: {error}", file=sys.stderr)
            return 2
        results["config"]["label"] = label
        rows.append((label, results))
        if paths[index] is not None:
            Path(paths[index]).parent.mkdir(parents=True, exist_ok=True)
            with open(paths[index], "w") as f:
                json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        del lm
        gc.collect()

    print()
    print(markdown_table(rows, args.tasks))
    for (label, _), path in zip(rows, paths):
        if path is not None:
            print(f"{label}: lm-eval results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
