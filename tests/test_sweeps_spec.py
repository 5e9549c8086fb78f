"""Sweep specs: every shipped spec validates, every bad spec is refused before any trial with a clear
message (exit 2 at the command line), conditional spaces sample and enumerate correctly."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
import yaml

from bench.errors import ConfigError
from fusebench.cli import main as cli_main
from sweeps.search import make_pruner, make_sampler, sample_params
from sweeps.spec import apply_params, enumerate_grid, load_spec, parse_spec

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SHIPPED = sorted(SWEEPS_DIR.glob("*.yaml"))

GOOD = {
    "base": {"finetune": {"epochs": 2}},
    "space": {
        "members.n": {"type": "int", "low": 2, "high": 3},
        "fusion.method": {"type": "categorical", "choices": ["nt", "avg"]},
        "fusion.options.sparsity": {
            "type": "float",
            "low": 0.25,
            "high": 0.75,
            "step": 0.25,
            "when": {"fusion.method": "nt"},
        },
    },
    "objectives": [{"metric": "fused_acc_best_val", "direction": "maximize"}],
    "sampler": "grid",
}


def _with(**changes):
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node = spec
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node[part]
        if value is _DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return spec


_DELETE = object()


def test_shipped_specs_exist_and_validate():
    names = {p.name for p in SHIPPED}
    assert {
        "quickstart.yaml",
        "paper_cifar10_vgg11.yaml",
        "paper_cifar10_resnet18.yaml",
        "paper_mlp_width_depth.yaml",
    } <= names
    for path in SHIPPED:
        spec = load_spec(path)
        assert spec.target_trials() >= 1, path
        # every grid point / boundary gives a valid experiment config
        if spec.sampler["type"] in ("grid", "bruteforce"):
            for combo in enumerate_grid(spec.space):
                apply_params(spec.base, combo, source=str(path))


def test_quickstart_is_small_and_covers_the_issue_axes():
    spec = load_spec(SWEEPS_DIR / "quickstart.yaml")
    assert spec.base["data"]["name"] == "digits"
    arch = spec.space["model.arch"]
    assert "mlp" in arch.choices and any(a != "mlp" for a in arch.choices)
    assert set(spec.space["members.n"].grid_values()) == {2, 3}
    assert {"nt", "avg", "ot"} <= set(spec.space["fusion.method"].choices)
    assert len(spec.space["finetune.epochs"].grid_values()) >= 2
    assert 6 <= spec.target_trials() <= 12


def test_paper_specs_sweep_the_paper_axes():
    mlp = load_spec(SWEEPS_DIR / "paper_mlp_width_depth.yaml")
    assert mlp.base["data"]["name"] == "cifar10"
    assert set(mlp.space["members.n"].grid_values()) >= {2, 4, 8, 16}
    assert {0.0, 0.25, 0.5, 0.75, 0.875, 0.9375} <= set(mlp.space["fusion.options.sparsity"].grid_values())
    assert {"model.width", "model.depth"} <= set(mlp.space)
    for name, arch in (("paper_cifar10_vgg11.yaml", "vgg11"), ("paper_cifar10_resnet18.yaml", "resnet18")):
        spec = load_spec(SWEEPS_DIR / name)
        assert spec.base["data"]["name"] == "cifar10" and spec.base["model"]["arch"] == arch


def test_grid_enumeration_respects_conditions():
    spec = parse_spec(GOOD)
    combos = enumerate_grid(spec.space)
    expected = [{"members.n": n, "fusion.method": "avg"} for n in (2, 3)] + [
        {"members.n": n, "fusion.method": "nt", "fusion.options.sparsity": s}
        for n, s in itertools.product((2, 3), (0.25, 0.5, 0.75))
    ]
    key = lambda d: sorted(d.items())  # noqa: E731
    assert sorted(map(key, combos)) == sorted(map(key, expected))
    assert spec.target_trials() == 8


def test_sampling_sets_conditional_param_only_when_active():
    raw = _with(sampler={"type": "tpe", "seed": 3, "n_startup_trials": 2}, n_trials=12)
    spec = parse_spec(raw)
    study = optuna.create_study(sampler=make_sampler(spec), pruner=make_pruner(spec), direction="maximize")
    seen_methods = set()
    for _ in range(12):
        trial = study.ask()
        params = sample_params(trial, spec)
        seen_methods.add(params["fusion.method"])
        assert ("fusion.options.sparsity" in params) == (params["fusion.method"] == "nt")
        cfg = apply_params(spec.base, params)
        assert cfg["members"]["n"] == params["members.n"]
        assert cfg["fusion"]["options"] == (
            {"sparsity": params["fusion.options.sparsity"]} if params["fusion.method"] == "nt" else {}
        )
        assert cfg["finetune"]["epochs"] == 2  # the base is kept
        study.tell(trial, float(params["members.n"]))
    assert seen_methods == {"nt", "avg"}


def test_base_may_be_a_config_file(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {arch: mlp, width: 16}\nfinetune: {epochs: 1}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_with(base="base.yaml")))
    spec = load_spec(tmp_path / "s.yaml")
    assert spec.base["model"]["width"] == 16 and spec.study == "s"


BAD = [
    (_with(sapce={}), "unknown key 'sapce' (did you mean 'space'"),
    (_with(space={}), "'space' must be a non-empty mapping"),
    (
        _with(**{"space__fusion.method": {"type": "categorical", "choices": []}}),
        "'space.fusion.method.choices' must be a non-empty list",
    ),
    (
        _with(**{"space__members.n": {"type": "int", "low": 4, "high": 2}}),
        "'space.members.n': low (4) > high (2)",
    ),
    (
        _with(**{"space__members.n": {"type": "int", "low": 2, "hihg": 3}}),
        "unknown key 'space.members.n.hihg' (did you mean 'high'",
    ),
    (_with(**{"space__fintune.epochs": {"type": "int", "low": 1, "high": 3}}), "space.fintune.epochs"),
    (
        _with(**{"space__fusion.method": {"type": "categorical", "choices": ["nt", "ntt"]}}),
        "unknown fusion method 'ntt'",
    ),
    (
        _with(**{"space__model.arch": {"type": "categorical", "choices": ["mlp", "resnet_nope"]}}),
        "resnet_nope",
    ),
    (
        _with(**{"space__fusion.options.sparsity": {"type": "float", "low": 0.1, "high": 0.9}}),
        "the grid sampler needs a 'step' for float params",
    ),
    (
        _with(**{"space__fusion.options.sparsity": {"type": "float", "low": 0.5, "high": 1.0, "step": 0.5}}),
        "sparsity must be in [0, 1)",
    ),
    (
        _with(
            **{
                "space__fusion.options.sparsity": {
                    "type": "float",
                    "low": 0.25,
                    "high": 0.5,
                    "step": 0.25,
                    "when": {"fusion.metod": "nt"},
                }
            }
        ),
        "refers to 'fusion.metod'",
    ),
    (
        _with(objectives=[{"metric": "fused_accuracy", "direction": "maximize"}]),
        "unknown metric 'fused_accuracy'",
    ),
    (_with(objectives=[{"metric": "fused_acc_best_val", "direction": "up"}]), "must be maximize or minimize"),
    (
        _with(
            objectives=[
                {"metric": "fused_acc_best_val", "direction": "maximize"},
                {"metric": "fusion_time_s", "direction": "minimize"},
            ],
            pruner="median",
        ),
        "pruning works only with one objective",
    ),
    (_with(sampler="cmaes"), "unknown sampler 'cmaes'"),
    (_with(sampler={"type": "tpe", "sed": 1}, n_trials=3), "unknown key 'sampler.sed' (did you mean 'seed'"),
    (_with(sampler="tpe"), "'n_trials' is required for sampler 'tpe'"),
    (_with(repeats=0), "'repeats' must be an integer >= 1"),
    (_with(base={"members": {"nn": 2}}), "unknown key 'members.nn'"),
    (_with(base={"data": {"name": "imagenet21k"}}), "unknown data set 'imagenet21k'"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_spec_is_refused_with_a_message_naming_file_and_key(tmp_path, raw, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_bad_spec_exits_2_before_any_trial(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            _with(
                objectives=[
                    {"metric": "fused_acc_best_val", "direction": "maximize"},
                    {"metric": "fusion_time_s", "direction": "minimize"},
                ],
                pruner="median",
            )
        )
    )
    runs = tmp_path / "runs"
    code = cli_main(
        ["sweep", str(path), "--runs-dir", str(runs), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "pruning works only with one objective" in err and str(path) in err
    assert not runs.exists() and not (tmp_path / "m.db").exists()  # nothing was created


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--study", "a b"], "--study 'a b'"),
        (["--storage", "redis://localhost/0"], "unsupported scheme 'redis'"),
    ],
)
def test_bad_command_line_exits_2(tmp_path, capsys, argv, message):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    code = cli_main(
        [
            "sweep",
            str(path),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
            *argv,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
