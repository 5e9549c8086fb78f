"""``fusebench leaderboard``: export the leaderboard of an experiment or study from MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dashboards._cli import add_log_to_run_arg, add_source_args, load_from_args, log_to_run
from dashboards.data import warn_stderr
from dashboards.leaderboard import FORMATS, build_leaderboard, format_table, log_to_parent


def configure(parser: argparse.ArgumentParser) -> None:
    add_source_args(parser)
    parser.add_argument(
        "--group-by",
        nargs="+",
        metavar="KEY",
        help="row key (default: dataset arch n_members method sparsity finetune_epochs); "
        "commas or spaces; a run param such as model.width works too",
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from -o's suffix, else md")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    add_log_to_run_arg(parser, "the table (leaderboard/leaderboard.csv and .md)")


_SUFFIX_FORMATS = {".csv": "csv", ".md": "md", ".tex": "latex", ".html": "html", ".htm": "html"}


def main(args: argparse.Namespace) -> int:
    log = log_to_run(args)
    runset = load_from_args(args)
    table = build_leaderboard(runset.runs, args.group_by)
    fmt = args.format
    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(Path(args.output).suffix.lower(), "md") if args.output else "md"
    text = format_table(table, fmt)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"leaderboard of {runset.source}: {len(table)} rows -> {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if log:
        log_to_parent(runset, table, warn_stderr)
    return 0
