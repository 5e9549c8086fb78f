"""Synthetic fusebench runs written to a throwaway MLflow store, following design.md §3 exactly.

The values are drawn at random and returned as plain records, so the dashboard tests can recompute
every leaderboard number independently (with numpy) from what was logged rather than from what the
dashboards read back. Members are shared the way real runs share them: the ensemble and best-member
accuracies depend on (dataset, arch, N, seed) only, the fine-tuned best member also on the budget.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

DATASET = "digits"
WIDTH = {2: 64, 4: 128}  # width varies with N so the cost plot has a width axis


def _arch(n: int) -> str:
    return f"mlp-{WIDTH[n]}x2"


def make_store(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


def create_experiment(client: MlflowClient, name: str, tmp: Path) -> str:
    return client.create_experiment(name, artifact_location=(tmp / "artifacts" / name).as_uri())


def log_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    method: str,
    n: int,
    epochs: int,
    seed: int,
    sparsity: str,
    base: dict,
    rng: np.random.Generator,
    study: str | None = None,
    parent_run_id: str | None = None,
    trial: int | None = None,
    drop_metrics: tuple[str, ...] = (),
    status: str = "FINISHED",
) -> dict:
    """One experiment run; returns everything logged (metrics, curve)."""
    start = {"nt": 0.78, "ot": 0.7, "avg": 0.35}.get(method, 0.6)
    curve = [float(np.clip(start + rng.normal(0, 0.04), 0, 1))]
    for _ in range(epochs):
        curve.append(float(min(1.0, curve[-1] + (0.97 - curve[-1]) * rng.uniform(0.2, 0.5))))
    val = [float(min(1.0, c + rng.normal(0, 0.01))) for c in curve]
    best_epoch = int(np.argmax(val))
    metrics = {
        "ensemble_acc": base["ensemble_acc"],
        "best_member_acc": base["best_member_acc"],
        "members_mean_acc": base["members_mean_acc"],
        "best_member_ft_acc": base["best_member_ft_acc"][epochs],
        **{f"member_{i}_acc": a for i, a in enumerate(base["members"])},
        "fused_acc_before_ft": curve[0],
        "fused_acc_final": curve[-1],
        "fused_acc_best_val": curve[best_epoch],
        "fusion_time_s": float(rng.lognormal({"avg": -5, "nt": -3, "ot": 0}[method] + 0.3 * n, 0.2)),
        "fusion_peak_mem_mb": float(rng.uniform(5, 50) * n),
        "member_params": float(base["member_params"]),
        "fused_params": float(base["member_params"]),
    }
    metrics["gain_over_best_member"] = metrics["fused_acc_best_val"] - base["best_member_acc"]
    metrics["gain_over_ensemble"] = metrics["fused_acc_best_val"] - base["ensemble_acc"]
    for name in drop_metrics:
        metrics.pop(name, None)
    tags = {
        "fusebench.role": "experiment",
        "fusebench.method": method,
        "fusebench.arch": _arch(n),
        "fusebench.dataset": DATASET,
        "fusebench.n_members": str(n),
        "fusebench.sparsity": sparsity,
        "fusebench.finetune_epochs": str(epochs),
        "fusebench.seed": str(seed),
        "fusebench.device": "cpu",
    }
    if study is not None:
        tags.update(
            {"fusebench.study": study, "fusebench.trial": str(trial), "fusebench.trial_state": "COMPLETE"}
        )
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    params = {
        "data.name": DATASET,
        "model.arch": "mlp",
        "model.width": str(WIDTH[n]),
        "model.depth": "2",
        "members.n": str(n),
        "fusion.method": method,
        "fusion.options.sparsity": sparsity or "None",
        "finetune.epochs": str(epochs),
        "seed": str(seed),
    }
    run = client.create_run(experiment_id, run_name=f"{method}-N{n}-E{epochs}-s{seed}")
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in metrics.items()]
    if "fused_acc" not in drop_metrics:
        batch += [Metric("fused_acc", v, now + s, s) for s, v in enumerate(curve)]
        batch += [Metric("fused_val_acc", v, now + s, s) for s, v in enumerate(val)]
        if n == 2 and method == "ot":  # the linear path between the two aligned members (fusion.lmc)
            a0, a1 = base["members"][0], base["members"][1]
            dip = float(rng.uniform(0.05, 0.3))
            path = [(1 - a) * a0 + a * a1 - dip * 4 * a * (1 - a) for a in (0, 0.25, 0.5, 0.75, 1)]
            batch += [
                Metric("lmc_acc", v, now + i, round(100 * a))
                for i, (a, v) in enumerate(zip((0, 0.25, 0.5, 0.75, 1), path))
            ]
            batch.append(Metric("lmc_barrier_acc", dip, now, 0))
    client.log_batch(
        run.info.run_id,
        metrics=batch,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run.info.run_id, status)
    return {
        "run_id": run.info.run_id,
        "method": method,
        "n": n,
        "arch": _arch(n),
        "epochs": epochs,
        "seed": seed,
        "sparsity": sparsity,
        "metrics": metrics,
        "curve": curve,
        "status": status,
    }


def baselines(rng: np.random.Generator, ns, seeds, epochs) -> dict:
    """Member-derived numbers per (N, seed): what real runs sharing members would log."""
    out = {}
    for n, seed in itertools.product(ns, seeds):
        members = [float(rng.uniform(0.85, 0.95)) for _ in range(n)]
        best_ft = {e: float(rng.uniform(0.9, 0.97)) for e in epochs}
        out[(n, seed)] = {
            "members": members,
            "members_mean_acc": float(np.mean(members)),
            "best_member_acc": max(members),
            "ensemble_acc": float(max(members) + rng.uniform(0.0, 0.03)),
            "best_member_ft_acc": best_ft,
            "member_params": 64 * 64 * n + 10,
        }
    return out


def write_study(
    tmp: Path,
    *,
    experiment: str = "fb-dash",
    study: str = "dash-study",
    methods=("nt", "avg", "ot"),
    ns=(2, 4),
    epochs=(2, 4),
    seeds=(0, 1, 2),
    storage: str | None = None,
    rng_seed: int = 1234,
) -> tuple[str, list[dict], str]:
    """A study parent run with its trial runs; returns (tracking uri, records, parent run id)."""
    uri = make_store(tmp)
    client = MlflowClient(tracking_uri=uri)
    exp_id = create_experiment(client, experiment, tmp)
    rng = np.random.default_rng(rng_seed)
    base = baselines(rng, ns, seeds, epochs)
    parent = client.create_run(
        exp_id, run_name=study, tags={"fusebench.role": "study", "fusebench.study": study}
    )
    if storage is not None:
        client.set_tag(parent.info.run_id, "fusebench.storage", storage)
    records = []
    for trial, (method, n, e, seed) in enumerate(itertools.product(methods, ns, epochs, seeds)):
        sparsity = repr(1 - 1 / n) if method == "nt" else ""
        records.append(
            log_run(
                client,
                exp_id,
                method=method,
                n=n,
                epochs=e,
                seed=seed,
                sparsity=sparsity,
                base=base[(n, seed)],
                rng=rng,
                study=study,
                parent_run_id=parent.info.run_id,
                trial=trial,
            )
        )
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri, records, parent.info.run_id


def write_optuna_journal(path: Path, study_name: str, n_trials: int = 12) -> str:
    """A small finished Optuna study in a journal file, as the sweeps would leave it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial):
        method = trial.suggest_categorical("method", ["nt", "avg", "ot"])
        n = trial.suggest_categorical("n_members", [2, 4])
        e = trial.suggest_int("finetune_epochs", 0, 4)
        return {"nt": 0.9, "avg": 0.6, "ot": 0.8}[method] + 0.01 * e - 0.005 * n

    study.optimize(objective, n_trials=n_trials)
    return str(path)
