"""Plotly figures of a run set: fine-tune curves, accuracy against fusion time, cost scaling.

Every figure colours a method the same way (``method_color``), so a reader can follow "nt" across the
report; sparsity variants of one method share its colour and differ by dash.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.colors as pcolors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bench import schema
from dashboards.leaderboard import ACC_AFTER
from fusion.registry import display_order

_KNOWN = display_order()  # the fusion registry's methods in display order: a method keeps its colour
_PALETTE = pcolors.qualitative.D3
_BASELINE_COLORS = {"ensemble": "#3b3b3b", "best member": "#9a9a9a", "best member + FT": "#6b6b6b"}
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
_TEMPLATE = "plotly_white"


def method_color(method: str, methods: list[str] | None = None) -> str:
    """A stable colour per method: the known methods always get the same one, others follow."""
    if method in _BASELINE_COLORS:
        return _BASELINE_COLORS[method]
    if method in _KNOWN:
        return _PALETTE[_KNOWN.index(method)]
    others = sorted(m for m in (methods or [method]) if m not in _KNOWN and m not in _BASELINE_COLORS)
    index = len(_KNOWN) + (others.index(method) if method in others else 0)
    return _PALETTE[index % len(_PALETTE)]


def _rgba(color: str, alpha: float) -> str:
    r, g, b = pcolors.hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def _band(fig, x: list, mean: list, std: list, color: str, alpha: float, row: int, col: int, **kw) -> None:
    """The mean ± std band of a curve (drawn under it, not in the legend)."""
    upper = [m + s for m, s in zip(mean, std)]
    lower = [m - s for m, s in zip(mean, std)]
    band = go.Scatter(
        x=x + x[::-1],
        y=upper + lower[::-1],
        mode="lines",
        fill="toself",
        fillcolor=_rgba(color, alpha),
        line={"width": 0},
        hoverinfo="skip",
        showlegend=False,
        **kw,
    )
    fig.add_trace(band, row=row, col=col)


def variant_labels(runs: pd.DataFrame) -> pd.Series:
    """ "nt" or "nt (s=0.5)" when a method was run at several sparsities."""
    setting = ["dataset", "arch", "n_members", "method"]
    several = runs.groupby(setting)["sparsity"].transform("nunique") > 1
    return pd.Series(
        [
            f"{m} (s={s})" if many and s else m
            for m, s, many in zip(runs["method"], runs["sparsity"], several)
        ],
        index=runs.index,
    )


def _dash(runs: pd.DataFrame) -> dict[str, str]:
    dashes = {}
    for _, group in runs.groupby("method"):
        for i, label in enumerate(sorted(group["variant"].unique())):
            dashes[label] = _DASHES[i % len(_DASHES)]
    return dashes


def _facet_title(dataset: str, arch: str, n: int, extra: str = "") -> str:
    return f"{dataset} · {arch} · N={n}{extra}"


def _grid(n_facets: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, n_facets)
    return math.ceil(n_facets / cols), cols


def finetune_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> go.Figure | None:
    """Test accuracy per fine-tune epoch, mean over seeds with a ±1 std band, one panel per setting.

    Within a panel each method uses its runs with the longest budget, so every point is a mean over
    seeds of one configuration rather than a mix of budgets.
    """
    if curves.empty:
        return None
    runs = runs.assign(variant=variant_labels(runs))
    methods = sorted(runs["method"].unique())
    dashes = _dash(runs)
    merged = curves.merge(
        runs[["run_id", "dataset", "arch", "n_members", "finetune_epochs", "variant", "method", "seed"]]
    )
    facets = sorted(merged.groupby(["dataset", "arch", "n_members"]).groups)
    rows, cols = _grid(len(facets))
    titles = []
    for dataset, arch, n in facets:
        budget = runs[(runs.dataset == dataset) & (runs.arch == arch) & (runs.n_members == n)][
            "finetune_epochs"
        ].max()
        titles.append(_facet_title(dataset, arch, n, f" · up to {budget} epochs"))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=False)
    shown: set[str] = set()
    for i, (dataset, arch, n) in enumerate(facets):
        row, col = i // cols + 1, i % cols + 1
        facet = merged[(merged.dataset == dataset) & (merged.arch == arch) & (merged.n_members == n)]
        for variant, vrun in sorted(facet.groupby("variant"), key=lambda kv: kv[0]):
            longest = vrun[vrun.finetune_epochs == vrun.finetune_epochs.max()]
            stats = longest.groupby("step")["value"].agg(["mean", "std", "count"]).reset_index()
            method = vrun["method"].iloc[0]
            color = method_color(method, methods)
            x = stats["step"].tolist()
            mean = (100 * stats["mean"]).tolist()
            std = (100 * stats["std"].fillna(0)).tolist()
            _band(fig, x, mean, std, color, 0.18, row, col, legendgroup=variant)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=mean,
                    mode="lines+markers",
                    name=variant,
                    legendgroup=variant,
                    showlegend=variant not in shown,
                    line={"color": color, "dash": dashes.get(variant, "solid")},
                    marker={"size": 5},
                    customdata=np.stack([std, stats["count"]], axis=1),
                    hovertemplate=f"{variant}<br>epoch %{{x}}<br>%{{y:.2f}} ± %{{customdata[0]:.2f}} %"
                    "<br>n=%{customdata[1]}<extra></extra>",
                ),
                row=row,
                col=col,
            )
            shown.add(variant)
        setting = runs[(runs.dataset == dataset) & (runs.arch == arch) & (runs.n_members == n)]
        top = setting[setting.finetune_epochs == setting.finetune_epochs.max()]
        baselines = (schema.ENSEMBLE_ACC, schema.BEST_MEMBER_FT_ACC)
        cells = top.groupby("seed")[[c for c in baselines if c in top]].mean()
        x_end = float(facet["step"].max()) if not facet.empty else 1.0
        for col_name, label in (
            (schema.ENSEMBLE_ACC, "ensemble"),
            (schema.BEST_MEMBER_FT_ACC, "best member + FT"),
        ):
            if col_name in cells and cells[col_name].notna().any():
                level = 100 * cells[col_name].mean()
                fig.add_trace(
                    go.Scatter(
                        x=[0, x_end],
                        y=[level, level],
                        mode="lines",
                        name=label,
                        legendgroup=label,
                        showlegend=label not in shown,
                        line={"color": method_color(label), "dash": "dot", "width": 1.5},
                        hovertemplate=f"{label}: {level:.2f} %<extra></extra>",
                    ),
                    row=row,
                    col=col,
                )
                shown.add(label)
        fig.update_xaxes(title_text="fine-tune epoch", row=row, col=col)
        fig.update_yaxes(title_text="test accuracy (%)", row=row, col=col)
    fig.update_layout(
        template=_TEMPLATE,
        height=360 * rows + 80,
        title="Fine-tuning after fusion (mean ± std over seeds)",
    )
    return fig


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not beaten by a faster-or-equal point with at least the accuracy (min x, max y)."""
    ordered = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False])
    best = -np.inf
    keep = []
    for idx, value in zip(ordered.index, ordered[y]):
        if value > best:
            keep.append(idx)
            best = value
    return ordered.loc[keep]


def accuracy_vs_time(table: pd.DataFrame) -> go.Figure | None:
    """Each configuration's fine-tuned accuracy against its median fusion time; Pareto front per data set."""
    x, y = f"{schema.FUSION_TIME_S}_median", f"{ACC_AFTER}_mean"
    points = table[(table["kind"] == "method")].dropna(subset=[x, y])
    if points.empty or "dataset" not in points:
        return None
    methods = sorted(points["method"].unique()) if "method" in points else []
    datasets = sorted(points["dataset"].unique())
    fig = make_subplots(rows=1, cols=len(datasets), subplot_titles=[f"data set: {d}" for d in datasets])
    shown: set[str] = set()
    for i, dataset in enumerate(datasets, start=1):
        sub = points[points["dataset"] == dataset]
        label_cols = [c for c in ("arch", "n_members", "sparsity", "finetune_epochs") if c in sub]
        for method, group in sub.groupby("method"):
            text = [", ".join(f"{c}={r[c]}" for c in label_cols if r[c] != "") for _, r in group.iterrows()]
            fig.add_trace(
                go.Scatter(
                    x=group[x],
                    y=100 * group[y],
                    mode="markers",
                    name=method,
                    legendgroup=method,
                    showlegend=method not in shown,
                    marker={"color": method_color(method, methods), "size": 10, "opacity": 0.85},
                    error_y={
                        "type": "data",
                        "array": (100 * group[f"{ACC_AFTER}_std"].fillna(0)).tolist(),
                        "thickness": 1,
                    },
                    text=text,
                    hovertemplate="%{text}<br>%{x:.3g} s<br>%{y:.2f} %<extra>" + method + "</extra>",
                ),
                row=1,
                col=i,
            )
            shown.add(method)
        front = pareto_front(sub, x, y)
        fig.add_trace(
            go.Scatter(
                x=front[x],
                y=100 * front[y],
                mode="lines+markers",
                name="Pareto front",
                legendgroup="pareto",
                showlegend=i == 1,
                line={"color": "black", "shape": "hv", "width": 1.5},
                marker={"symbol": "circle-open", "size": 16, "color": "black", "line": {"width": 2}},
                hoverinfo="skip",
            ),
            row=1,
            col=i,
        )
        positive = (sub[x] > 0).all()
        fig.update_xaxes(
            title_text="median fusion time (s)", type="log" if positive else "linear", row=1, col=i
        )
        fig.update_yaxes(title_text="accuracy after fine-tuning (%)", row=1, col=i)
    fig.update_layout(
        template=_TEMPLATE,
        height=460,
        title="Accuracy against fusion time (Pareto front: faster and at least as accurate)",
    )
    return fig


def _width_axis(runs: pd.DataFrame) -> tuple[str, str] | None:
    if "params.model.width" in runs:
        width = pd.to_numeric(runs["params.model.width"], errors="coerce")
        if width.notna().all() and width.nunique() > 1:
            return "params.model.width", "MLP width"
    if schema.MEMBER_PARAMS in runs and runs[schema.MEMBER_PARAMS].nunique() > 1:
        return schema.MEMBER_PARAMS, "member parameters"
    return None


def cost_scaling(runs: pd.DataFrame) -> go.Figure | None:
    """Median fusion time and peak memory per method against ensemble size and width."""
    metrics = [
        (m, t)
        for m, t in (
            (schema.FUSION_TIME_S, "fusion time (s)"),
            (schema.FUSION_PEAK_MEM_MB, "peak memory (MB)"),
        )
        if m in runs and runs[m].notna().any()
    ]
    if not metrics:
        return None
    axes = [("n_members", "ensemble size N")]
    width = _width_axis(runs)
    if width:
        axes.append(width)
    runs = runs.copy()
    for col, _ in axes:
        runs[col] = pd.to_numeric(runs[col], errors="coerce")
    titles = [f"{t} vs {a}" for a_col, a in axes for _, t in metrics]
    fig = make_subplots(rows=len(axes), cols=len(metrics), subplot_titles=titles)
    methods = sorted(runs["method"].unique())
    shown: set[str] = set()
    for r, (axis_col, axis_title) in enumerate(axes, start=1):
        # a line joins points that differ only in its x: against N one line per (method, arch),
        # against width one per (method, N); pooling archs would draw trends that are not there
        series = "arch" if axis_col == "n_members" else "n_members"
        several = runs[series].nunique() > 1
        dashes = {v: _DASHES[i % len(_DASHES)] for i, v in enumerate(sorted(runs[series].unique(), key=str))}
        for c, (metric, metric_title) in enumerate(metrics, start=1):
            stats = runs.groupby(["method", series, axis_col])[metric].agg(["median", "count"]).reset_index()
            for (method, other), group in stats.groupby(["method", series]):
                group = group.sort_values(axis_col)
                label = f"{method} · {'N=' if series == 'n_members' else ''}{other}" if several else method
                fig.add_trace(
                    go.Scatter(
                        x=group[axis_col],
                        y=group["median"],
                        mode="lines+markers",
                        name=label,
                        legendgroup=label,
                        showlegend=label not in shown,
                        line={"color": method_color(method, methods), "dash": dashes[other]},
                        marker={"size": 8},
                        customdata=group["count"],
                        hovertemplate=f"{label}<br>{axis_title} %{{x}}<br>median %{{y:.3g}}"
                        "<br>over %{customdata} runs<extra></extra>",
                    ),
                    row=r,
                    col=c,
                )
                shown.add(label)
            if axis_col == schema.MEMBER_PARAMS:
                fig.update_xaxes(title_text=axis_title, type="log", row=r, col=c)
                fig.update_yaxes(
                    title_text=metric_title,
                    type="log" if (runs[metric] > 0).all() else "linear",
                    row=r,
                    col=c,
                )
                continue
            ticks = sorted(runs[axis_col].dropna().unique())
            fig.update_xaxes(title_text=axis_title, tickmode="array", tickvals=ticks, row=r, col=c)
            fig.update_yaxes(
                title_text=metric_title, type="log" if (runs[metric] > 0).all() else "linear", row=r, col=c
            )
    fig.update_layout(template=_TEMPLATE, height=380 * len(axes) + 60, title="Fusion cost (median over runs)")
    return fig


def lmc_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> go.Figure | None:
    """Linear mode connectivity: test accuracy along the path between two members aligned by each method
    (x: interpolation weight alpha), mean over seeds with a ±1 std band; the barrier is in the legend."""
    if curves is None or curves.empty or schema.LMC_BARRIER_ACC not in runs:
        return None
    lmc = runs.dropna(subset=[schema.LMC_BARRIER_ACC])
    if lmc.empty:
        return None
    data = curves.merge(
        lmc[["run_id", "dataset", "arch", "method", "repair", schema.LMC_BARRIER_ACC]], on="run_id"
    )
    data["alpha"] = data["step"] / 100.0
    methods = sorted(data["method"].unique())
    facets = sorted({(d, a) for d, a in zip(data["dataset"], data["arch"])})
    rows, cols = _grid(len(facets))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{d} / {a}" for d, a in facets])
    for i, (dataset, arch) in enumerate(facets):
        r, c = i // cols + 1, i % cols + 1
        sub = data[(data["dataset"] == dataset) & (data["arch"] == arch)]
        for (method, repair), group in sub.groupby(["method", "repair"]):
            stats = group.groupby("alpha")["value"].agg(["mean", "std"]).reset_index().fillna({"std": 0.0})
            barrier = 100 * group.drop_duplicates("run_id")[schema.LMC_BARRIER_ACC].mean()
            color = method_color(method, methods)
            name = f"{method} ({repair}) barrier {barrier:.1f} pp"
            band = (list(100 * stats["mean"]), list(100 * stats["std"]))
            _band(fig, list(stats["alpha"]), *band, color, 0.15, r, c)
            fig.add_trace(
                go.Scatter(
                    x=stats["alpha"],
                    y=100 * stats["mean"],
                    mode="lines+markers",
                    name=name,
                    line={"color": color, "dash": "solid" if repair == "none" else "dash"},
                ),
                row=r,
                col=c,
            )
    fig.update_xaxes(title_text="alpha (0: member A, 1: member B aligned)")
    fig.update_yaxes(title_text="test accuracy (%)")
    fig.update_layout(template=_TEMPLATE, height=380 * rows)
    return fig
