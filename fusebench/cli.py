"""``fusebench COMMAND``: every package's sub-commands in one command line.

Layering (docs/design.md): fusion <- bench <- sweeps, dashboards <- fusebench. The packages do not know
each other's commands; this module composes them, including the one place two packages meet on the
command line: after a sweep, the dashboards' leaderboard of the study.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from bench import cli as bench_cli


def sweep_leaderboard(result) -> str:
    """The dashboards' leaderboard (mean ± std over seeds, gains) of a finished sweep, as Markdown."""
    from dashboards import leaderboard as lb
    from dashboards.data import load_runs

    runset = load_runs(study=result.study_name, tracking_uri=result.tracking_uri, warn=lambda _msg: None)
    return lb.format_table(lb.build_leaderboard(runset.runs), "md")


def _configure_sweep(parser) -> None:
    from sweeps.cli import configure

    configure(parser)


def _sweep(args) -> int:
    from sweeps.cli import main

    return main(args, leaderboard=sweep_leaderboard)


SWEEP = SimpleNamespace(configure=_configure_sweep, main=_sweep)

COMMANDS = {
    **bench_cli.COMMANDS,
    "sweep": (SWEEP, "run an Optuna sweep from a YAML spec, then print the study's leaderboard"),
    "leaderboard": ("dashboards.cli_leaderboard", "export a leaderboard table from MLflow"),
    "report": ("dashboards.cli_report", "write a self-contained HTML report from MLflow"),
    "ui": ("dashboards.cli_ui", "start the MLflow UI on the configured tracking store"),
}


def main(argv: list[str] | None = None) -> int:
    return bench_cli.main(argv, COMMANDS)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
