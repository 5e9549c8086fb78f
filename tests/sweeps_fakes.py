"""A stand-in for ``bench.experiment.run_experiment`` that follows its contract (docs/design.md §2/§3)
without training anything, so sweep tests exercise Optuna, MLflow and processes in well under a second
per trial. It creates a real MLflow child run under the given parent, calls the epoch callback, logs
the schema's metrics, and ends the run FINISHED / KILLED (StopExperiment) / FAILED (any error), the run id
attached to the exception as ``exc.fusebench_run_id``.

Behaviour switches (all optional):
- ``fusion.options.fake_fail``: ``"nan"`` raises like a NaN fine-tune loss, ``"oom"`` raises
  ``torch.OutOfMemoryError``;
- env ``FAKE_BLOCK_TRIAL=<n>`` + ``FAKE_MARKER_DIR=<dir>``: trial n writes ``<dir>/started-<n>`` and
  then sleeps (until killed), so a test can SIGKILL the sweep in the middle of that trial;
- env ``FAKE_SLEEP_S``: every experiment sleeps this long;
- env ``FAKE_BARRIER_DIR``: each trial's first experiment writes ``<dir>/trial-<n>`` and waits (up to
  60 s) until two such files exist, so two workers provably run trials at the same time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from bench.experiment import ExperimentResult, StopExperiment


def fake_score(cfg: dict) -> float:
    """A deterministic accuracy that depends on the config, so objectives can be recomputed in tests."""
    n = cfg["members"]["n"]
    bonus = {"nt": 0.05, "avg": 0.0, "ot": 0.03}.get(cfg["fusion"]["method"], 0.0)
    sparsity = float(cfg["fusion"]["options"].get("sparsity", 0.0))
    return round(
        0.5 + 0.04 * n + bonus - 0.02 * sparsity + 0.01 * cfg["finetune"]["epochs"] + 0.001 * cfg["seed"], 6
    )


def fake_experiment(config: dict, *, parent_run_id=None, extra_tags=None, epoch_callback=None):
    client = MlflowClient(tracking_uri=config["tracking_uri"])
    exp = client.get_experiment_by_name(config["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(config["experiment"])
    tags = {
        "fusebench.role": "experiment",
        "fusebench.method": config["fusion"]["method"],
        "fusebench.seed": str(config["seed"]),
        **(extra_tags or {}),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    t0 = time.perf_counter()
    try:
        trial = (extra_tags or {}).get("fusebench.trial")
        if trial is not None and os.environ.get("FAKE_BLOCK_TRIAL") == trial:
            Path(os.environ["FAKE_MARKER_DIR"], f"started-{trial}").write_text(str(os.getpid()))
            time.sleep(600)
        time.sleep(float(os.environ.get("FAKE_SLEEP_S", "0")))
        barrier = os.environ.get("FAKE_BARRIER_DIR")
        if barrier and trial is not None:
            Path(barrier, f"trial-{trial}").write_text(str(os.getpid()))
            deadline = time.time() + 60
            while len(list(Path(barrier).glob("trial-*"))) < 2 and time.time() < deadline:
                time.sleep(0.05)
        fail = config["fusion"]["options"].get("fake_fail")
        if fail == "nan":
            raise FloatingPointError("fine-tune loss is NaN at epoch 1")
        if fail == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        score = fake_score(config)
        epochs = config["finetune"]["epochs"]
        for epoch in range(1, epochs + 1):
            val = score * epoch / epochs
            client.log_metric(run_id, "fused_val_acc", val, step=epoch)
            if epoch_callback is not None:
                epoch_callback(epoch, val)
        metrics = {
            "fused_acc_best_val": score,
            "fusion_time_s": 0.01 * config["members"]["n"],
            "total_time_s": time.perf_counter() - t0,
        }
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    except StopExperiment as exc:
        exc.fusebench_run_id = run_id
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:  # as run_experiment: Ctrl-C ends the run KILLED, anything else FAILED
        exc.fusebench_run_id = run_id  # the failed run travels with the exception
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = "interrupted (KeyboardInterrupt)" if interrupted else f"{type(exc).__name__}: {exc}"
        client.set_tag(run_id, "fusebench.error", reason)
        client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return ExperimentResult(run_id=run_id, metrics=metrics)
