"""The study's MLflow side: one parent run per study, trial-run tags, orphan clean-up.

Everything goes through ``MlflowClient`` with explicit run ids: workers are separate processes, and the
fluent API's process-global "active run" would attach runs to the wrong parent.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from bench import schema
from bench.tracking import search_runs, tag_filter
from sweeps.spec import SweepSpec


def ensure_parent_run(client: MlflowClient, exp_id: str, study, spec: SweepSpec, storage_url: str) -> str:
    """The study's parent run, created once and reused on every resume (its id is a study user attr).

    Several machines starting the same study at the same moment may each create one; each reads the
    id back after writing it, and the ones whose write lost delete their run.
    """

    run_id = study.user_attrs.get(schema.STUDY_PARENT_RUN_ATTR)
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except MlflowException:
            pass  # deleted from MLflow: make a new one
    tags = {
        schema.ROLE: schema.ROLE_STUDY,
        schema.STUDY: study.study_name,
        schema.STORAGE: storage_url,
        schema.MLFLOW_NOTE: spec.description or f"Optuna study {study.study_name} from {spec.source}",
    }
    run = client.create_run(exp_id, tags=tags, run_name=f"study-{study.study_name}")
    mine = run.info.run_id
    study.set_user_attr(schema.STUDY_PARENT_RUN_ATTR, mine)
    # Another machine starting the same study at the same moment may have written its own run id
    # after ours: the last write wins, so read it back and keep exactly one parent run.
    time.sleep(0.2)
    chosen = study.user_attrs.get(schema.STUDY_PARENT_RUN_ATTR, mine)  # read from the storage, not cached
    if chosen != mine:
        client.delete_run(mine)
        client.update_run(chosen, status="RUNNING")
    else:
        _log_spec(client, mine, spec)
    return chosen


def _log_spec(client: MlflowClient, run_id: str, spec: SweepSpec) -> None:
    params = {
        "sweep.sampler": spec.sampler["type"],
        "sweep.pruner": spec.pruner["type"],
        "sweep.objectives": json.dumps([[o.metric, o.direction] for o in spec.objectives]),
        "sweep.repeats": str(spec.repeats),
        "sweep.space": json.dumps(sorted(spec.space)),
    }
    for key, value in params.items():
        client.log_param(run_id, key, value[:6000])
    if spec.text:
        client.log_text(run_id, spec.text, "sweep_spec.yaml")


def mark_trial_runs(client: MlflowClient, runs: list, state: str, error: str | None = None) -> None:
    """Set ``fusebench.trial_state`` on a trial's runs; end the ones a dead worker left RUNNING."""
    for run in runs:
        rid = run.info.run_id
        if run.data.tags.get(schema.TRIAL_STATE) != state:
            client.set_tag(rid, schema.TRIAL_STATE, state)
        if run.info.status == "RUNNING":
            if error and schema.ERROR not in run.data.tags:
                client.set_tag(rid, schema.ERROR, error[:5000])
            client.set_terminated(rid, status="FAILED" if state != "PRUNED" else "KILLED")


def close_orphan_runs(client: MlflowClient, exp_id: str, parent_run_id: str, study) -> int:
    """Trial runs still RUNNING whose Optuna trial is finished (a killed worker): end them FAILED."""

    finished = {t.number: t for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    fixed = 0
    children = search_runs(client, [exp_id], tag_filter(**{schema.MLFLOW_PARENT_RUN: parent_run_id}))
    for run in children:
        if run.info.status != "RUNNING":
            continue
        try:
            number = int(run.data.tags.get(schema.TRIAL, "-1"))
        except ValueError:
            continue
        trial = finished.get(number)
        if trial is None:
            continue
        mark_trial_runs(
            client,
            [run],
            trial.state.name if trial.state.name != "COMPLETE" else "FAIL",
            trial.user_attrs.get(schema.TRIAL_ERROR_ATTR, "worker process ended during the trial"),
        )
        fixed += 1
    return fixed


def finish_parent_run(
    client: MlflowClient, run_id: str, study, counts: dict[str, int], status: str = "FINISHED"
) -> None:
    """Summary metrics on the parent run, then end it (it must never stay RUNNING after the sweep)."""
    now = int(time.time() * 1000)
    metrics: dict[str, Any] = {
        "trials_complete": counts.get("COMPLETE", 0),
        "trials_pruned": counts.get("PRUNED", 0),
        "trials_failed": counts.get("FAIL", 0),
    }
    if len(study.directions) == 1:
        try:
            best = study.best_value
            if best is not None and math.isfinite(best):
                metrics["best_value"] = best
        except ValueError:
            pass  # no completed trial
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
