"""``fusebench report``: write a self-contained HTML report of an experiment or study from MLflow."""

from __future__ import annotations

import argparse
import sys

from dashboards._cli import add_log_to_run_arg, add_source_args, load_from_args, log_to_run
from dashboards.report import write_report


def configure(parser: argparse.ArgumentParser) -> None:
    add_source_args(parser)
    parser.add_argument("-o", "--output", metavar="FILE", default="report.html", help="default: report.html")
    parser.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="with --study: the Optuna storage to read instead of the parent run's fusebench.storage tag "
        "(a journal moved here, or a DB URL with the password the tag leaves out)",
    )
    add_log_to_run_arg(parser, "the report and each plot (report/report.html, report/plots/)")


def main(args: argparse.Namespace) -> int:
    log = log_to_run(args)
    runset = load_from_args(args)
    if args.optuna_storage:
        runset.storage = args.optuna_storage
    out = write_report(runset, args.output, log=log)
    print(f"report of {runset.source} ({len(runset.runs)} runs) -> {out}", file=sys.stderr)
    return 0
