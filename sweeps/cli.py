"""``fusebench sweep SPEC.yaml``: run (or resume) an Optuna sweep, then print a leaderboard of the study.

Re-running the same command continues the same study (same name, same storage): finished trials are
kept, trials a crash left RUNNING are failed and re-queued, and the study stops at its target count.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from bench.errors import FusebenchError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec YAML (see sweeps/quickstart.yaml)")
    parser.add_argument(
        "--n-trials",
        type=int,
        default=None,
        help="target number of finished trials in the study (default: the spec's n_trials)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds after which no new trial starts (default: the spec's timeout)",
    )
    parser.add_argument("--study", default=None, help="study name (default: the spec's 'study' or file name)")
    parser.add_argument(
        "--storage",
        default=None,
        help="postgresql://user:pw@host/db for several machines, or a .journal file path "
        "(default: <runs-dir>/<study>.journal)",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: base config, MLFLOW_TRACKING_URI, sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--runs-dir", default="runs", help="folder for journal files and locks (default: runs)"
    )


def _print_leaderboard(result, study, out, leaderboard: Callable | None) -> None:
    """``leaderboard(result)`` (the command line passes the dashboards' one) when it can be built, else a
    compact table of the Optuna trials."""
    if leaderboard is not None:
        try:
            print(leaderboard(result), file=out)
            return
        except Exception as exc:  # noqa: BLE001 - no finished run yet: Optuna's view
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            print(f"(leaderboard from MLflow unavailable: {first}; showing the Optuna trials)", file=out)
    import pandas as pd

    from sweeps.runner import trials_table

    with pd.option_context("display.max_columns", 20, "display.width", 160, "display.precision", 4):
        print(trials_table(study).to_string(index=False), file=out)


def main(args: argparse.Namespace, leaderboard: Callable | None = None) -> int:
    """Run the sweep; ``leaderboard(SweepResult) -> str`` prints the study's table at the end."""
    from sweeps.spec import load_spec

    spec = load_spec(args.spec)  # every spec error is raised here, before any study or run exists
    if args.study is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.study):
        raise FusebenchError(f"--study {args.study!r}: use letters, digits, '.', '_' or '-'")
    if args.n_trials is not None and args.n_trials < 0:
        raise FusebenchError(f"--n-trials must be >= 0, got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise FusebenchError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.workers < 1:
        raise FusebenchError(f"--workers must be >= 1, got {args.workers}")

    import optuna

    from sweeps.runner import run_sweep
    from sweeps.study import open_storage

    result = run_sweep(
        spec,
        study_name=args.study,
        storage=args.storage,
        n_trials=args.n_trials,
        timeout=args.timeout,
        workers=args.workers,
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
    )
    out = sys.stdout
    c = result.counts
    print(
        f"\nstudy '{result.study_name}': {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed "
        f"(target {result.target}) in {result.wall_time_s:.1f} s",
        file=out,
    )
    study = optuna.load_study(
        study_name=result.study_name,
        storage=open_storage(args.storage, result.study_name, args.runs_dir).storage,
    )
    _print_leaderboard(result, study, out, leaderboard)
    uri = result.tracking_uri
    print(
        f"\nMLflow: parent run {result.parent_run_id} in experiment '{spec.base['experiment']}'.\n"
        f"Open the UI:  fusebench ui   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)\n"
        f"Resume / extend: fusebench sweep {args.spec} --study {result.study_name}"
        + (f" --storage {result.storage_url}" if args.storage else "")
        + " [--n-trials N]",
        file=out,
    )
    return 0
