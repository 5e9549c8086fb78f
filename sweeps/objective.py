"""The Optuna objective: one trial = one configuration run with ``repeats`` member seeds.

Why it catches nothing silently: a failing configuration (NaN loss, out of memory, a method that
refuses an architecture) is a result of the benchmark, not a reason to stop it. The error is written
to the trial (user attr ``fusebench.error``) and to its MLflow runs, then re-raised so Optuna records
the trial FAIL; the runner tells Optuna to go on with the next trial.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import sys
from collections.abc import Callable
from typing import Any

import optuna

from bench import schema
from sweeps.search import sample_params
from sweeps.spec import SweepSpec, apply_params
from sweeps.study import worker_identity


def _stop_experiment_class() -> type[BaseException]:
    from bench.experiment import StopExperiment

    return StopExperiment


def _free_accelerator_memory() -> None:
    """After an out-of-memory trial, give cached GPU blocks back so the next trial starts clean."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Objective:
    """Callable objective bound to one study; built in each worker process."""

    def __init__(
        self,
        spec: SweepSpec,
        *,
        study_name: str,
        parent_run_id: str,
        experiment_fn: Callable,
        tracking,
        on_start: Callable[[], None] | None = None,
    ):
        self.spec = spec
        self.study_name = study_name
        self.parent_run_id = parent_run_id
        self.experiment_fn = experiment_fn
        self.tracking = tracking  # (MlflowClient, experiment id)
        self.on_start = on_start

    def _epoch_callback(self, trial: optuna.Trial) -> Callable[[int, float], None]:
        stop = _stop_experiment_class()

        def report(epoch: int, val_acc: float) -> None:
            trial.report(float(val_acc), int(epoch))
            if trial.should_prune():
                raise stop(f"pruned by Optuna at fine-tune epoch {epoch} (fused_val_acc={val_acc:.4f})")

        return report

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr(schema.TRIAL_WORKER_ATTR, worker_identity())
        try:
            params = sample_params(trial, self.spec)
        finally:
            if self.on_start is not None:
                self.on_start()  # the trial exists and has its params: other workers may start theirs
        stop = _stop_experiment_class()
        run_ids: list[str] = []
        state, error = "FAIL", None
        try:
            cfg = apply_params(self.spec.base, params, source=f"{self.spec.source}: trial {trial.number}")
            cfg["tracking_uri"] = self.tracking[0].tracking_uri  # where the study's parent run lives
            per_seed: list[dict[str, float]] = []
            for repeat in range(self.spec.repeats):
                seed_cfg = copy.deepcopy(cfg)
                seed_cfg["seed"] = int(cfg["seed"]) + repeat
                tags = {
                    schema.STUDY: self.study_name,
                    schema.TRIAL: str(trial.number),
                    schema.TRIAL_STATE: "RUNNING",
                    schema.REPEAT: str(repeat),
                }
                # Pruning compares trials epoch by epoch: only the first seed reports, so every
                # trial's curve means the same thing.
                prune = self.spec.pruner["type"] != "none" and repeat == 0
                result = self.experiment_fn(
                    seed_cfg,
                    parent_run_id=self.parent_run_id,
                    extra_tags=tags,
                    epoch_callback=self._epoch_callback(trial) if prune else None,
                )
                run_ids.append(result.run_id)
                trial.set_user_attr(schema.TRIAL_RUN_IDS_ATTR, list(run_ids))
                per_seed.append(self._objective_metrics(result.metrics))
            values = self._aggregate(trial, per_seed)
            state = "COMPLETE"
            return values[0] if len(values) == 1 else values
        except stop as exc:
            state = "PRUNED"
            self._failed_run(trial, run_ids, exc)
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr(schema.TRIAL_ERROR_ATTR, error[:2000])
            self._failed_run(trial, run_ids, exc)
            if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc):
                _free_accelerator_memory()
            raise
        except BaseException as exc:  # Ctrl-C: the trial ends FAIL, its run KILLED (by run_experiment)
            self._failed_run(trial, run_ids, exc)
            raise
        finally:
            self._finish_runs(trial, run_ids, state, error)

    @staticmethod
    def _failed_run(trial: optuna.Trial, run_ids: list[str], exc: BaseException) -> None:
        """The run of the seed that raised: ``run_experiment`` attaches its id to the exception (none
        when it failed before creating a run)."""
        run_id = getattr(exc, "fusebench_run_id", None)
        if run_id and run_id not in run_ids:
            run_ids.append(run_id)
            trial.set_user_attr(schema.TRIAL_RUN_IDS_ATTR, list(run_ids))

    def _objective_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        out = {}
        for obj in self.spec.objectives:
            if obj.metric not in metrics:
                raise KeyError(
                    f"the experiment logged no metric '{obj.metric}' (objective of {self.spec.source})"
                )
            out[obj.metric] = float(metrics[obj.metric])
        return out

    def _aggregate(self, trial: optuna.Trial, per_seed: list[dict[str, float]]) -> list[float]:
        """Mean over seeds is the objective; per-seed values and the std go to user attrs (mean ± std)."""
        values = []
        for obj in self.spec.objectives:
            xs = [row[obj.metric] for row in per_seed]
            if any(math.isnan(x) for x in xs):
                raise ValueError(
                    f"objective metric '{obj.metric}' is NaN for seed(s) "
                    f"{[i for i, x in enumerate(xs) if math.isnan(x)]}"
                )
            mean = statistics.fmean(xs)
            trial.set_user_attr(f"{obj.metric}.values", xs)
            trial.set_user_attr(f"{obj.metric}.std", statistics.stdev(xs) if len(xs) > 1 else 0.0)
            values.append(mean)
        return values

    def _finish_runs(self, trial: optuna.Trial, run_ids: list[str], state: str, error: str | None) -> None:
        """Tag every run of the trial with its final state."""
        from sweeps.tracking import mark_trial_runs

        client, _ = self.tracking
        try:
            mark_trial_runs(client, [client.get_run(rid) for rid in run_ids], state, error)
        except Exception as exc:  # noqa: BLE001 - tracking trouble must not turn a result into a failure
            print(
                f"fusebench sweep: warning: could not tag the MLflow runs of trial {trial.number}: {exc}",
                file=sys.stderr,
            )


def trial_summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One row of the fallback leaderboard."""
    row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
    if trial.values:
        for i, v in enumerate(trial.values):
            row[f"value{i}" if len(trial.values) > 1 else "value"] = v
    row.update(trial.params)
    if trial.user_attrs.get(schema.TRIAL_ERROR_ATTR):
        row["error"] = str(trial.user_attrs[schema.TRIAL_ERROR_ATTR])[:60]
    return row
