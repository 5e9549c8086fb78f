"""Leaderboard: one row per configuration, aggregated over seeds, with the baselines beside the methods.

The raw table (``build_leaderboard``) keeps full-precision means, sample standard deviations (ddof=1;
empty with a single seed) and counts, which is what the CSV export writes. The reading formats (md,
LaTeX, HTML) show accuracies in percent as "mean ± std" and gains in percentage points.

Baselines come from the runs' own baseline metrics. Runs of one (dataset, arch, N, seed) share their
members, so the ensemble and best-member numbers repeat across methods: they are first reduced to one
value per (dataset, arch, N, fine-tune epochs, seed) cell and only then aggregated over seeds, so a
configuration fused by five methods does not count its ensemble five times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bench import schema
from bench.errors import FusebenchError
from dashboards.data import KEY_COLUMNS

ACC_RAW = schema.FUSED_ACC_RAW
ACC_BEFORE = schema.FUSED_ACC_BEFORE_FT
ACC_AFTER = schema.FUSED_ACC_BEST_VAL
GAIN_MEMBER = schema.GAIN_OVER_BEST_MEMBER
GAIN_ENSEMBLE = schema.GAIN_OVER_ENSEMBLE
TIME, MEM, PARAMS = schema.FUSION_TIME_S, schema.FUSION_PEAK_MEM_MB, schema.FUSED_PARAMS
#: Metrics summarised by mean, std (ddof=1) over seeds.
MEAN_STD_METRICS = (ACC_RAW, ACC_BEFORE, ACC_AFTER, GAIN_MEMBER, GAIN_ENSEMBLE)
#: Cost metrics summarised by the median (robust to a noisy shared machine).
MEDIAN_METRICS = (TIME, MEM, PARAMS)

BASELINE_KEYS = ("dataset", "arch", "n_members", "finetune_epochs")
BASELINES = ("ensemble", "best member", "best member + FT", "best member distilled")
FORMATS = ("csv", "md", "latex", "html")

_DISPLAY_NAMES = {
    "dataset": "dataset",
    "arch": "arch",
    "n_members": "N",
    "method": "method",
    "sparsity": "sparsity",
    "repair": "repair",
    "finetune_epochs": "FT epochs",
    "seed": "seed",
    "n": "n",
    ACC_RAW: "acc. fused raw (%)",
    ACC_BEFORE: "acc. repaired (%)",
    ACC_AFTER: "acc. fine-tuned (%)",
    GAIN_MEMBER: "Δ best member (pp)",
    GAIN_ENSEMBLE: "Δ ensemble (pp)",
    TIME: "fusion time (s)",
    MEM: "peak mem (MB)",
    PARAMS: "params",
}


def resolve_group_by(group_by: Sequence[str] | None, runs: pd.DataFrame) -> list[str]:
    """Validated key columns; "a,b" and ["a", "b"] both work, "model.width" means the param."""
    if not group_by:
        return list(KEY_COLUMNS)
    keys: list[str] = []
    for item in group_by:
        for name in (p.strip() for p in item.split(",")):
            if not name:
                continue
            if name == "N":
                name = "n_members"
            if name not in runs.columns and f"params.{name}" in runs.columns:
                name = f"params.{name}"
            if name not in runs.columns:
                params = sorted(c[len("params.") :] for c in runs.columns if c.startswith("params."))
                raise FusebenchError(
                    f"--group-by: unknown key {name!r} (use {', '.join(KEY_COLUMNS + ['seed'])} "
                    f"or a run param such as {', '.join(params[:6])})"
                )
            if name not in keys:
                keys.append(name)
    return keys


def _with_gains(runs: pd.DataFrame) -> pd.DataFrame:
    """Gains as logged; recomputed from the baselines for runs that did not log them."""
    runs = runs.copy()
    for gain, base in ((GAIN_MEMBER, schema.BEST_MEMBER_ACC), (GAIN_ENSEMBLE, schema.ENSEMBLE_ACC)):
        derived = runs[ACC_AFTER] - runs[base] if base in runs else np.nan
        runs[gain] = runs[gain].fillna(derived) if gain in runs else derived
    if ACC_RAW not in runs:  # runs from before repair: the fused accuracy was the raw one
        runs[ACC_RAW] = runs[ACC_BEFORE]
    else:
        runs[ACC_RAW] = runs[ACC_RAW].fillna(runs[ACC_BEFORE])
    for col in MEDIAN_METRICS:
        if col not in runs:
            runs[col] = np.nan
    return runs


def _aggregate(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(keys, dropna=False, sort=False)
    out = grouped.size().rename("n").to_frame()
    for metric in MEAN_STD_METRICS:
        out[f"{metric}_mean"] = grouped[metric].mean()
        out[f"{metric}_std"] = grouped[metric].std(ddof=1)
    for metric in MEDIAN_METRICS:
        out[f"{metric}_median"] = grouped[metric].median()
    return out.reset_index()


def _baseline_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, baseline): the per-seed baseline values as pseudo-runs."""
    cells = [*BASELINE_KEYS, "seed"]
    ens_acc, best_acc, ft_acc = schema.ENSEMBLE_ACC, schema.BEST_MEMBER_ACC, schema.BEST_MEMBER_FT_ACC
    names = (ens_acc, best_acc, ft_acc, schema.BEST_MEMBER_DISTILL_ACC, schema.MEMBER_PARAMS)
    cols = [c for c in names if c in runs]
    if not cols:
        return pd.DataFrame()
    per_cell = runs.groupby(cells, dropna=False, sort=False)[cols].mean().reset_index()
    for c in names:
        if c not in per_cell:
            per_cell[c] = np.nan
    ens, best, best_ft = per_cell[ens_acc], per_cell[best_acc], per_cell[ft_acc]
    params = per_cell[schema.MEMBER_PARAMS]
    specs = {
        # name: (acc right after "fusion", acc after fine-tuning, params); the fine-tuned baselines are
        # selected like the fused model (test accuracy at the best validation epoch)
        "ensemble": (ens, ens, params * per_cell["n_members"]),
        "best member": (best, best, params),
        "best member + FT": (best, best_ft, params),
        "best member distilled": (best, per_cell[schema.BEST_MEMBER_DISTILL_ACC], params),
    }
    # "Δ best member" is against the fine-tuned best member where it ran (as the experiments log it)
    reference = best_ft.fillna(best)
    parts = []
    for name, (before, after, params) in specs.items():
        part = per_cell[cells].copy()
        part["method"] = name
        part[ACC_RAW] = before
        part[ACC_BEFORE] = before
        part[ACC_AFTER] = after
        part[GAIN_MEMBER] = after - reference
        part[GAIN_ENSEMBLE] = after - ens
        part[TIME] = np.nan
        part[MEM] = np.nan
        part[PARAMS] = params
        parts.append(part[part[ACC_AFTER].notna()])
    return pd.concat(parts, ignore_index=True)


def build_leaderboard(runs: pd.DataFrame, group_by: Sequence[str] | None = None) -> pd.DataFrame:
    """The raw leaderboard: group keys, ``kind`` (method/baseline), n and the aggregated metrics."""
    keys = resolve_group_by(group_by, runs)
    runs = _with_gains(runs)
    table = _aggregate(runs, keys)
    table.insert(len(keys), "kind", "method")
    if "method" in keys:
        base = _baseline_frame(runs)
        if not base.empty:
            for k in keys:
                if k not in base:
                    base[k] = ""  # not a property of a baseline (sparsity, a fusion option, ...)
            base_table = _aggregate(base, keys)
            base_table.insert(len(keys), "kind", "baseline")
            table = pd.concat([table, base_table], ignore_index=True)
    block = [k for k in BASELINE_KEYS if k in keys] + [
        k for k in keys if k not in BASELINE_KEYS and k not in ("method", "sparsity", "repair")
    ]
    rest = [k for k in ("method", "sparsity", "repair") if k in keys]
    table = table.sort_values(
        block + [f"{ACC_AFTER}_mean"] + rest,
        ascending=[True] * len(block) + [False] + [True] * len(rest),
        kind="stable",
        na_position="last",
    )
    return table.reset_index(drop=True)


# ---------------------------------------------------------------- reading formats


def _pct(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f}" if std is None or math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _gain(mean: float) -> str:
    return "—" if mean is None or math.isnan(mean) else f"{100 * mean:+.2f}"


def _num(value: float, fmt: str) -> str:
    return "—" if value is None or math.isnan(value) else format(value, fmt)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Rounded, human-readable strings; column headers with units."""
    keys = [c for c in table.columns[: list(table.columns).index("kind")]]
    methods = table[table["kind"] == "method"]
    if "repair" in keys and methods["repair"].nunique(dropna=False) <= 1:
        keys.remove("repair")  # shown only when it varies
    out = pd.DataFrame(index=table.index)
    for k in keys:
        col = table[k]
        out[_DISPLAY_NAMES.get(k, k.removeprefix("params."))] = [
            "—" if (v is None or v == "" or (isinstance(v, float) and math.isnan(v))) else str(v) for v in col
        ]
    out["n"] = table["n"].astype(int).astype(str)
    for metric in (ACC_RAW, ACC_BEFORE, ACC_AFTER):
        out[_DISPLAY_NAMES[metric]] = [
            _pct(m, s) for m, s in zip(table[f"{metric}_mean"], table[f"{metric}_std"])
        ]
    for metric in (GAIN_MEMBER, GAIN_ENSEMBLE):
        out[_DISPLAY_NAMES[metric]] = [_gain(m) for m in table[f"{metric}_mean"]]
    for metric, fmt in ((TIME, ".3g"), (MEM, ".1f"), (PARAMS, ",.0f")):
        out[_DISPLAY_NAMES[metric]] = [_num(v, fmt) for v in table[f"{metric}_median"]]
    return out.reset_index(drop=True)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "—": "--",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def format_table(table: pd.DataFrame, fmt: str) -> str:
    """The leaderboard as csv (raw values), md, latex or html (rounded for reading)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt not in FORMATS:
        raise FusebenchError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    shown = display_table(table)
    if fmt == "md":
        return shown.to_markdown(index=False, disable_numparse=True) + "\n"
    if fmt == "latex":
        escaped = shown.map(_latex_escape)
        escaped.columns = [_latex_escape(c) for c in shown.columns]
        n_keys = list(table.columns).index("kind")
        spec = "l" * n_keys + "r" * (len(shown.columns) - n_keys)
        return escaped.to_latex(index=False, escape=False, column_format=spec)
    return shown.to_html(index=False, border=0, classes="leaderboard", escape=True) + "\n"


def log_to_parent(runset, table: pd.DataFrame, warn) -> bool:
    """Attach the table (csv + md) to the study's parent run so it shows in the MLflow UI."""
    from dashboards.data import open_client

    if runset.parent_run_id is None:
        warn(f"{runset.source} has no parent run: the leaderboard is not logged to MLflow")
        return False
    try:
        client, _ = open_client(runset.tracking_uri)
        for fmt, suffix in (("csv", "csv"), ("md", "md")):
            path = f"{schema.LEADERBOARD_DIR}/leaderboard.{suffix}"
            client.log_text(runset.parent_run_id, format_table(table, fmt), path)
    except Exception as exc:  # noqa: BLE001 - an unwritable artifact store must not lose the table
        warn(f"could not log the leaderboard to parent run {runset.parent_run_id}: {exc}")
        return False
    return True
