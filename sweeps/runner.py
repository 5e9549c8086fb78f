"""Run a sweep: open or resume the study, recover crashed trials, run K workers, close the books.

Counting rule (so a resumed or parallel sweep stops at the same place as an uninterrupted one): a study
is done when its finished trials (COMPLETE, PRUNED, FAIL; a failed trial that was re-queued counts
through its retry instead) reach the target. Workers check that count, plus the trials other workers
are running, under a per-study lock file and hold the lock until their new trial has its params, so
local workers never overshoot the target nor draw the same grid point twice.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna

from bench import schema
from bench.errors import FusebenchError
from sweeps.spec import SweepSpec
from sweeps.study import (
    HEARTBEAT_INTERVAL_S,
    count_trials,
    create_or_load,
    open_storage,
    recover_stale_trials,
)

WAIT_POLL_S = 5.0  # how often a resume re-checks trials that other workers hold


@dataclass
class SweepResult:
    study_name: str
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    counts: dict[str, int]
    target: int
    wall_time_s: float
    recovered: list[int] = field(default_factory=list)


class _Gate:
    """An exclusive lock file shared by the workers of one study on this machine."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@dataclass
class _WorkerJob:
    """Everything a worker process needs (pickled for the spawn start method)."""

    spec: SweepSpec
    study_name: str
    storage: str | None
    runs_dir: str
    target: int
    deadline: float | None
    parent_run_id: str
    tracking_uri: str
    worker: int
    experiment_fn: Callable | None


def _default_experiment_fn() -> Callable:
    from bench.experiment import run_experiment

    return run_experiment


def _quiet_optuna() -> None:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_worker(job: _WorkerJob) -> int:
    """Run trials until the study reaches its target or the deadline passes; returns trials run here."""
    _quiet_optuna()
    from bench.tracking import experiment_id, open_client
    from sweeps.objective import Objective
    from sweeps.search import make_pruner, make_sampler

    info = open_storage(job.storage, job.study_name, job.runs_dir)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=info.storage,
        sampler=make_sampler(job.spec, worker=job.worker),
        pruner=make_pruner(job.spec),
    )
    client, _ = open_client(job.tracking_uri)
    exp_id = experiment_id(client, job.spec.base["experiment"])
    gate = _Gate(Path(job.runs_dir) / f"{job.study_name}.lock")
    objective = Objective(
        job.spec,
        study_name=job.study_name,
        parent_run_id=job.parent_run_id,
        experiment_fn=job.experiment_fn or _default_experiment_fn(),
        tracking=(client, exp_id),
        on_start=gate.release,
    )
    ran = 0
    while job.deadline is None or time.time() < job.deadline:
        gate.acquire()
        try:
            counts = count_trials(study)
            if counts["counted"] + counts["RUNNING"] >= job.target:
                break
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            ran += 1
        finally:
            gate.release()
    return ran


def _worker_entry(job: _WorkerJob) -> None:
    """Process entry point: a worker's own errors end the process non-zero, the sweep goes on."""
    run_worker(job)


def _print(out: TextIO | None, text: str) -> None:
    if out is not None:
        print(text, file=out, flush=True)


def run_sweep(
    spec: SweepSpec,
    *,
    study_name: str | None = None,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    tracking_uri: str | None = None,
    runs_dir: str | Path = "runs",
    experiment_fn: Callable | None = None,
    out: TextIO | None = sys.stdout,
) -> SweepResult:
    """Create or resume the study and run it to its target; see the module docstring.

    ``experiment_fn`` defaults to ``bench.experiment.run_experiment``; with ``workers > 1`` it must be
    picklable (a module-level function), since workers are spawned processes.
    """
    _quiet_optuna()
    from bench.tracking import experiment_id, open_client
    from sweeps.search import make_pruner, make_sampler
    from sweeps.tracking import close_orphan_runs, ensure_parent_run, finish_parent_run

    t0 = time.time()
    if workers < 1:
        raise FusebenchError(f"--workers must be >= 1, got {workers}")
    study_name = study_name or spec.study
    target = n_trials if n_trials is not None else spec.target_trials()
    if n_trials is not None and spec.sampler["type"] in ("grid", "bruteforce"):
        target = min(n_trials, spec.grid_size())
    timeout = timeout if timeout is not None else spec.timeout
    deadline = t0 + timeout if timeout else None
    # --tracking-uri, else the base config's, else MLFLOW_TRACKING_URI, else MLflow's default; every trial
    # logs there too (the objective puts it in the trial's config)
    client, uri = open_client(tracking_uri, spec.base["tracking_uri"])
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)

    info = open_storage(storage, study_name, runs, workers=workers)
    study = create_or_load(
        info,
        study_name,
        spec.directions,
        make_sampler(spec),
        make_pruner(spec),
        [o.metric for o in spec.objectives],
    )
    exp_id = experiment_id(client, spec.base["experiment"])
    parent = ensure_parent_run(client, exp_id, study, spec, info.url)
    before = count_trials(study)
    _print(
        out,
        f"study '{study_name}' ({info.kind}: {info.url}): {before['counted']}/{target} trials done"
        f"{', resuming' if before['total'] else ''}; MLflow parent run {parent} at {uri}",
    )

    recovered: list[int] = []
    status = "FINISHED"
    try:
        while True:
            # a worker of this machine that died (SIGKILL, OOM): its trial ends FAIL at once, on every storage;
            # on a database, trials of other machines end FAIL once their heartbeat is stale
            stale = recover_stale_trials(study)
            if info.kind == "rdb":
                stale += fail_stale_heartbeats(study)
            recovered += [t.number for t in stale]
            for t in stale:
                _print(out, f"trial {t.number}: its worker died; marked FAIL and re-queued")
            close_orphan_runs(client, exp_id, parent, study)
            counts = count_trials(study)
            if counts["counted"] >= target or (deadline is not None and time.time() >= deadline):
                break
            job = _WorkerJob(
                spec,
                study_name,
                storage if storage is not None else info.url,
                str(runs),
                target,
                deadline,
                parent,
                uri,
                0,
                experiment_fn,
            )
            if workers == 1:
                run_worker(job)
            else:
                _run_processes(job, workers, out)
            after = count_trials(study)
            if after["counted"] == counts["counted"] and not recover_needed(study):
                if not waiting_on_others(study, info.kind, after, target):
                    break  # no progress and nothing to recover (e.g. every worker failed to start)
                # live workers elsewhere hold the last trials: wait for them to finish, or go stale
                _print(out, f"waiting for {after['RUNNING']} trial(s) running on other workers")
                time.sleep(min(HEARTBEAT_INTERVAL_S, WAIT_POLL_S))
    except KeyboardInterrupt:
        status = "KILLED"
        try:
            _requeue_interrupted(study)
        except Exception as exc:  # noqa: BLE001 - the interruption and its summary come first
            _print(
                sys.stderr, f"fusebench sweep: warning: could not queue the interrupted trial again: {exc}"
            )
        done = count_trials(study)
        _print(
            out,
            f"\ninterrupted: study '{study_name}' has {done['counted']}/{target} trials done "
            f"({done['COMPLETE']} complete, {done['PRUNED']} pruned, {done['FAIL']} failed); "
            "the trial that was running ended FAIL, its MLflow run KILLED. The same command resumes.",
        )
        raise
    finally:
        counts = count_trials(study)
        try:
            finish_parent_run(client, parent, study, counts, status=status)
        except Exception as exc:  # noqa: BLE001 - do not hide the sweep's own outcome
            _print(sys.stderr, f"fusebench sweep: warning: could not end the MLflow parent run: {exc}")
    return SweepResult(study_name, info.url, uri, parent, counts, target, time.time() - t0, recovered)


def _requeue_interrupted(study: optuna.Study) -> None:
    """Trials this process was running when Ctrl-C came ended FAIL (Optuna's doing); the interruption was
    the user's, not the configuration's: queue them again, so the same command runs them on resume."""
    from sweeps.study import requeue, retried_numbers

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for t in trials:
        owner = t.user_attrs.get(schema.TRIAL_WORKER_ATTR) or {}
        if (
            t.state == optuna.trial.TrialState.FAIL
            and owner.get("pid") == os.getpid()
            and t.number not in retried
        ):
            requeue(study, t)


def recover_needed(study: optuna.Study) -> bool:
    """Whether a RUNNING trial was left behind by a worker of this machine that is gone (any storage)."""
    import socket

    from sweeps.study import process_alive

    host = socket.gethostname()
    return any(
        schema.TRIAL_WORKER_ATTR in t.user_attrs
        and t.user_attrs[schema.TRIAL_WORKER_ATTR].get("host") == host
        and not process_alive(t.user_attrs[schema.TRIAL_WORKER_ATTR])
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    )


def waiting_on_others(study: optuna.Study, kind: str, counts: dict[str, int], target: int) -> bool:
    """On a database with heartbeats, RUNNING trials of live workers (here or on other machines) will end
    COMPLETE, or FAIL once their heartbeat goes stale: worth waiting for when the target needs them. A
    journal file has no heartbeat, so a trial of another machine cannot be judged from here."""
    return kind == "rdb" and counts["RUNNING"] > 0 and counts["counted"] < target


def fail_stale_heartbeats(study: optuna.Study) -> list:
    """RUNNING trials whose heartbeat is older than the grace period end FAIL (Optuna's own check; its
    stale-trial callback re-queues them). Returns the trials it failed."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    if not running:
        return []
    optuna.storages.fail_stale_trials(study)
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if t.number in running
    ]


def _run_processes(job: _WorkerJob, workers: int, out: TextIO | None) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(workers):
        w = _WorkerJob(**{**job.__dict__, "worker": i})
        p = ctx.Process(target=_worker_entry, args=(w,), name=f"fusebench-sweep-worker-{i}")
        p.start()
        procs.append(p)
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
        raise
    for i, p in enumerate(procs):
        if p.exitcode != 0:
            _print(out, f"fusebench sweep: warning: worker {i} exited with code {p.exitcode}")


def trials_table(study: optuna.Study, limit: int = 20) -> Any:
    """Fallback leaderboard: a compact pandas table of the trials, best first."""
    import pandas as pd

    from sweeps.objective import trial_summary

    rows = [trial_summary(t) for t in study.get_trials(deepcopy=False)]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    if len(study.directions) == 1 and "value" in frame:
        ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
        frame = frame.sort_values("value", ascending=ascending, na_position="last")
    return frame.head(limit).reset_index(drop=True)
