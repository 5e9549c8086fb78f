"""Reproducible timing of the harness itself: where the wall time of an experiment and of an epoch goes.

    python -m bench.profile                 # both parts, JSON on stdout
    python -m bench.profile --part experiment --threads 1
    python -m bench.profile --part epochs --archs mlp resnet18

``experiment``: the default digits experiment (2 MLP members x 20 epochs, NT, 5 fine-tune epochs) run twice
in one process, each with an empty member cache so both train their members: the first run pays the
one-off costs (imports, creating the MLflow store), the second is the steady state of a sweep worker.
Reported: the wall-time split (data, train, eval, fusion, fusion child process, cost measurement,
fine-tune, baseline fine-tune, tracking, total) and tracking's share of the total.
``epochs``: seconds per training epoch on digits for each architecture, with the data held as tensors on
the device and through a per-sample DataLoader (median of ``--repeats`` epochs after one warm-up epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def profile_experiment(workdir: Path, overrides: list[str] | None = None) -> list[dict]:
    from bench.config import load_config
    from bench.experiment import run_experiment

    out = []
    for i, label in enumerate(["first_in_process", "steady_state"]):
        cfg = load_config(
            None,
            [
                f"tracking_uri=sqlite:///{workdir}/mlflow.db",
                f"members.cache_dir={workdir}/cache{i}",  # empty: members are trained
                "experiment=fusebench-profile",
                *(overrides or []),
            ],
        )
        start = time.perf_counter()
        result = run_experiment(cfg)
        wall = time.perf_counter() - start
        t = {k: round(v, 4) for k, v in result.timings.items()}
        out.append(
            {
                "run": label,
                "wall_s": round(wall, 3),
                "timings_s": t,
                "tracking_fraction": round(result.timings["tracking"] / result.timings["total"], 4),
                "members_trained": result.members_trained,
                "fused_acc_best_val": result.metrics["fused_acc_best_val"],
                "fusion_peak_mem_mb": result.metrics.get("fusion_peak_mem_mb"),
            }
        )
    return out


def profile_epochs(
    archs: list[str],
    repeats: int,
    device: str = "auto",
    overrides: list[str] | None = None,
    settings: list[str] | None = None,
) -> list[dict]:
    """Median epoch time and images/s of member training per architecture and execution setting.

    ``settings``: execution variants to compare, each a comma list of config overrides, e.g.
    ``"precision=fp32"``, ``"precision=bf16,channels_last=true"``, ``"precision=bf16,compile=true"``."""
    from bench.config import load_config
    from bench.data import load_data, resolve_device
    from bench.models import build_model
    from bench.recipes import Execution, Recipe
    from bench.train import _sync_clock, train_epoch

    dev = resolve_device(device)
    out = []
    for arch in archs:
        for setting in settings or ["precision=fp32"]:
            extra = [o for o in setting.split(",") if o]
            cfg = load_config(None, [f"model.arch={arch}", *(overrides or []), *extra])
            data = load_data(cfg["data"], dev)
            torch.manual_seed(0)
            model = build_model(cfg["model"], data.in_chans, data.num_classes, data.image_size, data.dims)
            model = model.to(dev)
            recipe = Recipe.from_section(cfg["members"])
            execution = Execution.from_config(cfg, dev)
            opt = recipe.make_optimizer(model.parameters())
            trained, scaler = execution.prepare(model), execution.grad_scaler(dev)
            gen = torch.Generator().manual_seed(0)
            times = []
            for i in range(repeats + 1):
                start = _sync_clock(model)
                train_epoch(
                    model, data.train, opt, recipe.batch_size, gen,
                    recipe=recipe, execution=execution, scaler=scaler, trained=trained,
                )  # fmt: skip
                if i > 0:  # the first epoch warms up allocators / kernels / compilation
                    times.append(_sync_clock(model) - start)
            median = statistics.median(times)
            out.append(
                {
                    "arch": arch,
                    "setting": setting,
                    "on_device": data.on_device,
                    "device": str(dev),
                    "epoch_s_median": round(median, 4),
                    "images_per_s": round(len(data.train) / median, 1),
                    "epoch_s_all": [round(x, 4) for x in times],
                    "batches_per_epoch": -(-len(data.train) // recipe.batch_size),
                }
            )
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "experiment", "epochs"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--archs", nargs="+", default=["mlp", "resnet18"])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setting (after one warm-up)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["precision=fp32"],
        help='execution variants for the epochs part, e.g. "precision=bf16,channels_last=true"',
    )
    parser.add_argument("--data", nargs="*", default=[], help="config overrides for the epochs part")
    parser.add_argument("overrides", nargs="*", help="config overrides for the experiment part")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.part in ("all", "experiment"):
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="fusebench-profile-") as tmp:
            os.chdir(tmp)  # MLflow's default artifact folder (./mlruns) goes with the temporary store
            try:
                report["experiment"] = profile_experiment(
                    Path(tmp), [f"device={args.device}", *args.overrides]
                )
            finally:
                os.chdir(cwd)
    if args.part in ("all", "epochs"):
        report["epochs"] = profile_epochs(args.archs, args.repeats, args.device, args.data, args.settings)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
