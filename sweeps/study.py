"""Where a study lives, how it is created or resumed, and how trials orphaned by a crash are recovered.

Storage choice: SQLite locks up under parallel writers ("database is locked"), so one machine uses Optuna's
journal file (many processes, no server) and many machines use PostgreSQL through RDBStorage, whose
heartbeats fail stale trials and re-queue them. The journal has no heartbeat, so each trial records
which process runs it (host, pid, process start time) and :func:`recover_stale_trials` fails and
re-queues the trials whose process is gone, at every start: nothing stays RUNNING forever.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from bench import schema
from bench.errors import FusebenchError

MAX_RETRY = 2  # re-queues of one configuration after its worker died
# A RUNNING trial with no worker record this old was orphaned between creation and its first line.
NO_OWNER_GRACE_S = 300.0
HEARTBEAT_INTERVAL_S = int(os.environ.get("FUSEBENCH_HEARTBEAT_S", "60"))
GRACE_PERIOD_S = int(os.environ.get("FUSEBENCH_HEARTBEAT_GRACE_S", str(2 * HEARTBEAT_INTERVAL_S)))
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class StorageInfo:
    """An opened storage plus what to show the user (and log) about it."""

    storage: optuna.storages.BaseStorage
    url: str  # printable location: journal file path or URL without password
    kind: str  # "journal" | "rdb"
    runs_dir: Path


def _redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (never log a password)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


def _postgres_driver() -> str:
    """SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; use psycopg2 when only it is installed
    (the ``postgres`` extra ships psycopg2-binary)."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        return "psycopg"
    return "psycopg2"


def open_storage(
    url: str | None, study_name: str, runs_dir: str | Path = "runs", *, workers: int = 1
) -> StorageInfo:
    """``None`` -> journal file ``<runs_dir>/<study>.journal``; ``*.journal`` path -> that journal;
    ``postgresql://`` / ``mysql://`` -> RDB with heartbeats; ``sqlite://`` only for a single worker."""
    runs = Path(runs_dir)
    if url is None or "://" not in url:
        path = Path(url) if url else runs / f"{study_name}.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return StorageInfo(optuna.storages.journal.JournalStorage(backend), str(path), "journal", runs)
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme not in ("postgresql", "postgres", "mysql", "sqlite"):
        raise FusebenchError(
            f"--storage {_redact(url)}: unsupported scheme '{scheme}'; use postgresql://..., "
            "mysql://..., or a journal file path"
        )
    if scheme == "sqlite" and workers > 1:
        raise FusebenchError(
            "--storage sqlite:// cannot be shared by parallel workers (database is locked); "
            "leave --storage out to use a journal file, or use postgresql://"
        )
    shown = _redact(url)
    if url.startswith(("postgres://", "postgresql://")):
        url = "postgresql+" + _postgres_driver() + "://" + url.split("://", 1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True} if scheme != "sqlite" else None,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except ImportError as exc:
            raise FusebenchError(
                f"--storage {_redact(url)}: database driver missing ({exc}); "
                "pip install 'fusebench[postgres]'"
            ) from None
        except Exception as exc:  # noqa: BLE001 - connection problems are the user's to fix
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FusebenchError(
                f"--storage {_redact(url)}: cannot open the study database: {first}"
            ) from None
    return StorageInfo(storage, shown, "rdb", runs)


def create_or_load(
    info: StorageInfo,
    study_name: str,
    directions: list[str],
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    metric_names: list[str] | None = None,
) -> optuna.Study:
    """Create the study, or resume it (``load_if_exists``) after checking it optimizes the same thing.
    ``metric_names`` name the objectives (optuna-dashboard shows them instead of "Objective 0")."""
    study = optuna.create_study(
        storage=info.storage,
        study_name=study_name,
        directions=directions,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    have = [d.name.lower() for d in study.directions]
    if have != list(directions):
        raise FusebenchError(
            f"study '{study_name}' in {info.url} optimizes {have}, the spec asks for "
            f"{list(directions)}; use another --study name"
        )
    if metric_names and study.metric_names != list(metric_names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
    return study


# -- process identity -----------------------------------------------------------------------------


def _pid_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, Linux); tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its closing parenthesis
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid)}


def process_alive(owner: dict[str, Any]) -> bool:
    """Whether the process recorded in ``owner`` (a trial's worker attr) still runs on this host."""
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    start = owner.get("pid_start")
    now = _pid_start(pid)
    if start is not None and now is not None and start != now:
        return False  # the pid was reused by an unrelated process
    # a zombie (killed child not yet reaped) is dead for our purpose
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return True


def recover_stale_trials(study: optuna.Study, *, host: str | None = None) -> list[FrozenTrial]:
    """Fail RUNNING trials whose worker process on this host is gone, and re-queue their params.

    Returns the trials that were failed. Trials run from another host cannot be checked here and are
    left alone (journal files on one machine only; PostgreSQL has heartbeats for that case).
    Two processes recovering at once is safe: only one can move a trial out of RUNNING.
    """
    host = host or socket.gethostname()
    recovered = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(schema.TRIAL_WORKER_ATTR)
        if owner is None:
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - started < NO_OWNER_GRACE_S:
                continue
            reason = f"worker unknown, trial RUNNING for {now - started:.0f} s without an owner"
        elif owner.get("host") != host or process_alive(owner):
            continue
        else:
            reason = f"worker process {owner.get('pid')} on {owner.get('host')} died during the trial"
        failed = _fail(study, trial, reason)
        if failed is not None:
            requeue(study, failed)
            recovered.append(failed)
    return recovered


def _fail(study: optuna.Study, trial: FrozenTrial, reason: str) -> FrozenTrial | None:
    """End another (dead) process's RUNNING trial FAIL with ``reason`` as its error attr; None when another
    process got there first. Optuna has no public call for this: ``study.tell(number, state=FAIL)`` cannot
    attach the reason and runs this process's sampler hook (BruteForceSampler may stop the study), so the
    storage is written directly, exactly as Optuna's own ``fail_stale_trials`` does."""
    storage, trial_id = study._storage, trial._trial_id
    try:
        storage.set_trial_user_attr(trial_id, schema.TRIAL_ERROR_ATTR, reason)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None  # another process recovered (or the trial finished) first
    return storage.get_trial(trial_id)


def requeue(study: optuna.Study, failed: FrozenTrial) -> bool:
    """Queue the failed trial's params again, with the system attrs RetryHeartbeatStaleTrialCallback
    uses (``failed_trial``, ``retry_history``), so both storages describe retries the same way.

    Unlike that callback, our own ``fusebench.*`` user attrs are not copied: a retry must not inherit
    the dead worker's identity (it would look stale again) nor its error.
    """
    history = [int(n) for n in failed.system_attrs.get("retry_history", [])] + [failed.number]
    if len(history) > MAX_RETRY:
        return False
    system_attrs = {**failed.system_attrs, "failed_trial": history[0], "retry_history": history}
    user_attrs = {k: v for k, v in failed.user_attrs.items() if not k.startswith(schema.PREFIX)}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )
    return True


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries (they are replaced, not counted)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", []))
    return out


def count_trials(study: optuna.Study) -> dict[str, int]:
    """Counts used to decide when the study is done: ``counted`` is finished trials minus retried ones."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    out = {s.name: 0 for s in TrialState}
    counted = 0
    for t in trials:
        out[t.state.name] += 1
        if t.state in COUNTED_STATES and t.number not in retried:
            counted += 1
    out["counted"] = counted
    out["total"] = len(trials)
    return out
