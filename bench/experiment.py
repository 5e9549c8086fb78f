"""One fusion experiment end to end: data -> members -> baselines -> fuse (measured) -> fine-tune -> MLflow.

``run_experiment`` is what ``fusebench run`` and every sweep trial call (docs/design.md §2/§3). Cheap
static checks (names of data set, architecture, method) run before anything is created, so bad input
leaves no run and no cache entry; anything that fails later leaves the run FAILED with the error.
"""

from __future__ import annotations

import copy
import difflib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.config import load_config, resolve
from bench.errors import ConfigError, FusebenchError


class StopExperiment(Exception):  # noqa: N818 - named by the design contract
    """Raised by an epoch callback to stop the experiment: the run ends KILLED and this is re-raised."""


@dataclass
class ExperimentResult:
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    members_trained: int = 0
    members_loaded: int = 0
    # wall times (s): data, train, eval, fusion, fusion_process, cost_measure, finetune,
    # baseline_finetune, tracking, total
    timings: dict[str, float] = field(default_factory=dict)


def _check_method(method: str) -> None:
    import fusion

    methods = fusion.available_methods()
    if method not in methods:
        close = difflib.get_close_matches(method, methods, n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"fusion.method: unknown method '{method}'{hint}; available: {', '.join(methods)}")


def validate(cfg: dict) -> None:
    """Static checks that need no data: fail before any run, file or cache entry is created."""
    from bench.data import check_name
    from bench.models import check_arch

    check_name(cfg["data"]["name"])
    check_arch(cfg["model"]["arch"])
    _check_method(cfg["fusion"]["method"])
    for path in cfg["members"]["checkpoints"]:
        if not Path(path).expanduser().is_file():
            raise FusebenchError(f"members.checkpoints: checkpoint {path} does not exist")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _sparsity_tag(cfg: dict) -> str:
    method, opts, n = cfg["fusion"]["method"], cfg["fusion"]["options"], _n_members(cfg)
    if not method.startswith("nt"):
        return ""
    return format(float(opts.get("sparsity", 1.0 - 1.0 / n)), ".4g")  # 0.6667, not 0.6666666666666667


def _n_members(cfg: dict) -> int:
    return len(cfg["members"]["checkpoints"]) or cfg["members"]["n"]


def _device_tag(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_experiment(
    config: dict | str | Path,
    *,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    epoch_callback: Callable[[int, float], None] | None = None,
) -> ExperimentResult:
    """Run one experiment and log it as one MLflow run (see the module docstring)."""
    t_total = time.perf_counter()
    cfg = load_config(config) if isinstance(config, (str, Path)) else resolve(config)
    validate(cfg)
    from bench.data import resolve_device
    from bench.models import arch_label
    from bench.tracking import Tracker, provenance_tags

    device = resolve_device(cfg["device"])
    tags = {
        "fusebench.device": _device_tag(device),
        "fusebench.role": "experiment",
        "fusebench.method": cfg["fusion"]["method"],
        "fusebench.arch": arch_label(cfg["model"]),
        "fusebench.dataset": cfg["data"]["name"],
        "fusebench.n_members": str(_n_members(cfg)),
        "fusebench.sparsity": _sparsity_tag(cfg),
        "fusebench.finetune_epochs": str(cfg["finetune"]["epochs"]),
        "fusebench.seed": str(cfg["seed"]),
        **provenance_tags(),
        **{k: str(v) for k, v in (extra_tags or {}).items()},
    }
    tracker = Tracker(cfg, parent_run_id=parent_run_id, tags=tags)
    try:
        tracker.log_config(cfg)
        result = _run(cfg, device, tracker, tags, epoch_callback, t_total)
    except StopExperiment:
        tracker.end("KILLED")
        raise
    except BaseException as exc:
        tracker.end("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    tracker.end("FINISHED")
    result.timings["tracking"] = tracker.seconds
    result.timings["total"] = time.perf_counter() - t_total
    return result


def _run(cfg, device, tracker, tags, epoch_callback, t_total) -> ExperimentResult:
    import fusion
    from bench.data import load_data
    from bench.measure import latency_ms, macs_and_params, measure_fusion
    from bench.members import get_members
    from bench.train import evaluate, finetune

    timings: dict[str, float] = {}
    _seed_everything(cfg["seed"])
    t = time.perf_counter()
    data = load_data(cfg["data"], device)
    timings["data"] = time.perf_counter() - t

    # Members and baselines.
    members = get_members(cfg, data)
    timings["train"] = members.train_seconds
    t = time.perf_counter()
    m: dict[str, float] = {}
    val_accs = []
    for i, model in enumerate(members.models):
        m[f"member_{i}_acc"] = evaluate(model, data.test)[0]
        val_accs.append(evaluate(model, data.val)[0])
    best = int(np.argmax(val_accs))  # best member chosen by validation, reported on test
    m["members_mean_acc"] = float(np.mean([m[f"member_{i}_acc"] for i in range(len(members.models))]))
    m["best_member_acc"] = m[f"member_{best}_acc"]
    ensemble = fusion.ensemble(members.models)
    m["ensemble_acc"] = evaluate(ensemble, data.test)[0]
    timings["eval"] = time.perf_counter() - t
    tracker.metrics(m)

    # Fusion, measured.
    example = data.example_inputs(2)
    t = time.perf_counter()
    fm = measure_fusion(
        members.models,
        cfg["fusion"]["method"],
        example,
        cfg["fusion"]["options"],
        memory=cfg["fusion"]["measure_memory"],
    )
    fused = fm.fused_model.to(device)
    timings["fusion"] = fm.seconds
    timings["fusion_process"] = time.perf_counter() - t - fm.seconds  # child process start / transfer
    t = time.perf_counter()
    cost: dict[str, float] = {"fusion_time_s": fm.seconds}
    if fm.peak_mem_mb == fm.peak_mem_mb:  # NaN when not measured (fusion.measure_memory: false on CPU)
        cost["fusion_peak_mem_mb"] = fm.peak_mem_mb
    cost["fused_macs"], cost["fused_params"] = macs_and_params(fused, example[:1])
    cost["member_macs"], cost["member_params"] = macs_and_params(members.models[0], example[:1])
    lat_batch = next(data.test.batches(cfg["data"]["batch_size"]))[0]
    cost["fused_latency_ms"] = latency_ms(fused, lat_batch)
    cost["ensemble_latency_ms"] = latency_ms(ensemble, lat_batch)
    m.update(cost)
    timings["cost_measure"] = time.perf_counter() - t
    tracker.metrics(cost)

    # Fine-tuning of the fused model, curves logged per epoch (step = epoch).
    f = cfg["finetune"]
    ft_kwargs = dict(
        epochs=f["epochs"],
        optimizer=f["optimizer"],
        lr=f["lr"],
        momentum=f["momentum"],
        weight_decay=f["weight_decay"],
        batch_size=cfg["members"]["batch_size"],
        seed=cfg["seed"] + 7919,
    )

    def on_epoch(epoch: int, res) -> None:
        values = {"fused_acc": res.test_acc[epoch], "fused_val_acc": res.val_acc[epoch]}
        if epoch > 0:
            values["ft_train_loss"] = res.train_loss[epoch - 1]
        else:
            tracker.metrics({"fused_acc_before_ft": res.test_acc[0]})
        tracker.metrics(values, step=epoch)
        tracker.maybe_flush()

    teacher = ensemble if f["distill"] else None
    ft = finetune(
        fused,
        data,
        teacher=teacher,
        temperature=f["temperature"],
        epoch_callback=epoch_callback,
        epoch_hook=on_epoch,
        desc="finetune fused",
        **ft_kwargs,
    )
    timings["finetune"] = ft.seconds
    m["fused_acc_before_ft"] = ft.test_acc[0]
    m["fused_acc_final"] = ft.final_acc
    m["fused_acc_best_val"] = ft.best_val_test_acc
    m["gain_over_best_member"] = m["fused_acc_best_val"] - m["best_member_acc"]
    m["gain_over_ensemble"] = m["fused_acc_best_val"] - m["ensemble_acc"]

    # Fair baseline: the best member fine-tuned with the same budget (plain, like the fused model).
    if f["baseline"]:
        if f["epochs"] > 0:
            baseline = copy.deepcopy(members.models[best])
            bres = finetune(
                baseline,
                data,
                teacher=teacher,
                temperature=f["temperature"],
                desc="finetune best member",
                **ft_kwargs,
            )
            m["best_member_ft_acc"] = bres.final_acc
            timings["baseline_finetune"] = bres.seconds
        else:
            m["best_member_ft_acc"] = m["best_member_acc"]
    m["train_time_s"] = timings["train"]
    m["finetune_time_s"] = timings["finetune"]
    m["total_time_s"] = time.perf_counter() - t_total
    final_keys = [
        "fused_acc_final", "fused_acc_best_val", "gain_over_best_member", "gain_over_ensemble",
        "best_member_ft_acc", "train_time_s", "finetune_time_s", "total_time_s",
    ]  # fmt: skip
    tracker.metrics({k: m[k] for k in final_keys if k in m})
    m["fused_acc"] = ft.final_acc
    m["fused_val_acc"] = ft.val_acc[-1]
    return ExperimentResult(
        run_id=tracker.run_id,
        metrics=m,
        tags=dict(tags),
        members_trained=members.trained,
        members_loaded=members.loaded,
        timings=timings,
    )
