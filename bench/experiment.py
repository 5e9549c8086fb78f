"""One fusion experiment end to end: data -> members -> baselines -> fuse (measured) -> repair -> fine-tune
-> baselines fine-tuned the same way -> MLflow.

``run_experiment`` is what ``fusebench run`` and every sweep trial call (docs/design.md §2/§3). Cheap
static checks (names of data set, architecture, method) run before anything is created, so bad input
leaves no run and no cache entry; anything that fails later leaves the run FAILED with the error.
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import schema
from bench.config import load_config, resolve
from bench.errors import ConfigError, FusebenchError
from bench.validation import did_you_mean


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
        hint = did_you_mean(method, methods, cutoff=0.4)
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
    """The sparsity a method with a ``sparsity`` option (per the fusion registry: the NT family) uses."""
    import fusion

    method, opts, n = cfg["fusion"]["method"], cfg["fusion"]["options"], _n_members(cfg)
    if "sparsity" not in fusion.method_options(method):
        return ""
    return format(float(opts.get("sparsity", 1.0 - 1.0 / n)), ".4g")  # 0.6667, not 0.6666666666666667


def _n_members(cfg: dict) -> int:
    return len(cfg["members"]["checkpoints"]) or cfg["members"]["n"]


def _device_tag(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_name(tags: dict[str, str]) -> str:
    """A run name a person can tell apart in the MLflow UI, e.g. ``nt · resnet18 · N=4 · s=0.5 · seed 1 · trial 7``."""
    parts = [tags.get(schema.METHOD, "?"), tags.get(schema.ARCH, "?"), f"N={tags.get(schema.N_MEMBERS)}"]
    if tags.get(schema.SPARSITY):
        parts.append(f"s={tags[schema.SPARSITY]}")
    if tags.get(schema.REPAIR) not in (None, "", "none"):
        parts.append(tags[schema.REPAIR])
    parts.append(f"seed {tags.get(schema.SEED)}")
    if tags.get(schema.TRIAL):
        parts.append(f"trial {tags[schema.TRIAL]}")
    return " · ".join(parts)


def run_experiment(
    config: dict | str | Path,
    *,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    epoch_callback: Callable[[int, float], None] | None = None,
) -> ExperimentResult:
    """Run one experiment and log it as one MLflow run (see the module docstring).

    On failure the exception is re-raised with the run's id attached as ``exc.fusebench_run_id``."""
    t_total = time.perf_counter()
    cfg = load_config(config) if isinstance(config, (str, Path)) else resolve(config)
    validate(cfg)
    from bench.data import resolve_device
    from bench.models import arch_label
    from bench.tracking import Tracker, provenance_tags

    device = resolve_device(cfg["device"])
    tags = {
        schema.DEVICE: _device_tag(device),
        schema.ROLE: schema.ROLE_EXPERIMENT,
        schema.METHOD: cfg["fusion"]["method"],
        schema.ARCH: arch_label(cfg["model"]),
        schema.DATASET: cfg["data"]["name"],
        schema.N_MEMBERS: str(_n_members(cfg)),
        schema.SPARSITY: _sparsity_tag(cfg),
        schema.REPAIR: cfg["fusion"]["repair"],
        schema.FINETUNE_EPOCHS: str(cfg["finetune"]["epochs"]),
        schema.SEED: str(cfg["seed"]),
        **provenance_tags(),
        **{k: str(v) for k, v in (extra_tags or {}).items()},
    }
    tracker = Tracker(cfg, parent_run_id=parent_run_id, tags=tags, run_name=run_name(tags))
    try:
        tracker.log_config(cfg)
        result = Experiment(cfg, device, tracker, tags, epoch_callback, t_total).run()
    except StopExperiment as exc:
        exc.fusebench_run_id = tracker.run_id
        tracker.end("KILLED")
        raise
    except BaseException as exc:
        exc.fusebench_run_id = tracker.run_id
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        reason = "interrupted (KeyboardInterrupt)" if status == "KILLED" else f"{type(exc).__name__}: {exc}"
        tracker.end(status, error=reason)
        raise
    tracker.end("FINISHED")
    result.timings["tracking"] = tracker.seconds
    result.timings["total"] = time.perf_counter() - t_total
    return result


def select_by_validation(val_acc: list[float], test_acc: list[float]) -> tuple[int, float]:
    """The selection rule shared by the fused model and every fine-tuned baseline: the epoch with the best
    validation accuracy (epoch 0 = before fine-tuning included; ties go to the earlier epoch) and the test
    accuracy at that epoch."""
    if not val_acc or len(val_acc) != len(test_acc):
        raise ValueError("selection needs one validation and one test accuracy per epoch")
    best = max(range(len(val_acc)), key=lambda e: (val_acc[e], -e))
    return best, test_acc[best]


class Experiment:
    """The pipeline as named stages: members -> baselines -> fuse -> repair -> fine-tune -> record.

    Each stage reads what earlier stages left on ``self`` and adds its metrics to ``self.metrics``
    (logged to MLflow as soon as they exist, so a run that dies later still shows them).
    """

    def __init__(self, cfg, device, tracker, tags, epoch_callback, t_total):
        self.cfg, self.device, self.tracker, self.tags = cfg, device, tracker, tags
        self.epoch_callback, self.t_total = epoch_callback, t_total
        self.metrics: dict[str, float] = {}
        self.timings: dict[str, float] = {}

    def run(self) -> ExperimentResult:
        _seed_everything(self.cfg["seed"])
        self.load_data()
        self.members()
        self.baselines()
        self.fuse()
        self.repair()
        self.linear_mode_connectivity()
        self.finetune()
        self.finetuned_baselines()
        return self.record()

    def _log(self, values: dict[str, float], step: int = 0) -> None:
        self.metrics.update(values)
        self.tracker.metrics(values, step=step)

    # ------------------------------------------------------------------ stages
    def load_data(self) -> None:
        from bench.data import load_data

        t = time.perf_counter()
        self.data = load_data(self.cfg["data"], self.device)
        self.timings["data"] = time.perf_counter() - t
        self.tracker.log_dataset(self.data, self.cfg["data"])

    def members(self) -> None:
        from bench.members import get_members

        self.member_set = get_members(self.cfg, self.data)
        self.models = self.member_set.models
        self.timings["train"] = self.member_set.train_seconds
        if self.member_set.images_per_s:
            self._log({schema.TRAIN_IMAGES_PER_S: self.member_set.images_per_s})

    def baselines(self) -> None:
        import fusion
        from bench.train import evaluate

        t = time.perf_counter()
        m: dict[str, float] = {}
        val_accs = []
        for i, model in enumerate(self.models):
            m[schema.member_acc(i)] = evaluate(model, self.data.test)[0]
            val_accs.append(evaluate(model, self.data.val)[0])
        self.best = int(np.argmax(val_accs))  # best member chosen by validation, reported on test
        m[schema.MEMBERS_MEAN_ACC] = float(
            np.mean([m[schema.member_acc(i)] for i in range(len(self.models))])
        )
        m[schema.BEST_MEMBER_ACC] = m[schema.member_acc(self.best)]
        self.ensemble = fusion.ensemble(self.models)
        m[schema.ENSEMBLE_ACC] = evaluate(self.ensemble, self.data.test)[0]
        self.timings["eval"] = time.perf_counter() - t
        self._log(m)

    def _train_batches(self, count: int, salt: int) -> list[torch.Tensor]:
        """``count`` shuffled training batches (inputs only), the same for every method of one seed."""
        gen = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + salt)
        out = []
        for x, _ in self.data.train.batches(self.cfg["data"]["batch_size"], shuffle=True, generator=gen):
            out.append(x)
            if len(out) >= count:
                break
        return out

    def fusion_options(self) -> dict:
        """The configured options, plus a training batch as ``data`` for methods that take one."""
        import fusion

        options = dict(self.cfg["fusion"]["options"])
        method = self.cfg["fusion"]["method"]
        if "data" in fusion.method_options(method) and "data" not in options:
            n = self.cfg["fusion"]["data_samples"]
            batches = self._train_batches(max(1, -(-n // self.cfg["data"]["batch_size"])), salt=17)
            options["data"] = torch.cat(batches)[:n]
        return options

    def fuse(self) -> None:
        import fusion
        from bench.measure import latency_ms, macs_and_params, measure_fusion
        from bench.train import evaluate

        self.example = self.data.example_inputs(2)
        t = time.perf_counter()
        fm = measure_fusion(
            self.models,
            self.cfg["fusion"]["method"],
            self.example,
            self.fusion_options(),
            memory=self.cfg["fusion"]["measure_memory"],
        )
        self.fused = fm.fused_model.to(self.device)
        self.timings["fusion"] = fm.seconds
        self.timings["fusion_process"] = time.perf_counter() - t - fm.seconds  # child start / transfer
        t = time.perf_counter()
        cost: dict[str, float] = {schema.FUSION_TIME_S: fm.seconds}
        if fm.peak_mem_mb == fm.peak_mem_mb:  # NaN when not measured
            cost[schema.FUSION_PEAK_MEM_MB] = fm.peak_mem_mb
        cost[schema.FUSED_MACS], cost[schema.FUSED_PARAMS] = macs_and_params(self.fused, self.example[:1])
        cost[schema.MEMBER_MACS], cost[schema.MEMBER_PARAMS] = macs_and_params(
            self.models[0], self.example[:1]
        )
        lat_batch = next(self.data.test.batches(self.cfg["data"]["batch_size"]))[0]
        cost[schema.FUSED_LATENCY_MS] = latency_ms(self.fused, lat_batch)
        cost[schema.ENSEMBLE_LATENCY_MS] = latency_ms(self.ensemble, lat_batch)
        cost[schema.FUSED_ACC_RAW] = evaluate(self.fused, self.data.test)[0]
        prov = fusion.provenance_of(self.fused)
        if prov is not None and prov.sources is not None:  # a method on the traced groups (plain averaging has none)
            cost[schema.PINNED_CHANNEL_SETS] = len(prov.pinned)
        self.timings["cost_measure"] = time.perf_counter() - t
        self._log(cost)

    def _repaired(self, model, members=None):
        import fusion

        mode = self.cfg["fusion"]["repair"]
        if mode == "none":
            return model
        batches = self._train_batches(self.cfg["fusion"]["repair_batches"], salt=29)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "nothing to reset" on models without BatchNorm is expected
            return fusion.repair(
                model,
                batches,
                members=members if mode == "repair" else None,
                mode=mode,
                example_inputs=self.example,
            )

    def repair(self) -> None:
        t = time.perf_counter()
        self.fused = self._repaired(self.fused, self.models)
        self.timings["repair"] = time.perf_counter() - t
        self._log({schema.REPAIR_TIME_S: self.timings["repair"]})

    def linear_mode_connectivity(self) -> None:
        """N = 2 and ``fusion.lmc``: accuracy and loss along the linear path between member A and member B
        aligned by the method (unaligned for methods that do not align), the configured repair applied at
        every point."""
        if not self.cfg["fusion"]["lmc"]:
            return
        import fusion
        from bench.lmc import linear_path
        from bench.train import evaluate

        if len(self.models) != 2:
            raise ConfigError(f"fusion.lmc: the linear path needs N = 2 members, got {len(self.models)}")
        method = self.cfg["fusion"]["method"]
        a, b = self.models
        if method in fusion.alignment_methods():
            options = self.fusion_options()
            a, b = fusion.align(self.models, method, example_inputs=self.example, **options)
        path = linear_path(
            a,
            b,
            lambda model: evaluate(model, self.data.test),
            transform=lambda model: self._repaired(model, [a, b]),
        )
        for alpha, acc, loss in zip(path.alphas, path.acc, path.loss):
            self._log({schema.LMC_ACC: acc, schema.LMC_LOSS: loss}, step=round(100 * alpha))
        self._log({schema.LMC_BARRIER_ACC: path.barrier_acc, schema.LMC_BARRIER_LOSS: path.barrier_loss})

    def _recipe(self):
        """The fine-tune recipe (the members' batch size) and how it executes, shared by every fine-tune."""
        from bench.recipes import Execution, Recipe

        recipe = Recipe.from_section(self.cfg["finetune"], batch_size=self.cfg["members"]["batch_size"])
        return dict(
            recipe=recipe,
            seed=self.cfg["seed"] + 7919,
            execution=Execution.from_config(self.cfg, self.device),
        )

    def finetune(self) -> None:
        """Fine-tune the fused model, curves logged per epoch (step = epoch; step 0 = where it starts)."""
        from bench.train import finetune

        f = self.cfg["finetune"]
        tracker = self.tracker

        def on_epoch(epoch: int, res) -> None:
            values = {schema.FUSED_ACC: res.test_acc[epoch], schema.FUSED_VAL_ACC: res.val_acc[epoch]}
            if epoch > 0:
                values[schema.FT_TRAIN_LOSS] = res.train_loss[epoch - 1]
            else:
                tracker.metrics({schema.FUSED_ACC_BEFORE_FT: res.test_acc[0]})
            tracker.metrics(values, step=epoch)
            tracker.maybe_flush()

        self.teacher = self.ensemble if f["distill"] else None
        ft = finetune(
            self.fused,
            self.data,
            teacher=self.teacher,
            temperature=f["temperature"],
            epoch_callback=self.epoch_callback,
            epoch_hook=on_epoch,
            desc="finetune fused",
            **self._recipe(),
        )
        self.ft = ft
        self.timings["finetune"] = ft.seconds
        _, best_test = select_by_validation(ft.val_acc, ft.test_acc)
        m = self.metrics
        m[schema.FUSED_ACC_BEFORE_FT] = ft.test_acc[0]
        m[schema.FUSED_ACC_FINAL] = ft.final_acc
        m[schema.FUSED_ACC_BEST_VAL] = best_test
        m[schema.GAIN_OVER_ENSEMBLE] = best_test - m[schema.ENSEMBLE_ACC]
        if ft.images_per_s:
            self._log({schema.FINETUNE_IMAGES_PER_S: ft.images_per_s})

    def finetuned_baselines(self) -> None:
        """The fair baselines: the best member fine-tuned with the same budget and selected the same way
        (best validation epoch, its test accuracy), and -- the NT paper's other baseline -- the best member
        distilled from the ensemble for the same budget."""
        from bench.train import finetune

        f, m = self.cfg["finetune"], self.metrics
        runs = []  # (metric, its value after the last epoch, timing, teacher, progress label)
        if f["baseline"]:  # fine-tuned exactly as the fused model is (plain or distilled)
            ft = (schema.BEST_MEMBER_FT_ACC, schema.BEST_MEMBER_FT_ACC_FINAL, "best_member_ft", self.teacher)
            runs.append((*ft, "finetune best member"))
        if f["distill_baseline"]:
            distill = (
                schema.BEST_MEMBER_DISTILL_ACC,
                schema.BEST_MEMBER_DISTILL_ACC_FINAL,
                "best_member_distill",
            )
            runs.append((*distill, self.ensemble, "distill best member"))
        for acc, final, timing, teacher, desc in runs:
            if f["epochs"] == 0:
                m[acc] = m[final] = m[schema.BEST_MEMBER_ACC]
                continue
            model = copy.deepcopy(self.models[self.best])
            res = finetune(
                model, self.data, teacher=teacher, temperature=f["temperature"], desc=desc, **self._recipe()
            )
            m[acc] = select_by_validation(res.val_acc, res.test_acc)[1]
            m[final] = res.final_acc
            self.timings[timing] = res.seconds
        m[schema.GAIN_OVER_BEST_MEMBER_UNTUNED] = m[schema.FUSED_ACC_BEST_VAL] - m[schema.BEST_MEMBER_ACC]
        reference = m.get(schema.BEST_MEMBER_FT_ACC, m[schema.BEST_MEMBER_ACC])
        m[schema.GAIN_OVER_BEST_MEMBER] = m[schema.FUSED_ACC_BEST_VAL] - reference

    def record(self) -> ExperimentResult:
        m = self.metrics
        m[schema.TRAIN_TIME_S] = self.timings["train"]
        m[schema.FINETUNE_TIME_S] = self.timings["finetune"]
        m[schema.TOTAL_TIME_S] = time.perf_counter() - self.t_total
        final_keys = [  # the scalars of the run, written once at the end
            schema.FUSED_ACC_FINAL, schema.FUSED_ACC_BEST_VAL, schema.GAIN_OVER_BEST_MEMBER,
            schema.GAIN_OVER_BEST_MEMBER_UNTUNED, schema.GAIN_OVER_ENSEMBLE, schema.BEST_MEMBER_FT_ACC,
            schema.BEST_MEMBER_FT_ACC_FINAL, schema.BEST_MEMBER_DISTILL_ACC, schema.BEST_MEMBER_DISTILL_ACC_FINAL,
            schema.TRAIN_TIME_S, schema.FINETUNE_TIME_S, schema.TOTAL_TIME_S,
        ]  # fmt: skip
        self.tracker.metrics({k: m[k] for k in final_keys if k in m})
        if self.cfg["fusion"]["log_model"]:
            self.tracker.log_model(self.fused, self.example)
        m[schema.FUSED_ACC] = self.ft.final_acc
        m[schema.FUSED_VAL_ACC] = self.ft.val_acc[-1]
        return ExperimentResult(
            run_id=self.tracker.run_id,
            metrics=m,
            tags=dict(self.tags),
            members_trained=self.member_set.trained,
            members_loaded=self.member_set.loaded,
            timings=self.timings,
        )
