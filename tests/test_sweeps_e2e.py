"""End to end with the real harness: ``fusebench sweep`` on a tiny spec (digits, small MLP, 2 trials)."""

from __future__ import annotations

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from bench import schema
from fusebench.cli import main as cli_main
from sweeps.study import open_storage

pytestmark = pytest.mark.slow


def test_fusebench_sweep_runs_real_experiments(tmp_path, mlflow_uri, capsys, one_thread):
    spec = {
        "study": "e2e",
        "base": {
            "experiment": "fusebench-tests",
            "data": {"name": "digits"},
            "model": {"arch": "mlp", "width": 16, "depth": 1},
            "members": {"n": 2, "epochs": 2, "cache_dir": str(tmp_path / "cache")},
            "fusion": {"measure_memory": False},
            "finetune": {"epochs": 1, "baseline": False},
        },
        "space": {"fusion.method": {"type": "categorical", "choices": ["nt", "avg"]}},
        "objectives": [{"metric": "fused_acc_best_val", "direction": "maximize"}],
        "sampler": "grid",
    }
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    code = cli_main(["sweep", str(path), "--runs-dir", str(runs), "--tracking-uri", mlflow_uri])
    out = capsys.readouterr().out
    assert code == 0
    assert "study 'e2e': 2 complete, 0 pruned, 0 failed" in out
    assert f"mlflow ui --backend-store-uri {mlflow_uri}" in out

    study = optuna.load_study(study_name="e2e", storage=open_storage(None, "e2e", runs).storage)
    trials = study.get_trials()
    assert sorted(t.params["fusion.method"] for t in trials) == ["avg", "nt"]
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(study.user_attrs[schema.STUDY_PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED" and parent.data.tags["fusebench.role"] == "study"
    for t in trials:
        assert t.state.name == "COMPLETE"
        (run_id,) = t.user_attrs["fusebench.run_ids"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        assert (
            tags["fusebench.role"] == "experiment" and tags["fusebench.method"] == t.params["fusion.method"]
        )
        assert tags["fusebench.trial"] == str(t.number) and tags["fusebench.trial_state"] == "COMPLETE"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert params["fusion.method"] == t.params["fusion.method"] and params["members.epochs"] == "2"
        assert metrics["fused_acc_best_val"] == pytest.approx(t.value)
        assert 0.0 <= t.value <= 1.0
