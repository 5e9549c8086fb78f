"""bench.config: defaults, overrides, strict validation with file + key + suggestion, flatten, hash."""

from __future__ import annotations

import pytest

from bench.config import DEFAULTS, flatten, load_config, parse_override, resolve, stable_hash
from bench.errors import ConfigError
from fusebench import cli


def test_defaults_are_the_design_contract():
    cfg = load_config(None)
    assert cfg == DEFAULTS
    assert cfg["members"]["optimizer"] == "sgd" and cfg["fusion"]["method"] == "nt"
    assert cfg is not DEFAULTS and cfg["data"] is not DEFAULTS["data"]


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("members:\n  n: 3\nfusion:\n  options: {sparsity: 0.5}\n")
    cfg = load_config(path, ["finetune.epochs=0", "members.lr=1", "data.image_size=16", "tracking_uri=null"])
    assert cfg["members"]["n"] == 3 and cfg["finetune"]["epochs"] == 0
    assert cfg["members"]["lr"] == 1.0 and isinstance(cfg["members"]["lr"], float)
    assert cfg["data"]["image_size"] == 16 and cfg["tracking_uri"] is None
    assert cfg["fusion"]["options"] == {"sparsity": 0.5}
    assert cfg["data"]["name"] == "digits"  # untouched default
    assert parse_override("model.kwargs={drop_rate: 0.1}") == ("model.kwargs", {"drop_rate": 0.1})


def test_unknown_key_is_named_with_file_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fintune:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'fintune'" in msg and "did you mean 'finetune'" in msg
    path.write_text("members:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'members.epoch'.*did you mean 'epochs'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'members.nn=3'.*'members.nn'"):
        load_config(None, ["members.nn=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("members.n=two", r"'members.n' must be int"),
        ("finetune.distill=maybe", r"'finetune.distill' must be bool"),
        ("data.on_device=sometimes", r"'data.on_device' must be one of"),
        ("data.val_fraction=1.5", r"'data.val_fraction' must be in"),
        ("finetune.epochs=-1", r"'finetune.epochs' must be >= 0"),
        ("members.optimizer=lbfgs", r"'members.optimizer' must be one of"),
        ("data=3", r"data: expected a mapping"),
        ("novalue", r"expected KEY=VALUE"),
    ],
)
def test_mistyped_values_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_flatten_and_stable_hash():
    cfg = resolve({"fusion": {"options": {"sparsity": 0.5}}})
    flat = flatten(cfg)
    assert flat["fusion.options.sparsity"] == "0.5"
    assert flat["data.name"] == "digits" and flat["members.n"] == "2" and flat["seed"] == "0"
    assert (
        flat["tracking_uri"] == "null"
        and flat["members.checkpoints"] == "[]"
        and flat["model.kwargs"] == "{}"
    )
    assert all(isinstance(v, str) for v in flat.values())
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_cli_unknown_key_and_unreadable_config_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  arch: mlp\n")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'modle'" in err and "did you mean 'model'" in err and "Traceback" not in err
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("fusion.repair=fix", "'fusion.repair' must be one of \\['none', 'reset', 'repair'\\]"),
        ("fusion.repair_batches=0", "'fusion.repair_batches' must be >= 1"),
        ("fusion.data_samples=0", "'fusion.data_samples' must be >= 1"),
        ("fusion.lmc=maybe", "'fusion.lmc' must be bool"),
        ("fusion.measure_memory=sometimes", "'fusion.measure_memory' must be one of"),
        ("finetune.distill_baseline=1", "'finetune.distill_baseline' must be bool"),
        # the recipe keys (bench.recipes.Recipe)
        ("members.schedule=linear", "'members.schedule' must be one of"),
        ("finetune.augment=mixup", "'finetune.augment' must be one of"),
        ("precision=fp8", "'precision' must be one of"),
        ("members.label_smoothing=1.5", "'members.label_smoothing' must be in"),
        ("members.schedule=multistep", "'members.milestones' are required"),
        ("members.milestones=[5,3]", "'members.milestones' must be increasing"),
        ("members.warmup_epochs=50", "'members.warmup_epochs' must be"),
    ],
)
def test_new_protocol_and_recipe_keys_are_validated(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])
