"""A sweep killed with SIGKILL in the middle of a trial, then resumed with the same command: finished
trials survive, the interrupted one ends FAIL and is retried (never RUNNING forever), the study reaches
its target and neither its MLflow parent run nor the interrupted trial's run is left RUNNING -- on every
storage: a journal file, SQLite and PostgreSQL (started by the fixture)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from bench import schema
from sweeps.study import open_storage

TESTS = Path(__file__).resolve().parent


def _drop_study(url: str, name: str) -> None:
    """The PostgreSQL fixture is shared by the module's tests: start from no study of this name."""
    try:
        optuna.delete_study(study_name=name, storage=open_storage(url, name).storage)
    except KeyError:
        pass


def _driver(tmp_path: Path, uri: str, storage: str | None = None) -> list[str]:
    spec = {"base": {"experiment": "fusebench-tests", "finetune": {"epochs": 1}},
            "space": {"members.n": {"type": "int", "low": 2, "high": 64}},
            "objectives": [{"metric": "fused_acc_best_val", "direction": "maximize"}],
            "sampler": {"type": "random", "seed": 0}, "n_trials": 4}
    (tmp_path / "crash.yaml").write_text(yaml.safe_dump(spec))
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(f"""
        from sweeps_fakes import fake_experiment
        from sweeps.runner import run_sweep
        from sweeps.spec import load_spec

        if __name__ == "__main__":
            import faulthandler
            import signal

            # Ctrl-C as in a terminal, however the tests were started: a shell that runs them in the
            # background without job control makes its children ignore SIGINT
            signal.signal(signal.SIGINT, signal.default_int_handler)
            faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
            run_sweep(load_spec({str(tmp_path / 'crash.yaml')!r}), tracking_uri={uri!r}, storage={storage!r},
                      runs_dir={str(tmp_path / 'runs')!r}, experiment_fn=fake_experiment)
    """))
    return [sys.executable, str(script)]


@pytest.mark.parametrize("kind", ["journal", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_mid_trial_then_resume(tmp_path, mlflow_uri, kind, request):
    storage_url = {"journal": None, "sqlite": f"sqlite:///{tmp_path / 'optuna.db'}"}.get(kind)
    if kind == "postgres":
        storage_url = request.getfixturevalue("postgres_url")
        _drop_study(storage_url, "crash")
    cmd = _driver(tmp_path, mlflow_uri, storage_url)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
           "FAKE_BLOCK_TRIAL": "2", "FAKE_MARKER_DIR": str(markers)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (markers / "started-2").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "trial 2 never started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()

    storage = open_storage(storage_url, "crash", tmp_path / "runs").storage
    study = optuna.load_study(study_name="crash", storage=storage)
    before = study.get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert before[2].user_attrs[schema.TRIAL_WORKER_ATTR]["pid"] == proc.pid
    parent_id = study.user_attrs[schema.STUDY_PARENT_RUN_ATTR]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(parent_id).info.status == "RUNNING"  # what a crash leaves behind

    # the same command again, without the crash switch being able to fire (the retry has a new number)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    study = optuna.load_study(study_name="crash", storage=open_storage(storage_url, "crash", tmp_path / "runs").storage)
    after = study.get_trials()
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]
    # finished trials kept as they were
    for old in before[:2]:
        assert after[old.number].state.name == "COMPLETE" and after[old.number].value == old.value
        assert after[old.number].params == old.params
    crashed = after[2]
    assert crashed.state.name == "FAIL"
    assert f"worker process {proc.pid}" in crashed.user_attrs[schema.TRIAL_ERROR_ATTR]
    retries = [t for t in after if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1 and retries[0].params == crashed.params and retries[0].state.name == "COMPLETE"
    # target reached: 4 counted trials (the failed one is replaced by its retry), nothing more
    assert len(after) == 5
    assert study.user_attrs[schema.STUDY_PARENT_RUN_ATTR] == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    exp = client.get_experiment_by_name("fusebench-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_trial = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["fusebench.trial"], []).append(r)
    assert sorted(by_trial, key=int) == ["0", "1", "2", "3", "4"]
    killed_run = by_trial["2"][0]
    assert killed_run.info.status == "FAILED"
    assert killed_run.data.tags["fusebench.trial_state"] == "FAIL"
    assert "died" in killed_run.data.tags["fusebench.error"]
    assert all(r.info.status == "FINISHED" for n, rs in by_trial.items() if n != "2" for r in rs)


def test_ctrl_c_ends_the_trial_and_the_same_command_resumes(tmp_path, mlflow_uri):
    """SIGINT (Ctrl-C) in the middle of a trial: the trial ends FAIL, its MLflow run KILLED with the reason,
    the parent run KILLED, a summary is printed; the same command then finishes the target."""
    cmd = _driver(tmp_path, mlflow_uri)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
           "FAKE_BLOCK_TRIAL": "1", "FAKE_MARKER_DIR": str(markers)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (markers / "started-1").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "trial 1 never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # every thread's stack to stderr, then end it
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sweep did not end within 60 s of SIGINT; its output: {out[-1500:]}\n{err[-6000:]}")
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert re.search(r"interrupted: study 'crash' has \d/4 trials done \(1 complete, 0 pruned, 1 failed\)", out)
    assert "The same command resumes" in out

    study = optuna.load_study(study_name="crash", storage=open_storage(None, "crash", tmp_path / "runs").storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]  # queued again
    client = MlflowClient(mlflow_uri)
    parent_id = study.user_attrs[schema.STUDY_PARENT_RUN_ATTR]
    assert client.get_run(parent_id).info.status == "KILLED"
    exp = client.get_experiment_by_name("fusebench-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    interrupted = [r for r in runs if r.data.tags.get("fusebench.trial") == "1"]
    assert len(interrupted) == 1 and interrupted[0].info.status == "KILLED"
    assert "KeyboardInterrupt" in interrupted[0].data.tags["fusebench.error"]

    done = subprocess.run(cmd, env={**env, "FAKE_BLOCK_TRIAL": ""}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="crash", storage=open_storage(None, "crash", tmp_path / "runs").storage)
    after = study.get_trials()
    states = [t.state.name for t in after]
    assert "RUNNING" not in states and states.count("COMPLETE") == 4  # the interrupted one ran again
    retry = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].params == trials[1].params and retry[0].state.name == "COMPLETE"
    assert client.get_run(parent_id).info.status == "FINISHED"


from test_sweeps_postgres import postgres_url  # noqa: E402,F401  (the fixture, for the postgres case)
