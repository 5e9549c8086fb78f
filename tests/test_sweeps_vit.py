"""A sweep over a timm ViT on digits (resized to 16x16) runs end to end with the real harness."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from fusebench.cli import main as cli_main
from sweeps.study import open_storage

pytestmark = pytest.mark.slow
SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "vit_digits.yaml"  # not the working directory


def test_vit_sweep_on_digits(tmp_path, mlflow_uri, capsys, one_thread):
    spec = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    spec["base"]["experiment"] = "fusebench-tests"
    spec["base"]["members"].update({"epochs": 1, "cache_dir": str(tmp_path / "cache")})
    spec["base"]["finetune"]["epochs"] = 1
    spec["base"]["model"]["kwargs"].update({"depth": 2})  # two blocks keep the test fast; same code path
    spec["space"]["fusion.method"]["choices"] = ["nt", "ot"]
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = cli_main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", mlflow_uri])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(
        study_name="vit-digits", storage=open_storage(None, "vit-digits", tmp_path / "runs").storage
    )
    client = MlflowClient(mlflow_uri)
    trials = study.get_trials()
    assert sorted(t.params["fusion.method"] for t in trials) == ["nt", "ot"]
    for t in trials:
        assert t.state.name == "COMPLETE", t.user_attrs
        (run_id,) = t.user_attrs["fusebench.run_ids"]
        run = client.get_run(run_id)
        m = run.data.metrics
        assert run.data.tags["fusebench.arch"] == "vit_tiny_patch16_224"
        assert m["fused_params"] == m["member_params"]  # NT and OT return the member architecture
        assert 0.0 <= m["fused_acc_before_ft"] <= 1.0 and 0.0 <= m["fused_acc_best_val"] <= 1.0
        assert m["fusion_time_s"] > 0
