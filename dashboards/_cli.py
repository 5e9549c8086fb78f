"""Arguments shared by the dashboard sub-commands: where the runs come from."""

from __future__ import annotations

import argparse
import os

from dashboards.data import RunSet, load_runs

DEFAULT_EXPERIMENT = "fusebench"  # design.md §2: the config's default experiment name


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
