"""Two worker processes on one study in a real PostgreSQL server started here on 127.0.0.1.

The fixture uses the Debian server binaries (``apt-get install postgresql``; ``.ci/run`` installs
them). Outside CI the test is skipped when they are missing; under CI (``CI=true``) that is a failure.
initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from sweeps_fakes import fake_experiment, fake_score

from bench import schema
from sweeps.runner import run_sweep
from sweeps.spec import apply_params, parse_spec
from sweeps.study import open_storage

pytestmark = pytest.mark.postgres


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin); CI must install them")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql) and not under CI")
    pytest.importorskip("psycopg2", reason="pip install 'fusebench[postgres]' for the PostgreSQL driver")
    root = Path(tempfile.mkdtemp(prefix="fusebench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start",
        "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {root}")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgres_study(tmp_path, mlflow_uri, postgres_url, monkeypatch):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("FAKE_BARRIER_DIR", str(barrier))  # the first trial waits for the other worker's
    spec = parse_spec(yaml.safe_load("""
        base: {experiment: fusebench-tests, finetune: {epochs: 1}}
        space:
          members.n: {type: int, low: 2, high: 40}
          fusion.method: {type: categorical, choices: [nt, avg]}
        objectives: [{metric: fused_acc_best_val, direction: maximize}]
        sampler: {type: random, seed: 0}
        n_trials: 6
    """), source="pg-spec")
    result = run_sweep(spec, study_name="pg", storage=postgres_url, workers=2, tracking_uri=mlflow_uri,
                       runs_dir=tmp_path / "runs", experiment_fn=fake_experiment, out=None)
    study = optuna.load_study(study_name="pg", storage=open_storage(postgres_url, "pg").storage)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(6)) and len(set(numbers)) == 6
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs[schema.TRIAL_WORKER_ATTR]["pid"] for t in trials}) == 2  # both processes ran trials
    client = MlflowClient(mlflow_uri)
    for t in trials:
        (run_id,) = t.user_attrs["fusebench.run_ids"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["fusebench.trial"] == str(t.number) and run.data.tags["fusebench.study"] == "pg"
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.metrics["fused_acc_best_val"] == pytest.approx(t.value)
        assert t.value == pytest.approx(fake_score(apply_params(spec.base, t.params)))
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["fusebench.storage"].startswith("postgresql://postgres@127.0.0.1")
