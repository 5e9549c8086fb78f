"""Fetch fusebench runs from MLflow into a pandas DataFrame (design.md §3 is the schema).

Dashboards read the tracking store only, so a study that finished on another machine can be reported
anywhere the store is reachable. Every problem a user can cause (a mistyped experiment or study name,
an empty experiment, runs without the metrics a leaderboard needs) is a ``FusebenchError`` that names
it, so ``fusebench leaderboard``/``report`` print one line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from bench import schema, tracking
from bench.errors import FusebenchError

#: The configuration key of a leaderboard row, in display order.
KEY_COLUMNS = ["dataset", "arch", "n_members", "method", "sparsity", "repair", "finetune_epochs"]


_INT_KEYS = ("n_members", "finetune_epochs", "seed")
_MAX_WARNINGS = 8


def warn_stderr(message: str) -> None:
    print(f"fusebench: warning: {message}", file=sys.stderr)


@dataclass
class RunSet:
    """The usable runs of one experiment or study, and where they came from."""

    runs: pd.DataFrame
    tracking_uri: str
    source: str  # "experiment 'name'" or "study 'name'": for titles and messages
    study_name: str | None = None
    parent_run_ids: list[str] = field(default_factory=list)  # newest first
    storage: str | None = None  # Optuna storage of the study (parent run tag), if any
    skipped: list[str] = field(default_factory=list)  # one line per run left out

    @property
    def parent_run_id(self) -> str | None:
        return self.parent_run_ids[0] if self.parent_run_ids else None


def open_client(tracking_uri: str | None = None):
    """``(MlflowClient, uri)``: a reader never creates an empty store for a mistyped path."""
    return tracking.open_client(tracking_uri, must_exist=True)


def _all_experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _normalize_sparsity(value: str) -> str:
    """ "0.50" and "0.5" are the same configuration: keep one spelling."""
    value = (value or "").strip()
    if value in ("", "None", "null", "nan"):
        return ""
    try:
        return repr(float(value))
    except ValueError:
        return value


def _row(run) -> tuple[dict, list[str]]:
    """One DataFrame row from an MLflow run, and the problems that make it unusable."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    row: dict = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "start_time": run.info.start_time,
        "study": tags.get(schema.STUDY, ""),
        "trial": tags.get(schema.TRIAL, ""),
        "trial_state": tags.get(schema.TRIAL_STATE, ""),
        "parent_run_id": tags.get(schema.MLFLOW_PARENT_RUN, ""),
        "device": tags.get(schema.DEVICE, ""),
    }
    problems = []
    for key, (tag, param) in schema.KEY_TAGS.items():
        value = tags.get(tag, params.get(param))
        if key == "sparsity":
            row[key] = _normalize_sparsity(value or "")
            continue
        if key == "repair":  # runs from before statistics repair existed were not repaired
            row[key] = value or "none"
            continue
        if value is None or value == "":
            problems.append(f"tag {tag}")
            row[key] = None
            continue
        if key in _INT_KEYS:
            try:
                value = int(float(value))
            except ValueError:
                problems.append(f"tag {tag}={value!r} (not an integer)")
                value = None
        row[key] = value
    missing = [m for m in schema.REQUIRED_METRICS if m not in metrics]
    problems.extend(f"metric {m}" for m in missing)
    row.update(metrics)
    row.update({f"params.{k}": v for k, v in params.items()})
    return row, problems


def _frame(runs: list, warn: Callable[[str], None]) -> tuple[pd.DataFrame, list[str]]:
    rows, skipped = [], []
    not_finished: dict[str, int] = {}
    for run in runs:
        if run.info.status != "FINISHED":
            not_finished[run.info.status] = not_finished.get(run.info.status, 0) + 1
            continue
        row, problems = _row(run)
        if problems:
            skipped.append(
                f"skipping run {run.info.run_id} ({run.info.run_name}): missing {', '.join(problems)}"
            )
            continue
        rows.append(row)
    for line in skipped[:_MAX_WARNINGS]:
        warn(line)
    if len(skipped) > _MAX_WARNINGS:
        warn(f"... and {len(skipped) - _MAX_WARNINGS} more runs skipped for missing metrics or tags")
    if not_finished:
        states = ", ".join(f"{n} {s}" for s, n in sorted(not_finished.items()))
        warn(f"leaving out {sum(not_finished.values())} runs that did not finish ({states})")
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values("start_time", kind="stable").reset_index(drop=True)
    return frame, skipped


def _role(role: str, **tags: str) -> str:
    return tracking.tag_filter(**{schema.ROLE: role}, **tags)


def load_runs(
    *,
    experiment: str | None = None,
    study: str | None = None,
    tracking_uri: str | None = None,
    warn: Callable[[str], None] = warn_stderr,
) -> RunSet:
    """The finished, complete fusion runs of an MLflow experiment or of a sweep's study.

    A study is found by its parent run (``fusebench.role=study``, ``fusebench.study=<name>``) in any
    experiment; its trial runs carry the same ``fusebench.study`` tag.
    """
    if (experiment is None) == (study is None):
        raise FusebenchError("give exactly one of --experiment NAME or --study NAME")
    client, uri = open_client(tracking_uri)
    parents: list = []
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            names = sorted(e.name for e in client.search_experiments())
            shown = ", ".join(repr(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")
            raise FusebenchError(
                f"unknown experiment {experiment!r} in tracking store {uri} (experiments: {shown or 'none'})"
            )
        source = f"experiment {experiment!r}"
        runs = list(tracking.search_runs(client, [exp.experiment_id], _role(schema.ROLE_EXPERIMENT)))
        if not runs:
            raise FusebenchError(
                f"experiment {experiment!r} in {uri} has no fusebench runs (no run with tag {schema.ROLE}=experiment)"
            )
    else:
        source = f"study {study!r}"
        all_ids = _all_experiment_ids(client)
        named = {schema.STUDY: study}
        parents = list(tracking.search_runs(client, all_ids, _role(schema.ROLE_STUDY, **named)))
        runs = list(tracking.search_runs(client, all_ids, _role(schema.ROLE_EXPERIMENT, **named)))
        if not parents and not runs:
            studies = tracking.search_runs(client, all_ids, _role(schema.ROLE_STUDY))
            known = sorted({r.data.tags.get(schema.STUDY, "") for r in studies})
            shown = ", ".join(repr(n) for n in known[:10]) + (" ..." if len(known) > 10 else "")
            raise FusebenchError(
                f"unknown study {study!r} in tracking store {uri} (studies: {shown or 'none'})"
            )
        if not runs:
            raise FusebenchError(f"study {study!r} in {uri} has no trial runs yet")
    frame, skipped = _frame(runs, warn)
    if frame.empty:
        why = "all of them miss required metrics or tags" if skipped else "none of them finished"
        raise FusebenchError(
            f"{source} has {len(runs)} runs but none is usable: {why} "
            f"(needed: {', '.join(schema.REQUIRED_METRICS)} and the fusebench.* key tags)"
        )
    parents.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    storage = next((p.data.tags[schema.STORAGE] for p in parents if p.data.tags.get(schema.STORAGE)), None)
    return RunSet(
        runs=frame,
        tracking_uri=uri,
        source=source,
        study_name=study,
        parent_run_ids=[p.info.run_id for p in parents],
        storage=storage,
        skipped=skipped,
    )


def load_curves(runset: RunSet, metric: str = schema.FUSED_ACC) -> pd.DataFrame:
    """Per-epoch history of ``metric`` for every run: columns run_id, step, value.

    ``search_runs`` only returns a metric's latest value, so the curves need one history call per run.
    A step logged twice keeps its last value.
    """
    client, _ = open_client(runset.tracking_uri)
    rows = []
    for run_id in runset.runs["run_id"]:
        history = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
        last = {m.step: m.value for m in history}
        rows.extend({"run_id": run_id, "step": s, "value": v} for s, v in last.items())
    return pd.DataFrame(rows, columns=["run_id", "step", "value"])
