#!/usr/bin/env python
"""Routing analyses of a ReMoE / TopK-MoE run (the paper's section 5): a PNG and a CSV each.

    python tools/analyze_routing.py stages runs/demo               # from metrics.jsonl
    python tools/analyze_routing.py per-token runs/demo            # latest checkpoint
    python tools/analyze_routing.py per-domain runs/demo/iter_0000600
    python tools/analyze_routing.py load runs/demo --all-checkpoints
    python tools/analyze_routing.py stability runs/demo/iter_0000300 runs/demo/iter_0000600
    python tools/analyze_routing.py all runs/demo                  # everything, then the report
    python tools/analyze_routing.py --report runs/demo/analysis    # one HTML page of the plots

Checkpoint analyses route a fixed calibration set: ``--num-sequences`` sequences of the model's
``--seq-length`` from the run's own dataset (``--data-path`` to change it), at most ``4 x
seq-length`` tokens from each of documents drawn in a fixed random order: the run's validation
documents when they are enough, else all (``--documents all|train|valid|test`` to choose).
Per-domain routing reads one domain per document from ``domains.json`` next to the dataset
(the demo corpus has one) or ``--domains FILE`` (a JSON list, or the jsonl corpus with
``--domain-key``, e.g. ``meta.pile_set_name`` for The Pile). Outputs go to
``<run dir>/analysis/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from remoe_patches.analysis import (  # noqa: E402
    routing_analyses as analysis,
    analysis_report,
    routing_capture,
)
from remoe_patches.data import domains  # noqa: E402
from remoe_patches.runs import run_directory, run_metrics  # noqa: E402


def _add_data_options(parser):
    parser.add_argument(
        "--data-path",
        metavar="PREFIX",
        help="indexed dataset to route (default: the run's --data-path)",
    )
    parser.add_argument(
        "--num-sequences",
        type=int,
        default=256,
        help="calibration sequences (default 256, fewer if the documents end)",
    )
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (default: the model's)")
    parser.add_argument(
        "--documents",
        default="auto",
        choices=["auto", "valid", "train", "test", "all"],
        help="which documents of the run's --split to take (default auto: "
        "valid if they are enough, else all)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--out", metavar="DIR", help="output directory (default RUN/analysis)")


def _add_domain_options(parser):
    parser.add_argument(
        "--domains",
        metavar="FILE",
        help="one domain per document: a JSON list, or a jsonl corpus "
        "(default: domains.json next to the dataset)",
    )
    parser.add_argument(
        "--domain-key",
        metavar="KEY",
        help="the domain's key in a jsonl --domains (default: domain)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Routing analyses of ReMoE / TopK-MoE runs (PNG + CSV each).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--report",
        metavar="DIR",
        help="write DIR/index.html with every plot in DIR (or DIR/analysis)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("stages", help="sparsity, coefficient and reg loss over steps")
    p.add_argument("run", help="run directory (or its metrics.jsonl)")
    p.add_argument(
        "--target-sparsity",
        type=float,
        help="default: 1 - k/E from the run's checkpoint or sweep config",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=run_metrics.SETTLE_TOLERANCE,
        help="stage III: sparsity within this of the target to the end",
    )
    p.add_argument("--out", metavar="DIR")

    p = commands.add_parser("per-token", help="active experts per vocabulary id vs frequency")
    p.add_argument("load", help="run directory (latest checkpoint) or iter_XXXXXXX")
    _add_data_options(p)

    p = commands.add_parser("per-domain", help="expert shares and active experts per domain")
    p.add_argument("load", help="run directory (latest checkpoint) or iter_XXXXXXX")
    _add_data_options(p)
    _add_domain_options(p)

    p = commands.add_parser("load", help="expert load, dead experts, collapsed layers")
    p.add_argument("load", help="run directory (latest checkpoint) or iter_XXXXXXX")
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="every checkpoint of the run directory, oldest first",
    )
    _add_data_options(p)

    p = commands.add_parser("stability", help="flip rate of the routing between checkpoints")
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="two or more iter_XXXXXXX in order, or a run directory (all of its)",
    )
    _add_data_options(p)

    p = commands.add_parser("all", help="every analysis of a run, then the HTML report")
    p.add_argument("run", help="run directory")
    _add_data_options(p)
    _add_domain_options(p)

    p = commands.add_parser("report", help="one HTML page of a directory's plots")
    p.add_argument("dir", help="analysis directory (or a run directory with analysis/)")
    return parser


def _out_dir(args, path) -> str:
    return args.out or os.path.join(run_directory.run_dir_of(path), run_directory.ANALYSIS_DIR)


def _route(load_path, args, calibration=None):
    checkpoint = routing_capture.load_moe_for_routing(load_path)
    if calibration is None:
        calibration = routing_capture.default_calibration(
            checkpoint,
            data_path=args.data_path,
            num_sequences=args.num_sequences,
            seq_length=args.seq_length,
            documents=args.documents,
        )
        print(
            f" calibration: {calibration.tokens_NS.shape[0]} sequences x "
            f"{calibration.tokens_NS.shape[1]} tokens from documents "
            f"{calibration.first_document}..{calibration.end_document - 1} of "
            f"{calibration.prefix}",
            flush=True,
        )
    sample = routing_capture.route_checkpoint(checkpoint, calibration, batch_size=args.batch_size)
    print(f" routed {checkpoint.directory} (iteration {checkpoint.iteration})", flush=True)
    return sample


def _routes(paths, args) -> list:
    samples = []
    for path in paths:
        samples.append(_route(path, args, samples[0].calibration if samples else None))
    return samples


def _domains(args, sample):
    path = args.domains or analysis.default_domains_file(sample.calibration.prefix)
    if path is None:
        raise routing_capture.AnalysisError(
            f"no domains.json next to {sample.calibration.prefix}; give --domains FILE"
        )
    return domains.read_domains(path, args.domain_key)


def _report_dir(path: str) -> str:
    nested = os.path.join(path, run_directory.ANALYSIS_DIR)
    has_png = os.path.isdir(path) and any(name.endswith(".png") for name in os.listdir(path))
    return nested if not has_png and os.path.isdir(nested) else path


def _print(result) -> None:
    print(f" {result.name}: {result.png}")
    print(f" {' ' * len(result.name)}  {result.csv}")
    print("   " + json.dumps(result.summary, default=analysis_report.json_default)[:600])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and args.report is None:
        parser.error(
            "give a command (stages, per-token, per-domain, load, stability, all, "
            "report) or --report DIR"
        )
    try:
        command = args.command
        if command == "stages":
            _print(
                analysis.stages(
                    args.run,
                    _out_dir(args, args.run),
                    target=args.target_sparsity,
                    tolerance=args.tolerance,
                )
            )
        elif command in ("per-token", "per-domain"):
            sample = _route(args.load, args)
            if command == "per-token":
                _print(analysis.per_token(sample, _out_dir(args, args.load)))
            else:
                _print(
                    analysis.per_domain(sample, _domains(args, sample), _out_dir(args, args.load))
                )
        elif command == "load":
            paths = (
                routing_capture.checkpoint_dirs(args.load) if args.all_checkpoints else [args.load]
            )
            _print(analysis.expert_load(_routes(paths, args), _out_dir(args, args.load)))
        elif command == "stability":
            paths = args.checkpoints
            if len(paths) == 1:
                paths = routing_capture.checkpoint_dirs(paths[0])
            if len(paths) < 2:
                raise routing_capture.AnalysisError("stability needs two or more checkpoints")
            _print(analysis.stability(_routes(paths, args), _out_dir(args, paths[-1])))
        elif command == "all":
            out = _out_dir(args, args.run)
            if run_metrics.read_metrics(args.run):
                try:
                    _print(analysis.stages(args.run, out))
                except routing_capture.AnalysisError as error:  # a TopK run has no stages
                    print(f" stages skipped: {error}")
            samples = _routes(routing_capture.checkpoint_dirs(args.run), args)
            latest = samples[-1]
            _print(analysis.per_token(latest, out))
            try:
                domains = _domains(args, latest)
            except routing_capture.AnalysisError as error:
                print(f" per-domain skipped: {error}")
            else:
                _print(analysis.per_domain(latest, domains, out))
            _print(analysis.expert_load(samples, out))
            if len(samples) > 1:
                _print(analysis.stability(samples, out))
            print(f" report: {analysis_report.write_report(out)}")
        elif command == "report":
            print(f" report: {analysis_report.write_report(_report_dir(args.dir))}")
        if args.report is not None:
            print(f" report: {analysis_report.write_report(_report_dir(args.report))}")
    except ValueError as error:  # AnalysisError, or a checkpoint/config that cannot load
        if os.environ.get("REMOE_DEBUG"):
            raise
        print(f"analyze_routing.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
