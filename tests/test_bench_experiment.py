"""End to end: digits experiments through fusion, tracked in MLflow with the schema of docs/design.md §3."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from bench import schema
from bench.config import load_config
from bench.experiment import StopExperiment, run_experiment
from fusebench import cli

SCHEMA_METRICS = {
    "members_mean_acc", "best_member_acc", "ensemble_acc", "fused_acc",
    "fused_val_acc", "ft_train_loss", "fused_acc_before_ft", "fused_acc_final", "fused_acc_best_val",
    "gain_over_best_member", "gain_over_ensemble", "fusion_time_s", "fused_params",
    "member_params", "fused_macs", "member_macs", "fused_latency_ms", "ensemble_latency_ms",
    "train_time_s", "finetune_time_s", "total_time_s",
}  # fmt: skip
SCHEMA_TAGS = {
    "fusebench.role", "fusebench.method", "fusebench.arch", "fusebench.dataset", "fusebench.n_members",
    "fusebench.sparsity", "fusebench.finetune_epochs", "fusebench.seed", "fusebench.device",
    "fusebench.git_commit", "fusebench.version.torch", "fusebench.version.timm",
}  # fmt: skip


@pytest.fixture
def cfg(tmp_path, mlflow_uri, one_thread):
    return load_config(
        None,
        [
            "experiment=fusebench-tests",
            f"tracking_uri={mlflow_uri}",
            f"members.cache_dir={tmp_path / 'cache'}",
            "model.width=32",
            "members.epochs=4",
            "finetune.epochs=2",
            "fusion.measure_memory=false",  # the child process costs seconds; measured in one test
        ],
    )


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _check_run(uri, result, cfg, method, arch_tag, n):
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
    expected = SCHEMA_METRICS | {f"member_{i}_acc" for i in range(n)}
    expected |= {"fusion_peak_mem_mb"} if cfg["fusion"]["measure_memory"] else set()
    expected |= {"best_member_ft_acc"} if cfg["finetune"]["baseline"] else set()
    assert expected <= set(metrics)
    for key, value in metrics.items():
        if key.endswith("_acc") or key in ("fused_acc_final", "fused_acc_best_val", "fused_acc_before_ft"):
            assert 0.0 <= value <= 1.0, key
    assert metrics["fusion_time_s"] > 0 and metrics.get("fusion_peak_mem_mb", 0) >= 0
    assert metrics["fused_latency_ms"] > 0 and metrics["ensemble_latency_ms"] > 0
    if method == "avg":  # plain averaging traces nothing: no pinned channels to report
        assert "pinned_channel_sets" not in metrics
    else:  # no channels mixed across the channel axis in these models
        assert metrics["pinned_channel_sets"] == 0
    if arch_tag.startswith("mlp"):  # 64 -> w -> ... -> w -> 10, recomputed independently
        w, d = cfg["model"]["width"], cfg["model"]["depth"]
        assert metrics["member_params"] == (64 * w + w) + (d - 1) * (w * w + w) + (w * 10 + 10)
    assert metrics["member_macs"] > 0 and metrics["fused_macs"] > 0
    # Members trained here are good on digits; the ensemble is an average of them.
    member_accs = [metrics[f"member_{i}_acc"] for i in range(n)]
    assert metrics["members_mean_acc"] == pytest.approx(sum(member_accs) / n)
    assert metrics["best_member_acc"] in member_accs
    epochs = cfg["finetune"]["epochs"]
    curve = _history(client, result.run_id, "fused_acc")
    assert [s for s, _ in curve] == list(range(epochs + 1))
    assert [s for s, _ in _history(client, result.run_id, "fused_val_acc")] == list(range(epochs + 1))
    assert [s for s, _ in _history(client, result.run_id, "ft_train_loss")] == list(range(1, epochs + 1))
    assert curve[0][1] == pytest.approx(metrics["fused_acc_before_ft"])
    assert curve[-1][1] == pytest.approx(metrics["fused_acc_final"])
    assert metrics["fused_acc_best_val"] in [v for _, v in curve]
    assert metrics["gain_over_ensemble"] == pytest.approx(
        metrics["fused_acc_best_val"] - metrics["ensemble_acc"]
    )
    assert SCHEMA_TAGS <= set(tags)
    # everything the run logged is named in bench.schema (the vocabulary sweeps and dashboards read)
    assert [k for k in metrics if not schema.is_metric(k)] == []
    assert [k for k in tags if k.startswith(schema.PREFIX) and not schema.is_tag(k)] == []
    assert tags["fusebench.method"] == method and tags["fusebench.arch"] == arch_tag
    assert tags["fusebench.dataset"] == "digits" and tags["fusebench.n_members"] == str(n)
    assert tags["fusebench.role"] == "experiment" and tags["fusebench.device"] == "cpu"
    assert tags["fusebench.sparsity"] == ("0.5" if method == "nt" else "")
    assert params["model.arch"] == cfg["model"]["arch"] and params["fusion.method"] == method
    assert params["finetune.epochs"] == str(epochs) and params["members.n"] == str(n)
    artifacts = [a.path for a in client.list_artifacts(result.run_id)]
    assert "config.yaml" in artifacts
    return metrics


@pytest.mark.parametrize("method", ["nt", "avg"])
def test_mlp_end_to_end(cfg, mlflow_uri, method):
    cfg["fusion"]["method"] = method
    # the honest CPU peak of a child process once, the in-process VmHWM peak otherwise
    cfg["fusion"]["measure_memory"] = "child" if method == "nt" else True
    seen = []
    result = run_experiment(cfg, epoch_callback=lambda e, v: seen.append((e, v)), extra_tags={"x.extra": "1"})
    metrics = _check_run(mlflow_uri, result, cfg, method, "mlp-32x2", 2)
    assert [e for e, _ in seen] == [1, 2]
    assert metrics["member_0_acc"] > 0.8 and metrics["ensemble_acc"] > 0.8  # really trained on digits
    if method == "nt":  # NT at sparsity 1 - 1/N gives back the member's size
        assert metrics["fused_params"] == metrics["member_params"]
    assert MlflowClient(mlflow_uri).get_run(result.run_id).data.tags["x.extra"] == "1"
    assert result.members_trained == 2 and result.timings["total"] > result.timings["fusion"]


@pytest.mark.parametrize("method", ["nt", "avg"])
def test_timm_cnn_end_to_end(cfg, mlflow_uri, method):
    cfg["model"]["arch"] = "test_resnet"  # timm's tiny ResNet (BatchNorm, residuals) on 1x8x8 digits
    cfg["members"]["epochs"] = 1
    cfg["finetune"]["epochs"] = 1
    cfg["finetune"]["baseline"] = False
    cfg["fusion"]["method"] = method
    result = run_experiment(cfg)
    metrics = _check_run(mlflow_uri, result, cfg, method, "test_resnet", 2)
    assert metrics["fused_params"] == metrics["member_params"]
    assert "best_member_ft_acc" not in metrics  # baseline off
    # the default repair (BatchNorm reset) changed where fine-tuning starts, and both are logged
    assert metrics["fused_acc_raw"] != metrics["fused_acc_before_ft"] and metrics["repair_time_s"] > 0


def test_selection_rule_is_best_validation_epoch():
    from bench.experiment import select_by_validation

    # ties go to the earlier epoch; epoch 0 (before fine-tuning) competes too
    assert select_by_validation([0.5, 0.7, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]) == (1, 0.2)
    assert select_by_validation([0.9, 0.7, 0.8], [0.11, 0.22, 0.33]) == (0, 0.11)
    assert select_by_validation([0.1], [0.5]) == (0, 0.5)
    with pytest.raises(ValueError):
        select_by_validation([0.1, 0.2], [0.5])


def test_repair_none_vs_reset_fair_baseline_and_run_names(cfg, mlflow_uri):
    cfg["model"]["arch"] = "test_resnet"
    cfg["members"]["epochs"] = 1
    cfg["finetune"]["epochs"] = 2
    cfg["finetune"]["distill_baseline"] = True
    results = {}
    for mode in ("none", "reset"):
        cfg["fusion"]["repair"] = mode
        results[mode] = run_experiment(cfg, extra_tags={"fusebench.trial": "7"})
    client = MlflowClient(mlflow_uri)
    none, reset = (client.get_run(results[k].run_id) for k in ("none", "reset"))
    assert none.data.metrics["fused_acc_raw"] == none.data.metrics["fused_acc_before_ft"]
    # same members, same fusion: the raw accuracy agrees, the repaired one is where fine-tuning starts
    assert reset.data.metrics["fused_acc_raw"] == none.data.metrics["fused_acc_raw"]
    assert _history(client, reset.info.run_id, "fused_acc")[0][1] == reset.data.metrics["fused_acc_before_ft"]
    assert none.data.tags["fusebench.repair"] == "none" and reset.data.tags["fusebench.repair"] == "reset"
    assert none.info.run_name == "nt · test_resnet · N=2 · s=0.5 · seed 0 · trial 7"
    assert reset.info.run_name == "nt · test_resnet · N=2 · s=0.5 · reset · seed 0 · trial 7"
    m = reset.data.metrics
    for name in ("best_member_ft_acc", "best_member_distill_acc"):
        assert 0.0 <= m[name] <= 1.0 and 0.0 <= m[name + "_final"] <= 1.0
    # "Δ best member" is against the fine-tuned best member; the untuned difference is kept beside it
    assert m["gain_over_best_member"] == pytest.approx(m["fused_acc_best_val"] - m["best_member_ft_acc"])
    assert m["gain_over_best_member_untuned"] == pytest.approx(m["fused_acc_best_val"] - m["best_member_acc"])
    assert [d.dataset.name for d in reset.inputs.dataset_inputs] == ["digits"] * 3
    exp = client.get_experiment(reset.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_lmc_endpoints_are_the_members(cfg, mlflow_uri):
    cfg["fusion"]["method"] = "weight_matching"
    cfg["fusion"]["lmc"] = True
    cfg["fusion"]["repair"] = "repair"
    cfg["finetune"]["epochs"] = 0
    result = run_experiment(cfg)
    client = MlflowClient(mlflow_uri)
    curve = _history(client, result.run_id, "lmc_acc")
    assert [s for s, _ in curve] == [0, 25, 50, 75, 100]
    # member B aligned by weight matching computes member B's function: the endpoints are the members
    assert curve[0][1] == pytest.approx(result.metrics["member_0_acc"])
    assert curve[-1][1] == pytest.approx(result.metrics["member_1_acc"])
    losses = [v for _, v in _history(client, result.run_id, "lmc_loss")]
    line = [(1 - a) * losses[0] + a * losses[-1] for a in (0, 0.25, 0.5, 0.75, 1)]
    assert result.metrics["lmc_barrier_loss"] == pytest.approx(
        max(0.0, *(v - w for v, w in zip(losses, line)))
    )


def test_stop_experiment_ends_killed(cfg, mlflow_uri):
    cfg["finetune"]["baseline"] = False

    def stop(epoch, val_acc):
        raise StopExperiment("pruned")

    with pytest.raises(StopExperiment):
        run_experiment(cfg, epoch_callback=stop)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("fusebench-tests").experiment_id],
        order_by=["attributes.start_time DESC"],
    )
    assert runs[0].info.status == "KILLED"
    assert [s for s, _ in _history(client, runs[0].info.run_id, "fused_acc")] == [0, 1]


def test_failing_run_ends_failed_with_error(cfg, mlflow_uri, tmp_path, capsys):
    # A data set that is not there with downloads off: exit 2 at the CLI and the run FAILED with the error.
    config = tmp_path / "c.yaml"
    config.write_text(
        f"experiment: fusebench-tests\ntracking_uri: {mlflow_uri}\n"
        f"data: {{name: cifar10, root: {tmp_path / 'nodata'}, download: false}}\n"
        f"members: {{cache_dir: {tmp_path / 'cache'}}}\n"
    )
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data set 'cifar10' not found" in err and "data.download=true" in err and "Traceback" not in err
    client = MlflowClient(mlflow_uri)
    run = client.search_runs(
        [client.get_experiment_by_name("fusebench-tests").experiment_id],
        order_by=["attributes.start_time DESC"],
    )[0]
    assert run.info.status == "FAILED"
    assert "data set 'cifar10' not found" in run.data.tags["fusebench.error"]
    assert not (tmp_path / "cache").exists()  # nothing written to the member cache


def test_bad_names_suggest_and_create_nothing(tmp_path, mlflow_uri, capsys):
    base = [f"tracking_uri={mlflow_uri}", "experiment=fusebench-tests", f"members.cache_dir={tmp_path / 'c'}"]
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\n")
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("fusebench-tests").experiment_id
    before = len(client.search_runs([exp]))
    assert cli.main(["run", str(config), "data.name=cifar1O", *base]) == 2
    assert (
        "unknown data set 'cifar1O'" in (err := capsys.readouterr().err) and "did you mean 'cifar10'" in err
    )
    assert cli.main(["run", str(config), "model.arch=resnet81", *base]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'resnet81'" in err and "resnet18" in err
    assert cli.main(["run", str(config), "fusion.method=tn", *base]) == 2
    assert "unknown method 'tn'" in capsys.readouterr().err
    assert len(client.search_runs([exp])) == before and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_log_model_logs_the_fused_model_it_computed(cfg, mlflow_uri):
    import mlflow
    import torch

    from bench.config import resolve
    from bench.data import load_data

    cfg["finetune"]["epochs"] = 0
    cfg["fusion"]["log_model"] = True
    result = run_experiment(cfg)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and len(run.outputs.model_outputs) == 1
    mlflow.set_tracking_uri(mlflow_uri)
    model_id = run.outputs.model_outputs[0].model_id
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [(m.model_id, m.name, m.source_run_id) for m in logged if m.model_id == model_id] == [
        (model_id, "fused_model", result.run_id)
    ]
    loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
    data = load_data(resolve(cfg)["data"], torch.device("cpu"))
    with torch.no_grad():
        acc = float((loaded(data.test.x).argmax(1) == data.test.y).float().mean())
    assert acc == pytest.approx(result.metrics["fused_acc_best_val"])  # the very model that was measured
