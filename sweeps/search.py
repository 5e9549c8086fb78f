"""From a validated spec to Optuna objects: sampler, pruner, and the params of one trial."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from sweeps.spec import Param, SweepSpec, is_active


def make_sampler(spec: SweepSpec, *, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. Workers get distinct seeds so parallel random draws do not coincide."""
    cfg = spec.sampler
    seed = cfg.get("seed")
    if seed is not None:
        seed = int(seed) + worker
    kind = cfg["type"]
    conditional = any(p.when for p in spec.space.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            # group=True lets multivariate TPE model conditional params per sub-space instead of
            # falling back to independent sampling for every param that is not always present.
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=int(cfg.get("n_startup_trials", 10)),
                multivariate=True, group=conditional, warn_independent_sampling=False,
            )
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind in ("grid", "bruteforce"):
            # BruteForceSampler understands conditional spaces (GridSampler would run every sparsity
            # for methods that ignore it). avoid_premature_stop=False: a configuration already running is not
            # drawn again by a parallel worker; the runner stops at the grid size itself.
            return optuna.samplers.BruteForceSampler(seed=seed, avoid_premature_stop=False)
        if kind == "nsga2":
            kwargs: dict[str, Any] = {"seed": seed}
            if "population_size" in cfg:
                kwargs["population_size"] = int(cfg["population_size"])
            return optuna.samplers.NSGAIISampler(**kwargs)
    raise AssertionError(f"unvalidated sampler {kind!r}")


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    cfg = spec.pruner
    kind = cfg["type"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(cfg.get("n_startup_trials", 5)),
                                           n_warmup_steps=int(cfg.get("n_warmup_steps", 1)))
    if kind == "hyperband":
        max_resource = max(1, int(spec.base["finetune"]["epochs"]))
        if "finetune.epochs" in spec.space:
            max_resource = max(int(v) for v in spec.space["finetune.epochs"].grid_values()
                               if spec.space["finetune.epochs"].type != "float")
        return optuna.pruners.HyperbandPruner(min_resource=int(cfg.get("min_resource", 1)),
                                              max_resource=max_resource,
                                              reduction_factor=int(cfg.get("reduction_factor", 3)))
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, param: Param) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.type == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high),
                                 step=int(param.step or 1), log=param.log)
    return trial.suggest_float(param.name, float(param.low), float(param.high), step=param.step, log=param.log)


def sample_params(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the space in declaration order; a conditional param only when its ``when`` holds."""
    values: dict[str, Any] = {}
    for param in spec.space.values():
        if is_active(param, values):
            values[param.name] = suggest(trial, param)
    return values
