"""Sweeps in one process with the contract-following fake experiment (tests/sweeps_fakes.py): failing
trials, repeats, pruning, resume, and the MLflow records that tie runs to trials."""

from __future__ import annotations

import statistics

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from sweeps_fakes import fake_experiment, fake_score

from bench import schema
from sweeps.runner import run_sweep
from sweeps.spec import apply_params, parse_spec
from sweeps.study import create_or_load, open_storage

EXPERIMENT = "fusebench-tests"


def _spec(space, **extra):
    raw = {"base": {"experiment": EXPERIMENT, "finetune": {"epochs": 2}}, "space": space,
           "objectives": [{"metric": "fused_acc_best_val", "direction": "maximize"}], "sampler": "grid"}
    raw.update(extra)
    return parse_spec(yaml.safe_load(yaml.safe_dump(raw)), source="test-spec")


def _runs_of(client, parent):
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _sweep(spec, tmp_path, uri, **kw):
    return run_sweep(spec, tracking_uri=uri, runs_dir=tmp_path / "runs", experiment_fn=fake_experiment,
                     out=None, **kw)


def test_failing_trials_end_fail_with_reason_and_the_sweep_goes_on(tmp_path, mlflow_uri):
    spec = _spec({"members.n": {"type": "int", "low": 2, "high": 3},
                  "fusion.options.fake_fail": {"type": "categorical", "choices": ["no", "nan", "oom"]}})
    result = _sweep(spec, tmp_path, mlflow_uri, study_name="failing")
    study = optuna.load_study(study_name="failing", storage=open_storage(None, "failing", tmp_path / "runs").storage)
    trials = study.get_trials()
    assert len(trials) == 6 and result.counts["counted"] == 6
    client = MlflowClient(mlflow_uri)
    runs = {r.data.tags["fusebench.trial"]: r for r in _runs_of(client, result.parent_run_id)}
    assert len(runs) == 6
    for t in trials:
        run = runs[str(t.number)]
        assert t.user_attrs["fusebench.run_ids"] == [run.info.run_id]
        kind = t.params["fusion.options.fake_fail"]
        if kind == "no":
            assert t.state == optuna.trial.TrialState.COMPLETE
            cfg = apply_params(spec.base, {"members.n": t.params["members.n"]})
            assert t.value == pytest.approx(fake_score(cfg))
            assert run.info.status == "FINISHED" and run.data.tags["fusebench.trial_state"] == "COMPLETE"
        else:
            expected = "FloatingPointError: fine-tune loss is NaN" if kind == "nan" else "OutOfMemoryError: CUDA out of memory"
            assert t.state == optuna.trial.TrialState.FAIL
            assert t.user_attrs[schema.TRIAL_ERROR_ATTR].startswith(expected)
            assert run.info.status == "FAILED" and run.data.tags["fusebench.trial_state"] == "FAIL"
            assert run.data.tags["fusebench.error"].startswith(expected)
        assert run.data.tags["fusebench.study"] == "failing"
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["fusebench.role"] == "study" and parent.data.tags["fusebench.study"] == "failing"
    assert parent.data.metrics["trials_failed"] == 4 and parent.data.metrics["trials_complete"] == 2


def test_repeats_average_seeds_and_keep_every_run(tmp_path, mlflow_uri):
    spec = _spec({"fusion.method": {"type": "categorical", "choices": ["nt", "avg"]}}, repeats=3)
    result = _sweep(spec, tmp_path, mlflow_uri, study_name="repeats")
    study = optuna.load_study(study_name="repeats", storage=open_storage(None, "repeats", tmp_path / "runs").storage)
    client = MlflowClient(mlflow_uri)
    for t in study.get_trials():
        scores = [fake_score({**apply_params(spec.base, t.params), "seed": s}) for s in range(3)]
        assert t.value == pytest.approx(statistics.fmean(scores))
        assert t.user_attrs["fused_acc_best_val.values"] == pytest.approx(scores)
        assert t.user_attrs["fused_acc_best_val.std"] == pytest.approx(statistics.stdev(scores))
        ids = t.user_attrs["fusebench.run_ids"]
        assert len(ids) == 3
        seeds = [client.get_run(i).data.tags["fusebench.seed"] for i in ids]
        assert seeds == ["0", "1", "2"]
    assert len(_runs_of(client, result.parent_run_id)) == 6


def test_pruned_trials_end_killed(tmp_path, mlflow_uri):
    spec = _spec({"members.n": {"type": "categorical", "choices": [4, 3, 2]}}, sampler="random", n_trials=3,
                 pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    # queue the best configuration first: the next two fall below its curve at epoch 1 and are pruned
    info = open_storage(None, "pruning", tmp_path / "runs")
    study = create_or_load(info, "pruning", ["maximize"])
    for n in (4, 3, 2):
        study.enqueue_trial({"members.n": n})
    result = _sweep(spec, tmp_path, mlflow_uri, study_name="pruning")
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"]
    client = MlflowClient(mlflow_uri)
    runs = {r.data.tags["fusebench.trial"]: r for r in _runs_of(client, result.parent_run_id)}
    assert [runs[str(i)].info.status for i in range(3)] == ["FINISHED", "KILLED", "KILLED"]
    assert runs["1"].data.tags["fusebench.trial_state"] == "PRUNED"


def test_resume_keeps_trials_reuses_parent_run_and_reaches_new_target(tmp_path, mlflow_uri):
    space = {"members.n": {"type": "int", "low": 2, "high": 16}}
    spec = _spec(space, sampler={"type": "random", "seed": 1}, n_trials=2)
    first = _sweep(spec, tmp_path, mlflow_uri, study_name="resume")
    again = _sweep(spec, tmp_path, mlflow_uri, study_name="resume")  # target already met: nothing runs
    more = _sweep(spec, tmp_path, mlflow_uri, study_name="resume", n_trials=4)
    assert first.parent_run_id == again.parent_run_id == more.parent_run_id
    study = optuna.load_study(study_name="resume", storage=open_storage(None, "resume", tmp_path / "runs").storage)
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3]
    assert study.user_attrs[schema.STUDY_PARENT_RUN_ATTR] == first.parent_run_id
    client = MlflowClient(mlflow_uri)
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    assert len(_runs_of(client, first.parent_run_id)) == 4


def test_multi_objective_study(tmp_path, mlflow_uri):
    spec = _spec({"members.n": {"type": "int", "low": 2, "high": 4}},
                 objectives=[{"metric": "fused_acc_best_val", "direction": "maximize"},
                             {"metric": "fusion_time_s", "direction": "minimize"}])
    _sweep(spec, tmp_path, mlflow_uri, study_name="pareto")
    study = optuna.load_study(study_name="pareto", storage=open_storage(None, "pareto", tmp_path / "runs").storage)
    assert len(study.get_trials()) == 3
    for t in study.get_trials():
        cfg = apply_params(spec.base, t.params)
        assert t.values == pytest.approx([fake_score(cfg), 0.01 * cfg["members"]["n"]])


def test_stale_recovery_tells_dead_live_reused_and_foreign_workers_apart(tmp_path):
    import os
    import socket

    from sweeps.study import _redact as redact
    from sweeps.study import count_trials, recover_stale_trials, worker_identity

    info = open_storage(None, "stale", tmp_path / "runs")
    study = create_or_load(info, "stale", ["maximize"])
    me = worker_identity()
    owners = {
        "alive": me,
        "reused_pid": {**me, "pid_start": "not-the-same-process"},
        "dead": {"host": me["host"], "pid": 2**22 + 12345, "pid_start": None},
        "foreign": {"host": socket.gethostname() + "-other", "pid": 2**22 + 12345, "pid_start": None},
    }
    trials = {}
    for name, owner in owners.items():
        trial = study.ask()
        trial.suggest_int("members.n", 2, 9)
        trial.set_user_attr(schema.TRIAL_WORKER_ATTR, owner)
        trials[name] = trial.number
    recovered = {t.number for t in recover_stale_trials(study)}
    assert recovered == {trials["reused_pid"], trials["dead"]}
    assert recover_stale_trials(study) == []  # idempotent: nothing left to recover
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[trials["alive"]].state.name == "RUNNING" and by_number[trials["foreign"]].state.name == "RUNNING"
    retries = [t for t in by_number.values() if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == sorted(recovered)
    for r in retries:
        assert r.params == by_number[r.system_attrs["failed_trial"]].params
        assert schema.TRIAL_WORKER_ATTR not in r.user_attrs  # a retry must not look stale again
    counts = count_trials(study)
    assert counts["FAIL"] == 2 and counts["counted"] == 0  # replaced by their retries
    assert os.getpid() == me["pid"]
    assert redact("postgresql://optuna:s3cret@db:5432/optuna") == "postgresql://optuna:***@db:5432/optuna"
