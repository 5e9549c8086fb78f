"""The HTML report: self-contained, plots carry the logged numbers, Optuna plots only when the storage
opens, artifacts on the parent run, and a real render in headless Chromium (not a blank page)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import chromium_or_skip

sys.path.insert(0, str(Path(__file__).parent))
import _dashboards_runs as synth  # noqa: E402

from dashboards import plots  # noqa: E402
from dashboards.data import load_curves, load_runs  # noqa: E402
from dashboards.leaderboard import build_leaderboard  # noqa: E402
from dashboards.report import PLOT_IDS, build_report  # noqa: E402

STUDY = "dash-report"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash_report")
    journal = synth.write_optuna_journal(tmp / "study.journal", STUDY)
    uri, records, parent = synth.write_study(tmp, experiment="fb-report", study=STUDY, storage=journal)
    out = tmp / "report.html"
    from mlflow.tracking import MlflowClient

    from fusebench.cli import main

    argv = ["report", "--tracking-uri", uri, "--study", STUDY, "-o", str(out)]
    assert main(argv) == 0
    assert MlflowClient(tracking_uri=uri).list_artifacts(parent, "report") == []  # read only by default
    assert main([*argv, "--log-to-run"]) == 0
    return {"uri": uri, "records": records, "parent": parent, "tmp": tmp, "html": out}


def test_report_is_self_contained_with_all_plots(store):
    page = store["html"].read_text(encoding="utf-8")
    for div in PLOT_IDS.values():
        assert f'id="{div}"' in page, div
    # plotly.js inline exactly once, nothing fetched from the network
    assert page.count("plotly.js v") == 1
    assert len(re.findall(r"Plotly\.newPlot\(", page)) == len(PLOT_IDS)
    assert len(page) > 3_000_000  # the library itself is embedded
    assert not re.search(r"<script[^>]+src=", page)
    # outside the library (whose geo defaults name a CDN never used here) nothing points at the network
    library = max(re.findall(r"<script[^>]*>(.*?)</script>", page, re.S), key=len)
    rest = page.replace(library, "")
    assert len(library) > 3_000_000
    assert "cdn.plot.ly" not in rest and "cdn.jsdelivr" not in rest and "mathjax" not in rest.lower()
    assert 'id="leaderboard"' in page
    table = build_leaderboard(load_runs(study=STUDY, tracking_uri=store["uri"]).runs)
    body = page.split('id="leaderboard"', 1)[1].split("</table>", 1)[0]
    assert body.count("<tr") == len(table) + 1
    assert "Best method per configuration" in page


def test_plots_and_report_logged_to_parent_run(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    top = {a.path for a in client.list_artifacts(store["parent"], "report")}
    assert "report/report.html" in top
    logged = {a.path for a in client.list_artifacts(store["parent"], "report/plots")}
    assert logged == {f"report/plots/{d}.html" for d in PLOT_IDS.values()}


def test_finetune_curves_are_mean_and_std_of_logged_curves(store):
    runset = load_runs(study=STUDY, tracking_uri=store["uri"])
    curves = load_curves(runset)
    fig = plots.finetune_curves(runset.runs, curves)
    # every facet: each method's longest budget, averaged over seeds, equals numpy on the logged curves
    for n in (2, 4):
        recs = [r for r in store["records"] if r["n"] == n and r["method"] == "ot" and r["epochs"] == 4]
        stacked = 100 * np.array([r["curve"] for r in recs])
        mean_traces = [
            t
            for t in fig.data
            if t.name == "ot"
            and t.mode == "lines+markers"
            and len(t.y) == 5
            and np.allclose(t.y, stacked.mean(axis=0))
        ]
        assert len(mean_traces) == 1, f"no ot mean curve for N={n}"
        band = [
            t
            for t in fig.data
            if t.fill == "toself" and t.legendgroup == "ot" and t.xaxis == mean_traces[0].xaxis
        ]
        assert len(band) == 1
        upper = np.asarray(band[0].y[:5])
        np.testing.assert_allclose(upper, stacked.mean(axis=0) + stacked.std(axis=0, ddof=1))
    # one colour per method in every figure
    colours = {t.line.color for t in fig.data if t.name == "ot" and t.mode == "lines+markers"}
    assert colours == {plots.method_color("ot")}


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    pts = pd.DataFrame({"t": rng.uniform(0, 10, 60).round(1), "a": rng.uniform(0, 1, 60).round(2)})
    front = plots.pareto_front(pts, "t", "a")
    dominated = [
        any((o.t <= p.t and o.a >= p.a) and (o.t < p.t or o.a > p.a) for o in pts.itertuples())
        for p in pts.itertuples()
    ]
    expected = {(p.t, p.a) for p, d in zip(pts.itertuples(), dominated) if not d}
    assert set(zip(front.t, front.a)) == expected


def test_unreachable_optuna_storage_leaves_plots_out_with_a_note(store):
    runset = load_runs(study=STUDY, tracking_uri=store["uri"])
    curves = load_curves(runset)
    for storage in (str(store["tmp"] / "gone.journal"), f"sqlite:///{store['tmp'] / 'gone.db'}", None):
        runset.storage = storage
        page, figs, notes = build_report(runset, curves)
        assert set(figs) == {"finetune", "accuracy_vs_time", "cost", "lmc"}
        assert any("Optuna" in n for n in notes)
        assert PLOT_IDS["optuna_history"] not in page and "left out" in page
    assert not (store["tmp"] / "gone.db").exists()  # never created by the report


def test_experiment_report_without_study(store, tmp_path):
    from fusebench.cli import main

    out = tmp_path / "sub" / "exp.html"
    assert (
        main(
            [
                "report",
                "--tracking-uri",
                store["uri"],
                "--experiment",
                "fb-report",
                "-o",
                str(out),
                "--no-log",
            ]
        )
        == 0
    )
    page = out.read_text(encoding="utf-8")
    assert PLOT_IDS["finetune"] in page and PLOT_IDS["optuna_history"] not in page


def test_ui_binds_loopback_and_warns_otherwise(store, capsys):
    from fusebench.cli import main

    assert main(["ui", "--tracking-uri", store["uri"], "--port", "5123", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "http://127.0.0.1:5123" in out.out
    assert f"--backend-store-uri {store['uri']} --host 127.0.0.1 --port 5123" in out.out
    assert "warning" not in out.err
    assert main(["ui", "--tracking-uri", store["uri"], "--host", "0.0.0.0", "--dry-run"]) == 0
    assert "warning: binding the MLflow UI to 0.0.0.0" in capsys.readouterr().err
    assert main(["ui", "--port", "70000", "--dry-run"]) == 2


def _chromium() -> str:
    return chromium_or_skip()


_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,2000",
    "--virtual-time-budget=5000",
]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(store, tmp_path):
    from PIL import Image

    exe = _chromium()
    url = store["html"].resolve().as_uri()
    shot = tmp_path / "report.png"
    # one browser start for both: the screenshot is written to a file, the DOM to stdout
    dom = subprocess.run(
        [exe, *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--dump-dom", url],
        check=True,
        capture_output=True,
        timeout=120,
        text=True,
    ).stdout
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1400)
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    # plotly.js ran offline: every plot div now holds a rendered plot with SVG
    for div in PLOT_IDS.values():
        block = dom.split(f'id="{div}"', 1)
        assert len(block) == 2, div
        assert "plot-container" in block[1][:3000] and "<svg" in block[1][:20000], div
    assert dom.count('class="main-svg"') >= len(PLOT_IDS)
    table = dom.split('id="leaderboard"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") > 10 and "best member + FT" in table
