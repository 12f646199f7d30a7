#!/usr/bin/env python
"""Expand a sweep file into named pretraining runs, launch them, and collect their results.

    python tools/sweep.py configs/sweeps/experts.yaml                     # list the commands
    python tools/sweep.py configs/sweeps/cpu_tiny.yaml --launcher local   # run them here
    python tools/sweep.py configs/sweeps/experts.yaml --launcher slurm    # write a job array
    python tools/sweep.py configs/sweeps/experts.yaml --collect           # the results table
    python tools/sweep.py configs/sweeps/topk_baseline.yaml --collect --reference remoe

Every run is validated with pretrain_gpt.py's parser first. Finished runs are skipped when the
sweep is launched again. The sweep file format is described in
``remoe_patches/experiments/sweep.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from remoe_patches.experiments import sweep as sweeps  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a grid of ReMoE/MoE/dense pretraining runs from a sweep file.",
        allow_abbrev=False,
    )
    parser.add_argument("sweep", help="the sweep file, e.g. configs/sweeps/experts.yaml")
    parser.add_argument(
        "--launcher",
        choices=["print", "local", "slurm"],
        default="print",
        help="print the commands (default), run them one after another here, "
        "or write a Slurm job-array script",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="gather the runs' results into results.md/results.csv/runs.csv",
    )
    parser.add_argument(
        "--reference",
        metavar="ROW",
        help="--collect with replicates: the row the others are compared with, "
        "paired by seed (a row's name such as remoe_scale-none, a grid value "
        "such as remoe, or a row's label; default: the sweep file's "
        "table.reference, else the ReMoE row)",
    )
    parser.add_argument(
        "--output-dir",
        help="where the runs live (default: the file's output_dir, else runs/sweeps/<name>)",
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="local: go on with the next run when one fails"
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip checking every run with pretrain_gpt.py's parser",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # Listing commands and collecting results need no ${VAR}; writing or starting runs do.
        listing = args.collect or args.launcher == "print"
        sweep = sweeps.load_sweep(args.sweep, output_dir=args.output_dir, missing_ok=listing)
        if args.collect:
            collected = sweeps.collect(sweep, reference=args.reference)
            print(collected["markdown"], end="")
            plot = f", {collected['plot'].name}" if collected["plot"] else ""
            print(f"\nwritten: {sweep.output_dir / 'results.md'}, results.csv, runs.csv{plot}")
            return 0
        if not args.no_validate:
            sweeps.validate_runs(sweep)
        print(f"sweep {sweep.name}: {len(sweep.runs)} run(s) in {sweep.output_dir}", flush=True)
        if args.launcher == "print":
            sweeps.print_commands(sweep)
        elif args.launcher == "slurm":
            path = sweeps.write_slurm(sweep)
            pending = sum(not sweeps.is_finished(run) for run in sweep.runs)
            print(f"{pending} unfinished run(s); submit with: sbatch {path}")
            print(path)
        else:
            outcome = sweeps.run_local(sweep, keep_going=args.keep_going)
            counts = {
                state: list(outcome.values()).count(state)
                for state in ("finished", "skipped", "failed")
            }
            print(f"sweep {sweep.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
            if counts["failed"] or len(outcome) < len(sweep.runs):
                return 1
    except sweeps.SweepError as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
