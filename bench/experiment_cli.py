"""``fusebench run CONFIG.yaml [key=value ...]``: one fusion experiment, logged to MLflow."""

from __future__ import annotations

import argparse
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see bench/configs/digits_mlp.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, YAML values (e.g. members.n=4)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the wall-time split (train, fusion, fine-tune, tracking) as JSON on stdout",
    )


def main(args: argparse.Namespace) -> int:
    from bench import schema
    from bench.config import load_config
    from bench.experiment import run_experiment

    cfg = load_config(args.config, args.overrides)
    result = run_experiment(cfg)
    m = result.metrics
    print(
        f"run {result.run_id}: {cfg['fusion']['method']} on {cfg['data']['name']}/{result.tags[schema.ARCH]} "
        f"N={result.tags[schema.N_MEMBERS]}: best member {m[schema.BEST_MEMBER_ACC]:.4f}, "
        f"ensemble {m[schema.ENSEMBLE_ACC]:.4f}, fused {m[schema.FUSED_ACC_BEFORE_FT]:.4f} -> "
        f"{m[schema.FUSED_ACC_BEST_VAL]:.4f} after {cfg['finetune']['epochs']} epochs "
        f"(fusion {m[schema.FUSION_TIME_S]:.3f}s, members trained {result.members_trained}, "
        f"loaded {result.members_loaded})",
        file=sys.stderr,
    )
    if args.profile:
        timings = dict(result.timings)
        timings["tracking_fraction"] = timings.get("tracking", 0.0) / max(timings.get("total", 1.0), 1e-9)
        print(json.dumps({"run_id": result.run_id, "timings_s": timings}, indent=2))
    return 0
