"""One self-contained HTML report of an experiment or study: summary, leaderboard, plots.

The file must open from a laptop with no server and no internet, so plotly.js is embedded once in the
page head (no CDN) and every figure is a ``<div>`` that uses it. The Optuna plots need the study's
storage; when it cannot be opened read-only (another machine's journal file, an unreachable database)
they are left out with a note, because the rest of the report only needs MLflow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from bench import schema
from bench.tracking import sqlite_path
from dashboards import plots
from dashboards.data import RunSet, load_curves, open_client, warn_stderr
from dashboards.leaderboard import ACC_AFTER, BASELINES, build_leaderboard, display_table

#: div ids of the figures, in page order (tests look for them).
PLOT_IDS = {
    "finetune": "plot-finetune",
    "accuracy_vs_time": "plot-accuracy-vs-time",
    "cost": "plot-cost",
    "lmc": "plot-lmc",
    "optuna_history": "plot-optuna-history",
    "optuna_importance": "plot-optuna-importance",
}
_PLOT_TITLES = {
    "finetune": "Fine-tune curves",
    "accuracy_vs_time": "Accuracy against fusion time",
    "cost": "Fusion cost against ensemble size and width",
    "lmc": "Linear mode connectivity (accuracy along the path between two aligned members)",
    "optuna_history": "Optuna optimization history",
    "optuna_importance": "Optuna parameter importances",
}


def load_optuna_study(storage: str | None, study_name: str | None):
    """(study, None) when the storage opens read-only, else (None, the reason)."""
    if not storage:
        return None, "the study's parent run has no fusebench.storage tag"
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if "://" in storage and not storage.startswith("file://"):
            db = sqlite_path(storage)
            if db is not None and not db.exists():
                return None, f"Optuna storage {storage} not found on this machine"
            # skip_table_creation: a report must never create or migrate tables in someone's database
            st = RDBStorage(storage, skip_table_creation=True)
        else:
            path = Path(storage.removeprefix("file://"))
            if not path.is_file():
                return None, f"Optuna journal {path} not found on this machine"
            st = JournalStorage(JournalFileBackend(str(path)))
        names = optuna.get_all_study_names(st)
        name = study_name if study_name in names else (names[0] if len(names) == 1 else None)
        if name is None:
            return (
                None,
                f"no study {study_name!r} in Optuna storage {storage} (has: {', '.join(names) or 'none'})",
            )
        return optuna.load_study(study_name=name, storage=st), None
    except Exception as exc:  # noqa: BLE001 - any storage failure only removes two plots
        return None, f"could not open Optuna storage {storage}: {type(exc).__name__}: {exc}"


def optuna_figures(study) -> tuple[dict[str, go.Figure], list[str]]:
    """Optimization history and parameter importances (first objective of a multi-objective study)."""
    import optuna
    from optuna.visualization import plot_optimization_history, plot_param_importances

    figs, notes = {}, []
    kwargs = {}
    if len(study.directions) > 1:
        names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
        kwargs = {"target": lambda t: t.values[0], "target_name": names[0]}
        notes.append(f"multi-objective study: the Optuna plots show the first objective ({names[0]})")
    elif study.metric_names:
        kwargs = {"target_name": study.metric_names[0]}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return figs, ["the Optuna study has no completed trials: no optimization history"]
    for key, make in (
        ("optuna_history", plot_optimization_history),
        ("optuna_importance", plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "few trials per regime": the plot is still what exists
                fig = make(study, **kwargs)
            fig.update_layout(template=plots._TEMPLATE, height=420)
            figs[key] = fig
        except Exception as exc:  # noqa: BLE001 - e.g. too few trials or no varying parameter
            notes.append(f"{_PLOT_TITLES[key]} left out: {exc}")
    return figs, notes


def summary_rows(table: pd.DataFrame) -> list[dict]:
    """Best method per (dataset, arch, N, fine-tune epochs), with its margin over the baselines."""
    out = []
    block = [k for k in ("dataset", "arch", "n_members", "finetune_epochs") if k in table]
    mean = f"{ACC_AFTER}_mean"
    for key, group in table.groupby(block, sort=True):
        methods = group[group["kind"] == "method"].dropna(subset=[mean])
        if methods.empty:
            continue
        best = methods.loc[methods[mean].idxmax()]
        baselines = group[group["kind"] == "baseline"].set_index("method")[mean]
        out.append(
            {
                "setting": dict(zip(block, key if isinstance(key, tuple) else (key,))),
                "method": best["method"],
                "sparsity": best.get("sparsity", ""),
                "acc": best[mean],
                "std": best[f"{ACC_AFTER}_std"],
                "n": int(best["n"]),
                "vs": {b: best[mean] - baselines[b] for b in BASELINES if b in baselines},
            }
        )
    return out


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:linear-gradient(90deg,#1f3b73,#2f6fb2);color:#fff;padding:28px 40px}
header h1{margin:0 0 6px;font-size:28px}header p{margin:2px 0;opacity:.9;font-size:14px}
main{max-width:1320px;margin:0 auto;padding:20px 40px 60px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:18px 24px;margin:20px 0}
h2{margin:0 0 12px;font-size:20px;color:#1f3b73}
table.leaderboard{border-collapse:collapse;width:100%;font-size:13px}
table.leaderboard th{background:#eef2f8;text-align:left;padding:6px 8px;border-bottom:2px solid #c9d3e3;position:sticky;top:0}
table.leaderboard td{padding:5px 8px;border-bottom:1px solid #eceff4;white-space:nowrap}
table.leaderboard td.num{text-align:right;font-variant-numeric:tabular-nums}
table.leaderboard tr.baseline td{color:#5d6675;font-style:italic;background:#fafbfc}
table.leaderboard tr.block-start td{border-top:2px solid #c9d3e3}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:middle}
ul.summary{margin:0;padding-left:20px}ul.summary li{margin:4px 0}
.gain{color:#1a7f37}.loss{color:#b42318}.note{color:#8a5300;background:#fff8e6;border-left:4px solid #f0b429;padding:6px 12px;margin:6px 0}
.scroll{overflow-x:auto;max-height:640px;overflow-y:auto}
footer{color:#7a8291;font-size:12px;text-align:center;padding:10px}
"""


def _pp(value: float) -> str:
    cls = "gain" if value >= 0 else "loss"
    return f'<span class="{cls}">{100 * value:+.2f} pp</span>'


def _summary_html(rows: list[dict], methods: list[str]) -> str:
    if not rows:
        return "<p>No configuration has a fused accuracy.</p>"
    items = []
    for r in rows:
        s = r["setting"]
        where = " · ".join(
            html.escape(str(v))
            if k in ("dataset", "arch")
            else (f"N={v}" if k == "n_members" else f"{v} FT epochs")
            for k, v in s.items()
        )
        name = r["method"] + (f" (s={r['sparsity']})" if r["sparsity"] else "")
        std = "" if math.isnan(r["std"]) else f" ± {100 * r['std']:.2f}"
        vs = ", ".join(f"{_pp(v)} vs {html.escape(b)}" for b, v in r["vs"].items() if not math.isnan(v))
        color = plots.method_color(r["method"], methods)
        items.append(
            f'<li><b>{where}</b>: <span class="swatch" style="background:{color}"></span><b>{html.escape(name)}</b> '
            f"{100 * r['acc']:.2f}{std} % (n={r['n']}){'; ' + vs if vs else ''}</li>"
        )
    return '<ul class="summary">' + "".join(items) + "</ul>"


def _table_html(table: pd.DataFrame, methods: list[str]) -> str:
    shown = display_table(table)
    numeric_from = list(shown.columns).index("n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    block_cols = [c for c in ("dataset", "arch", "n_members", "finetune_epochs") if c in table]
    body, previous = [], None
    for i, row in shown.iterrows():
        classes = []
        if table.loc[i, "kind"] == "baseline":
            classes.append("baseline")
        block = tuple(table.loc[i, block_cols])
        if previous is not None and block != previous:
            classes.append("block-start")
        previous = block
        cells = []
        for j, (col, value) in enumerate(row.items()):
            text = html.escape(str(value))
            if col == "method":
                text = f'<span class="swatch" style="background:{plots.method_color(str(value), methods)}"></span>{text}'
            cells.append(f'<td class="num">{text}</td>' if j >= numeric_from else f"<td>{text}</td>")
        body.append(f'<tr class="{" ".join(classes)}">' + "".join(cells) + "</tr>")
    return (
        '<div class="scroll"><table class="leaderboard" id="leaderboard"><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table></div>"
    )


def _lmc_curves(runset: RunSet) -> pd.DataFrame | None:
    runs = runset.runs
    if schema.LMC_BARRIER_ACC not in runs or runs[schema.LMC_BARRIER_ACC].isna().all():
        return None
    lmc = dataclasses.replace(runset, runs=runs.dropna(subset=[schema.LMC_BARRIER_ACC]))
    return load_curves(lmc, schema.LMC_ACC)


def build_report(
    runset: RunSet, curves: pd.DataFrame | None = None
) -> tuple[str, dict[str, go.Figure], list[str]]:
    """(the HTML page, the figures by key, notes about what was left out)."""
    runs = runset.runs
    table = build_leaderboard(runs)
    if curves is None:
        curves = load_curves(runset)
    notes = list(runset.skipped[:1])
    if len(runset.skipped) > 1:
        notes = [
            f"{len(runset.skipped)} runs were left out for missing metrics or tags (first: {runset.skipped[0]})"
        ]
    figs: dict[str, go.Figure] = {}
    for key, fig in (
        ("finetune", plots.finetune_curves(runs, curves)),
        ("accuracy_vs_time", plots.accuracy_vs_time(table)),
        ("cost", plots.cost_scaling(runs)),
        ("lmc", plots.lmc_curves(runs, _lmc_curves(runset))),
    ):
        if fig is None and key == "lmc":
            continue  # a diagnostic of N = 2 runs with fusion.lmc on: absent, not missing
        if fig is None:
            notes.append(f"{_PLOT_TITLES[key]} left out: the runs have no data for it")
        else:
            figs[key] = fig
    if runset.study_name is not None:
        study, why = load_optuna_study(runset.storage, runset.study_name)
        if study is None:
            notes.append(f"Optuna optimization history and parameter importances left out: {why}")
        else:
            optuna_figs, optuna_notes = optuna_figures(study)
            figs.update(optuna_figs)
            notes.extend(optuna_notes)
    methods = sorted(runs["method"].unique())
    sections = []
    for key, fig in figs.items():
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=PLOT_IDS[key],
            config={"displaylogo": False, "responsive": True},
        )
        sections.append(f"<section><h2>{_PLOT_TITLES[key]}</h2>{div}</section>")
    notes_html = "".join(f'<div class="note">{html.escape(n)}</div>' for n in notes)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"fusebench report — {runset.source}"
    n_configs = int((table["kind"] == "method").sum())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
</head><body>
<header><h1>{html.escape(title)}</h1>
<p>{len(runs)} runs · {n_configs} configurations · methods: {html.escape(", ".join(methods))}</p>
<p>tracking store: {html.escape(runset.tracking_uri)} · generated {now}</p></header>
<main>
<section id="summary"><h2>Best method per configuration</h2>{_summary_html(summary_rows(table), methods)}{notes_html}</section>
<section><h2>Leaderboard</h2>
<p>Accuracies in % as mean ± std over seeds (n runs); Δ in percentage points of the fine-tuned accuracy; time, memory and parameters are medians. Baseline rows in italics.</p>
{_table_html(table, methods)}</section>
{"".join(sections)}
</main><footer>fusebench · read from MLflow only</footer></body></html>
"""
    return page, figs, notes


def write_report(
    runset: RunSet, output: str | Path, *, log: bool = False, warn: Callable[[str], None] = warn_stderr
) -> Path:
    """Write the report; with ``log`` and a study, also attach it and each plot to the parent run."""
    page, figs, _ = build_report(runset)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    if log and runset.study_name is not None:
        if runset.parent_run_id is None:
            warn(f"{runset.source} has no parent run: the report is not logged to MLflow")
            return out
        try:
            client, _ = open_client(runset.tracking_uri)
            client.log_artifact(runset.parent_run_id, str(out), schema.REPORT_DIR)
            for key, fig in figs.items():
                # each plot stands alone in the MLflow UI's artifact viewer, which has no internet either
                client.log_text(
                    runset.parent_run_id,
                    fig.to_html(include_plotlyjs=True),
                    f"{schema.REPORT_DIR}/plots/{PLOT_IDS[key]}.html",
                )
        except Exception as exc:  # noqa: BLE001 - the file on disk is the product; logging is a bonus
            warn(f"could not log the report to parent run {runset.parent_run_id}: {exc}")
    return out
