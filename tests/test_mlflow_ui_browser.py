"""The MLflow UI a person browses after a sweep, checked in a real browser: `fusebench ui` serves the store
on 127.0.0.1 and headless Chromium renders the experiment's runs table with the study's parent run, and a
trial run's page with its descriptive name. The test starts and stops the server itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import chromium_or_skip
from mlflow import MlflowClient

from sweeps.runner import run_sweep
from sweeps.spec import parse_spec

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _chromium() -> str:
    return chromium_or_skip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(exe: str, url: str, profile) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
             "--virtual-time-budget=20000", f"--user-data-dir={profile}", "--dump-dom"]  # fmt: skip
    return subprocess.run([exe, *flags, url], capture_output=True, text=True, timeout=180, check=True).stdout


def test_mlflow_ui_shows_named_study_runs(tmp_path, one_thread):
    exe = _chromium()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec(
        {
            "study": "ui-check",
            "base": {"experiment": "fusebench-ui", "model": {"width": 8}, "members": {"epochs": 1,
                     "cache_dir": str(tmp_path / "cache")}, "fusion": {"measure_memory": False},
                     "finetune": {"epochs": 0}},
            "space": {"fusion.method": {"type": "categorical", "choices": ["nt", "avg"]}},
            "objectives": [{"metric": "fused_acc_best_val", "direction": "maximize"}],
            "sampler": {"type": "grid"},
        },
        source="<ui test>",
    )  # fmt: skip
    client = MlflowClient(uri)
    # artifacts under tmp_path: an experiment made with MLflow's default artifact root writes to ./mlruns
    client.create_experiment("fusebench-ui", artifact_location=(tmp_path / "artifacts").as_uri())
    result = run_sweep(spec, tracking_uri=uri, runs_dir=tmp_path / "runs", out=None)
    exp = client.get_experiment_by_name("fusebench-ui")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    names = sorted(r.info.run_name for r in children)
    assert {n.rsplit(" · trial ", 1)[0] for n in names} == {
        "avg · mlp-8x2 · N=2 · reset · seed 0",
        "nt · mlp-8x2 · N=2 · s=0.5 · reset · seed 0",
    }
    assert sorted(n.rsplit(" · trial ", 1)[1] for n in names) == ["0", "1"]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fusebench", "ui", "--tracking-uri", uri, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 150
        while True:
            assert server.poll() is None, server.stdout.read()[-2000:]
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the MLflow UI did not answer within 150 s"
            time.sleep(1)
        runs_page = f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        dom = _dom(exe, runs_page, tmp_path / "profile")
        assert "study-ui-check" in dom, "the study's parent run is listed by name"
        assert "Run Name" in dom and "Traces" in dom  # the runs table of an experiment, not an error page
        child = children[0]
        page = (
            f"{base}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}?workflowType=machine_learning"
        )
        dom = _dom(exe, page, tmp_path / "profile")
        assert child.info.run_name in dom and "digits" in dom  # its name, and the data set it logged
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=2)
