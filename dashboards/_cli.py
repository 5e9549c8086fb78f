"""Arguments shared by the dashboard sub-commands: where the runs come from."""

from __future__ import annotations

import argparse
import os

from bench.config import DEFAULTS
from bench.errors import FusebenchError
from dashboards.data import RunSet, load_runs

DEFAULT_EXPERIMENT = DEFAULTS["experiment"]  # where `fusebench run` logs by default


def add_source_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--experiment",
        metavar="NAME",
        help="MLflow experiment to read (default: $MLFLOW_EXPERIMENT_NAME or 'fusebench')",
    )
    source.add_argument(
        "--study", metavar="NAME", help="sweep study to read (its trial runs, in any experiment)"
    )
    add_tracking_arg(parser)


def add_tracking_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db)",
    )


def load_from_args(args: argparse.Namespace) -> RunSet:
    experiment = args.experiment
    if experiment is None and args.study is None:
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    return load_runs(experiment=experiment, study=args.study, tracking_uri=args.tracking_uri)


def add_log_to_run_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """Dashboards only read MLflow unless ``--log-to-run`` asks them to attach ``what`` to a study's run."""
    log = parser.add_mutually_exclusive_group()
    log.add_argument(
        "--log-to-run",
        action="store_true",
        help=f"with --study: also attach {what} to the study's parent run in MLflow (default: read only)",
    )
    log.add_argument("--no-log", action="store_true", help=argparse.SUPPRESS)  # the default; kept for scripts


def log_to_run(args: argparse.Namespace) -> bool:
    """Whether to write to the study's parent run; ``--log-to-run`` without ``--study`` is an error."""
    if args.log_to_run and not args.study:
        raise FusebenchError("--log-to-run needs --study NAME (only a study has a parent run to attach to)")
    return bool(args.log_to_run)
