"""Leaderboard numbers against an independent numpy aggregation of what was logged, every export format
well formed, and the user errors (unknown or empty experiment, unknown study, incomplete runs) reported
as one line with exit code 2."""

from __future__ import annotations

import io
import re
import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _dashboards_runs as synth  # noqa: E402

from bench.errors import FusebenchError  # noqa: E402
from dashboards.data import load_runs  # noqa: E402
from dashboards.leaderboard import build_leaderboard, display_table, format_table  # noqa: E402

STUDY = "dash-study"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash_lb")
    uri, records, parent = synth.write_study(tmp, study=STUDY)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    synth.create_experiment(client, "fb-empty", tmp)
    rng = np.random.default_rng(7)
    base = synth.baselines(rng, (2,), (0, 1), (2,))
    broken = synth.create_experiment(client, "fb-broken", tmp)
    for seed in (0, 1):
        synth.log_run(
            client,
            broken,
            method="avg",
            n=2,
            epochs=2,
            seed=seed,
            sparsity="",
            base=base[(2, seed)],
            rng=rng,
            drop_metrics=("fused_acc_best_val",),
        )
    partial = synth.create_experiment(client, "fb-partial", tmp)
    good = [
        synth.log_run(
            client, partial, method="nt", n=2, epochs=2, seed=s, sparsity="0.5", base=base[(2, s)], rng=rng
        )
        for s in (0, 1)
    ]
    nt = dict(method="nt", n=2, epochs=2, sparsity="0.5", rng=rng)
    bad = synth.log_run(
        client, partial, seed=1, base=base[(2, 1)], drop_metrics=("fused_acc_before_ft",), **nt
    )
    synth.log_run(client, partial, seed=0, base=base[(2, 0)], status="FAILED", **nt)
    return {"uri": uri, "records": records, "parent": parent, "tmp": tmp, "good": good, "bad": bad}


def _cli(argv):
    from fusebench.cli import main

    return main(argv)


def _independent(records, key, metric):
    groups = defaultdict(list)
    for r in records:
        groups[key(r)].append(r["metrics"][metric])
    return {
        k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else np.nan, len(v))
        for k, v in groups.items()
    }


def _cfg(r):
    return (synth.DATASET, r["arch"], r["n"], r["method"], r["sparsity"], r["epochs"])


def test_leaderboard_equals_independent_aggregation(store):
    runset = load_runs(study=STUDY, tracking_uri=store["uri"])
    assert len(runset.runs) == len(store["records"])
    table = build_leaderboard(runset.runs)
    methods = table[table["kind"] == "method"]
    assert len(methods) == len({_cfg(r) for r in store["records"]})
    for metric in (
        "fused_acc_before_ft",
        "fused_acc_best_val",
        "gain_over_best_member",
        "gain_over_ensemble",
    ):
        expected = _independent(store["records"], _cfg, metric)
        for _, row in methods.iterrows():
            mean, std, n = expected[
                (row.dataset, row.arch, row.n_members, row.method, row.sparsity, row.finetune_epochs)
            ]
            assert row[f"{metric}_mean"] == pytest.approx(mean, abs=1e-12)
            assert row[f"{metric}_std"] == pytest.approx(std, abs=1e-12)
            assert row["n"] == n == 3
    times = defaultdict(list)
    for r in store["records"]:
        times[_cfg(r)].append(r["metrics"]["fusion_time_s"])
    for _, row in methods.iterrows():
        key = (row.dataset, row.arch, row.n_members, row.method, row.sparsity, row.finetune_epochs)
        assert row["fusion_time_s_median"] == pytest.approx(float(np.median(times[key])))


def test_baselines_are_counted_once_per_seed(store):
    table = build_leaderboard(load_runs(study=STUDY, tracking_uri=store["uri"]).runs)
    base = table[table["kind"] == "baseline"]
    cells = {(r["n"], r["epochs"]) for r in store["records"]}
    assert len(base) == 3 * len(cells)
    # one value per (N, E, seed): three methods share the members, so n must be the seed count, not 9
    per_cell = {}
    for r in store["records"]:
        per_cell[(r["n"], r["epochs"], r["seed"])] = r["metrics"]
    for n, e in cells:
        seeds = [per_cell[(n, e, s)] for s in (0, 1, 2)]
        for name, metric in (
            ("ensemble", "ensemble_acc"),
            ("best member", "best_member_acc"),
            ("best member + FT", "best_member_ft_acc"),
        ):
            row = base[(base.n_members == n) & (base.finetune_epochs == e) & (base.method == name)]
            assert len(row) == 1
            values = [m[metric] for m in seeds]
            assert int(row["n"].iloc[0]) == 3
            assert row["fused_acc_best_val_mean"].iloc[0] == pytest.approx(np.mean(values))
            assert row["fused_acc_best_val_std"].iloc[0] == pytest.approx(np.std(values, ddof=1))


def test_group_by_method_pools_configurations(store):
    runs = load_runs(study=STUDY, tracking_uri=store["uri"]).runs
    table = build_leaderboard(runs, ["method"])
    expected = _independent(store["records"], lambda r: r["method"], "fused_acc_best_val")
    methods = table[table["kind"] == "method"].set_index("method")
    for method, (mean, std, n) in expected.items():
        assert methods.loc[method, "fused_acc_best_val_mean"] == pytest.approx(mean)
        assert methods.loc[method, "fused_acc_best_val_std"] == pytest.approx(std)
        assert methods.loc[method, "n"] == n
    ens = table[(table["kind"] == "baseline") & (table["method"] == "ensemble")]
    cells = {(r["n"], r["epochs"], r["seed"]): r["metrics"]["ensemble_acc"] for r in store["records"]}
    assert int(ens["n"].iloc[0]) == len(cells)
    assert ens["fused_acc_best_val_mean"].iloc[0] == pytest.approx(np.mean(list(cells.values())))
    # a run param works as a key too
    by_width = build_leaderboard(runs, ["model.width,method"])
    assert set(by_width.loc[by_width.kind == "method", "params.model.width"]) == {"64", "128"}
    with pytest.raises(FusebenchError, match="unknown key 'colour'"):
        build_leaderboard(runs, ["colour"])


def test_sorted_by_setting_then_accuracy(store):
    table = build_leaderboard(load_runs(study=STUDY, tracking_uri=store["uri"]).runs)
    keys = ["dataset", "arch", "n_members", "finetune_epochs"]
    assert list(table[keys].itertuples(index=False)) == sorted(table[keys].itertuples(index=False))
    for _, block in table.groupby(keys):
        acc = block["fused_acc_best_val_mean"].tolist()
        assert acc == sorted(acc, reverse=True)


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.header, self._row, self._in_cell, self._in_head = [], [], None, False, False

    def handle_starttag(self, tag, attrs):
        if tag == "thead":
            self._in_head = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._in_cell = True
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "thead":
            self._in_head = False
        elif tag == "tr":
            (self.header if self._in_head else self.rows).append(self._row)
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data


def test_every_format_is_well_formed(store):
    table = build_leaderboard(load_runs(study=STUDY, tracking_uri=store["uri"]).runs)
    shown = display_table(table)

    back = pd.read_csv(io.StringIO(format_table(table, "csv")), keep_default_na=False)
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    np.testing.assert_allclose(back["fused_acc_best_val_mean"], table["fused_acc_best_val_mean"], rtol=1e-12)

    md = format_table(table, "md").strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md]
    assert cells[0] == list(shown.columns)
    assert all(re.fullmatch(r":?-+:?", c) for c in cells[1])
    assert len(cells) - 2 == len(table) and all(len(row) == len(shown.columns) for row in cells)
    assert cells[2:] == shown.values.tolist()

    latex = format_table(table, "latex")
    m = re.search(r"\\begin\{tabular\}\{([lrc]+)\}(.*)\\end\{tabular\}", latex, re.S)
    assert m, latex[:200]
    ncols = len(m.group(1))
    assert ncols == len(shown.columns)
    body = [line for line in m.group(2).splitlines() if line.strip().endswith(r"\\")]
    assert len(body) == len(table) + 1  # header + rows
    for line in body:
        assert len(re.findall(r"(?<!\\)&", line)) == ncols - 1, line
    assert r"$\pm$" in latex and "±" not in latex

    parser = _Tables()
    parser.feed(format_table(table, "html"))
    assert [h.strip() for h in parser.header[0]] == list(shown.columns)
    assert len(parser.rows) == len(table)
    assert parser.rows[0] == shown.iloc[0].tolist()


def test_cli_writes_file_prints_and_logs_to_parent(store, capsys):
    from mlflow.tracking import MlflowClient

    out = store["tmp"] / "lb.csv"
    argv = ["leaderboard", "--tracking-uri", store["uri"], "--study", STUDY, "-o", str(out)]
    assert _cli(argv) == 0
    assert MlflowClient(tracking_uri=store["uri"]).list_artifacts(store["parent"], "leaderboard") == []
    assert _cli([*argv, "--log-to-run"]) == 0
    assert pd.read_csv(out).shape[0] == len(
        build_leaderboard(load_runs(study=STUDY, tracking_uri=store["uri"]).runs)
    )

    logged = {
        a.path for a in MlflowClient(tracking_uri=store["uri"]).list_artifacts(store["parent"], "leaderboard")
    }
    assert logged == {"leaderboard/leaderboard.csv", "leaderboard/leaderboard.md"}
    capsys.readouterr()
    assert (
        _cli(["leaderboard", "--tracking-uri", store["uri"], "--experiment", "fb-dash", "--format", "latex"])
        == 0
    )
    assert r"\begin{tabular}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--experiment", "no-such-exp"], "unknown experiment 'no-such-exp'"),
        (["--experiment", "fb-empty"], "experiment 'fb-empty'"),
        (["--study", "no-such-study"], "unknown study 'no-such-study'"),
        (["--experiment", "fb-broken"], "none is usable"),
        (["--group-by", "colour", "--experiment", "fb-dash"], "unknown key 'colour'"),
        (["--experiment", "fb-dash", "--log-to-run"], "--log-to-run needs --study"),
    ],
)
def test_user_errors_exit_2_with_one_line(store, capsys, argv, message):
    for command in ("leaderboard", "report"):
        extra = ["-o", str(store["tmp"] / "x.html")] if command == "report" else []
        if command == "report" and "--group-by" in argv:
            continue
        assert _cli([command, "--tracking-uri", store["uri"], *argv, *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("fusebench")]
        assert any(message in line for line in lines), err
        assert "Traceback" not in err


def test_missing_store_is_an_error_and_not_created(tmp_path, capsys):
    db = tmp_path / "nope.db"
    assert _cli(["leaderboard", "--tracking-uri", f"sqlite:///{db}", "--study", "s"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not db.exists()


def test_incomplete_runs_are_skipped_with_a_warning(store, capsys):
    assert (
        _cli(["leaderboard", "--tracking-uri", store["uri"], "--experiment", "fb-partial", "--format", "csv"])
        == 0
    )
    captured = capsys.readouterr()
    assert f"skipping run {store['bad']['run_id']}" in captured.err
    assert "fused_acc_before_ft" in captured.err
    assert "1 FAILED" in captured.err
    table = pd.read_csv(io.StringIO(captured.out), keep_default_na=False)
    row = table[table["kind"] == "method"].iloc[0]
    assert row["n"] == 2
    assert row["fused_acc_best_val_mean"] == pytest.approx(
        np.mean([g["metrics"]["fused_acc_best_val"] for g in store["good"]])
    )
