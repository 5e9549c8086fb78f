"""``fusebench report``: write a self-contained HTML report of an experiment or study from MLflow."""

from __future__ import annotations

import argparse
import sys

from dashboards._cli import add_source_args, load_from_args
from dashboards.report import write_report


def configure(parser: argparse.ArgumentParser) -> None:
    add_source_args(parser)
    parser.add_argument("-o", "--output", metavar="FILE", default="report.html", help="default: report.html")
    parser.add_argument(
        "--no-log",
        action="store_true",
        help="with --study: do not attach the report and plots to the parent run",
    )


def main(args: argparse.Namespace) -> int:
    runset = load_from_args(args)
    out = write_report(runset, args.output, log=not args.no_log)
    print(f"report of {runset.source} ({len(runset.runs)} runs) -> {out}", file=sys.stderr)
    return 0
