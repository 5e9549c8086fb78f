"""Sweep specs: a YAML file naming the base experiment, the search space, the objectives and the search.

Why strict and early: a sweep runs for hours on machines the user is paying for. A typo found after the
first trial (or worse, silently ignored) wastes all of that, so every key, range, metric and combination
is checked here, before the study exists, and each error names the spec file and the key.

Format (see the shipped ``sweeps/*.yaml``)::

    study: quickstart                 # default study name (default: the file's stem)
    base: {model: {arch: mlp}, ...}   # an experiment config (docs/design.md §2) or a path to one
    space:
      fusion.method: {type: categorical, choices: [nt, avg]}
      fusion.options.sparsity: {type: float, low: 0.25, high: 0.75, step: 0.25, when: {fusion.method: nt}}
    objectives: [{metric: fused_acc_best_val, direction: maximize}]
    sampler: {type: tpe, seed: 0}     # tpe | random | grid (= brute force) | nsga2; or just "tpe"
    pruner: median                    # none | median | hyperband (single objective only)
    repeats: 1                        # member seeds per configuration (seed, seed+1, ...)
    n_trials: 10
    timeout: null                     # seconds; no new trial starts after it
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import config as bench_config
from bench import schema
from bench.errors import ConfigError
from bench.validation import Field, check_keys, did_you_mean, is_number

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # study names (also file names of journals)
# The spec, declared: the scalar top-level keys as fields, the sections parsed by their own function.
SCALARS: dict[str, Field] = {
    "study": Field(None, object, nullable=True),  # default: the file's stem; must match NAME
    "description": Field("", object, nullable=True),
    "repeats": Field(1, int, ge=1, expect="an integer >= 1"),
    "n_trials": Field(None, int, nullable=True, ge=1, expect="an integer >= 1"),
    "timeout": Field(None, float, nullable=True, gt=0, expect="a positive number of seconds"),
}
SECTIONS = ("base", "space", "objectives", "sampler", "pruner")
TOP_KEYS = ("study", "description", *SECTIONS, "repeats", "n_trials", "timeout")

# one dimension of the space: {type, choices | low, high, log, step; when}
PARAM_KEYS = ("type", "choices", "low", "high", "log", "step", "when")
PARAM_TYPES = ("categorical", "int", "float")
NUMERIC_ONLY = ("low", "high", "log", "step")


def _numeric_fields(ptype: str) -> dict[str, Field]:
    kind, what = (int, "an integer") if ptype == "int" else (float, "a number")
    return {
        "low": Field(None, kind, expect=what),
        "high": Field(None, kind, expect=what),
        "log": Field(False, bool, expect="true or false"),
        "step": Field(None, kind, nullable=True, gt=0, expect=f"a positive {ptype}"),
    }


OBJECTIVE_KEYS = ("metric", "direction")
DIRECTION = Field(None, choices=("maximize", "minimize"), expect="maximize or minimize")
# sampler / pruner: a type and its options (all non-negative integers)
SAMPLERS: dict[str, tuple[str, ...]] = {
    "tpe": ("seed", "n_startup_trials"),
    "random": ("seed",),
    "grid": ("seed",),
    "bruteforce": ("seed",),
    "nsga2": ("seed", "population_size"),
}
PRUNERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "median": ("n_startup_trials", "n_warmup_steps"),
    "hyperband": ("min_resource", "reduction_factor"),
}
GRID_SAMPLERS = ("grid", "bruteforce")
OPTION = Field(None, int, ge=0, expect="a non-negative integer")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space; ``name`` is the dotted config key it sets."""

    name: str
    type: str
    choices: tuple = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    when: dict[str, tuple] = field(default_factory=dict)

    def grid_values(self) -> list:
        """Every value a full-factorial (brute-force) search visits."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        step = self.step if self.step is not None else 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step for i in range(count)]


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "maximize" | "minimize"


@dataclass
class SweepSpec:
    """A validated sweep spec. ``base`` is a fully resolved experiment config."""

    source: str
    study: str
    base: dict
    space: dict[str, Param]
    objectives: list[Objective]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    repeats: int = 1
    n_trials: int | None = None
    timeout: float | None = None
    description: str = ""
    text: str = ""  # the spec file as written, logged to the study's MLflow run

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def grid_size(self) -> int:
        """Number of distinct configurations of the space (conditional params counted only when active)."""
        return len(enumerate_grid(self.space))

    def target_trials(self) -> int:
        """How many finished trials end the study: ``n_trials``, capped by the grid for grid search."""
        if self.sampler["type"] in GRID_SAMPLERS:
            size = self.grid_size()
            return min(self.n_trials, size) if self.n_trials else size
        if not self.n_trials:
            raise ConfigError(f"{self.source}: 'n_trials' is required for sampler '{self.sampler['type']}'")
        return self.n_trials


def is_active(param: Param, values: dict[str, Any]) -> bool:
    """A conditional param is sampled only when every ``when`` param was sampled with an allowed value."""
    return all(name in values and values[name] in allowed for name, allowed in param.when.items())


def enumerate_grid(space: dict[str, Param]) -> list[dict[str, Any]]:
    """All distinct configurations of ``space`` (declaration order), inactive params left out."""
    combos: list[dict[str, Any]] = [{}]
    for param in space.values():
        grown = []
        for combo in combos:
            if is_active(param, combo):
                grown.extend({**combo, param.name: v} for v in param.grid_values())
            else:
                grown.append(combo)
        combos = grown
    return combos


def nest(params: dict[str, Any]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for dotted, value in params.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, update: dict) -> dict:
    """Merge nested ``update`` into a copy of ``base`` (free mappings such as fusion.options merge too)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_params(base: dict, params: dict[str, Any], *, source: str = "<sweep>") -> dict:
    """The experiment config of one trial: ``base`` with the sampled dotted keys set, validated."""
    return bench_config.resolve(deep_merge(base, nest(params)), source=source)


def _parse_param(name: str, raw: Any, source: str, earlier: dict[str, Param]) -> Param:
    where = f"space.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping with 'type' and its range, got {raw!r}")
    check_keys(raw, PARAM_KEYS, source, where, listed=True)
    ptype = raw.get("type", "categorical" if "choices" in raw else None)
    if ptype not in PARAM_TYPES:
        raise ConfigError(
            f"{source}: '{where}.type' must be one of {', '.join(PARAM_TYPES)}, got {ptype!r}"
            f"{did_you_mean(ptype, PARAM_TYPES)}"
        )
    when = _parse_when(raw.get("when") or {}, source, where, earlier)
    if ptype == "categorical":
        for key in NUMERIC_ONLY:
            if key in raw:
                raise ConfigError(
                    f"{source}: '{where}.{key}' does not apply to a categorical param (use 'choices')"
                )
        return Param(name, ptype, choices=_parse_choices(raw.get("choices"), source, where), when=when)
    if "choices" in raw:
        raise ConfigError(f"{source}: '{where}.choices' applies only to type categorical")
    v = {
        key: f.check(raw.get(key, f.default), source, f"{where}.{key}")
        for key, f in _numeric_fields(ptype).items()
    }
    _numeric_fields(ptype)["step"].check_range(v["step"], source, f"{where}.step")
    if v["low"] > v["high"]:
        raise ConfigError(f"{source}: '{where}': low ({v['low']}) > high ({v['high']})")
    if v["step"] is not None and v["log"]:
        raise ConfigError(f"{source}: '{where}': 'step' and 'log: true' cannot be combined (Optuna)")
    if v["log"] and v["low"] <= 0:
        raise ConfigError(f"{source}: '{where}': 'log: true' needs low > 0, got {v['low']}")
    return Param(name, ptype, when=when, **v)


def _parse_when(raw: Any, source: str, where: str, earlier: dict[str, Param]) -> dict[str, tuple]:
    """``when: {param: value | [values]}``: the params must be declared earlier, the values among their choices."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}.when' must map a param to a value or a list of values")
    when: dict[str, tuple] = {}
    for cond, allowed in raw.items():
        if cond not in earlier:
            raise ConfigError(
                f"{source}: '{where}.when' refers to '{cond}', which is not a param declared "
                f"before it in 'space'{did_you_mean(cond, earlier)}"
            )
        allowed_t = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not allowed_t:
            raise ConfigError(f"{source}: '{where}.when.{cond}' is an empty list")
        ref = earlier[cond]
        for v in allowed_t:
            if ref.type == "categorical" and v not in ref.choices:
                raise ConfigError(
                    f"{source}: '{where}.when.{cond}': {v!r} is not one of the choices "
                    f"of '{cond}' {list(ref.choices)}"
                )
        when[str(cond)] = allowed_t
    return when


def _parse_choices(choices: Any, source: str, where: str) -> tuple:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{source}: '{where}.choices' must be a non-empty list, got {choices!r}")
    if len({repr(c) for c in choices}) != len(choices):
        raise ConfigError(f"{source}: '{where}.choices' has duplicates: {choices!r}")
    for c in choices:
        if not (c is None or isinstance(c, (bool, int, float, str))):
            raise ConfigError(
                f"{source}: '{where}.choices': {c!r} is not a scalar "
                "(Optuna stores only None, bool, int, float and str)"
            )
    return tuple(choices)


def _check_param_values(param: Param, base: dict, source: str) -> None:
    """Every value the param can take must give a valid experiment config."""
    where = f"space.{param.name}"
    if param.type == "categorical":
        values = list(param.choices)
    else:
        values = [param.low, param.high]
    for v in values:
        try:
            apply_params(base, {param.name: v}, source=source)
        except ConfigError as exc:
            raise ConfigError(
                f"{source}: '{where}' sets a value the experiment config refuses: "
                f"{str(exc).removeprefix(source + ': ')}"
            ) from None
    if param.name == "fusion.method":
        import fusion

        methods = set(fusion.available_methods())  # the registry is the one list of methods
        for v in values:
            if v not in methods:
                raise ConfigError(
                    f"{source}: '{where}': unknown fusion method {v!r}"
                    f"{did_you_mean(v, sorted(methods))}; known: {', '.join(sorted(methods))}"
                )
    if param.name == "fusion.options.sparsity":
        for v in values:
            if not is_number(v) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{source}: '{where}': sparsity must be in [0, 1), got {v!r}")
    if param.name in ("model.arch", "data.name"):
        for v in values:
            _check_names({param.name: v}, source, where)


def _check_names(names: dict[str, Any], source: str, where: str) -> None:
    """Architecture and data set names, checked by the harness's own fail-fast checks."""
    from bench.data import check_name
    from bench.models import check_arch

    try:
        if "model.arch" in names:
            check_arch(str(names["model.arch"]))
        if "data.name" in names:
            check_name(str(names["data.name"]))
    except ValueError as exc:
        raise ConfigError(f"{source}: '{where}': {exc}") from None


def _parse_objectives(raw: Any, source: str) -> list[Objective]:
    if raw is None:
        return [Objective(schema.FUSED_ACC_BEST_VAL, "maximize")]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: 'objectives' must be a non-empty list of {{metric, direction}}")
    out = []
    for i, item in enumerate(raw):
        where = f"objectives[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping with 'metric' and 'direction'")
        check_keys(item, OBJECTIVE_KEYS, source, where, listed=True)
        metric = item.get("metric")
        if not schema.is_metric(metric):
            raise ConfigError(
                f"{source}: '{where}.metric': unknown metric {metric!r}"
                f"{did_you_mean(metric, schema.METRICS)} (see docs/design.md §3)"
            )
        out.append(Objective(metric, DIRECTION.check(item.get("direction"), source, f"{where}.direction")))
    if len({o.metric for o in out}) != len(out):
        raise ConfigError(f"{source}: 'objectives' lists a metric twice")
    return out


def _parse_choice_block(
    raw: Any, source: str, key: str, kinds: dict[str, tuple[str, ...]], default: str
) -> dict:
    """``sampler`` / ``pruner``: a name, or ``{type: name, <option>: <non-negative int>, ...}``."""
    if raw is None:
        raw = {"type": default}
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{key}' must be a name or a mapping with 'type', got {raw!r}")
    kind = raw.get("type", default)
    if kind not in kinds:
        raise ConfigError(
            f"{source}: '{key}': unknown {key} {kind!r}{did_you_mean(kind, kinds)}; "
            f"choose one of {', '.join(kinds)}"
        )
    check_keys(raw, ("type", *kinds[kind]), source, key, listed=True)
    for k, v in raw.items():
        if k != "type":
            OPTION.check(v, source, f"{key}.{k}")
            OPTION.check_range(v, source, f"{key}.{k}")
    return {**raw, "type": kind}


def _load_base(raw: Any, spec_path: Path | None, source: str) -> dict:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        path = Path(raw)
        if not path.is_absolute() and spec_path is not None:
            path = spec_path.parent / path
        return bench_config.load_config(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'base' must be an experiment config mapping or a path to one")
    return bench_config.resolve(raw, source=f"{source}: base")


def parse_spec(
    raw: Any, *, source: str = "<spec>", spec_path: Path | None = None, text: str = ""
) -> SweepSpec:
    """Validate a spec already read from YAML; raises ``ConfigError`` naming ``source`` and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep spec must be a mapping, got {type(raw).__name__}")
    check_keys(raw, TOP_KEYS, source, listed=True)
    base = _load_base(raw.get("base"), spec_path, source)
    _check_names({"model.arch": base["model"]["arch"], "data.name": base["data"]["name"]}, source, "base")
    raw_space = raw.get("space")
    if not isinstance(raw_space, dict) or not raw_space:
        raise ConfigError(f"{source}: 'space' must be a non-empty mapping of dotted config keys to ranges")
    space: dict[str, Param] = {}
    for name, praw in raw_space.items():
        name = str(name)
        space[name] = _parse_param(name, praw, source, space)
        _check_param_values(space[name], base, source)
    objectives = _parse_objectives(raw.get("objectives"), source)
    sampler = _parse_choice_block(raw.get("sampler"), source, "sampler", SAMPLERS, "tpe")
    pruner = _parse_choice_block(raw.get("pruner"), source, "pruner", PRUNERS, "none")
    _check_rules(space, objectives, sampler, pruner, source)
    scalars = {k: raw.get(k, f.default) for k, f in SCALARS.items()}
    for key, f in SCALARS.items():
        scalars[key] = f.check(scalars[key], source, key)
        f.check_range(scalars[key], source, key)
    study = scalars["study"] or (spec_path.stem if spec_path is not None else "sweep")
    if not isinstance(study, str) or not NAME.fullmatch(study):
        raise ConfigError(
            f"{source}: 'study' must be a name of letters, digits, '.', '_' or '-', got {study!r}"
        )
    if sampler["type"] not in GRID_SAMPLERS and scalars["n_trials"] is None:
        raise ConfigError(f"{source}: 'n_trials' is required for sampler '{sampler['type']}'")
    sections = dict(base=base, space=space, objectives=objectives, sampler=sampler, pruner=pruner)
    counts = {k: scalars[k] for k in ("repeats", "n_trials", "timeout")}
    description = str(scalars["description"] or "")
    return SweepSpec(source=source, study=study, **sections, **counts, description=description, text=text)


def _check_rules(
    space: dict[str, Param], objectives: list[Objective], sampler: dict, pruner: dict, source: str
) -> None:
    """Rules between sections: what Optuna's pruners and the grid sampler can do."""
    if pruner["type"] != "none":
        if len(objectives) > 1:
            raise ConfigError(
                f"{source}: 'pruner': pruning works only with one objective "
                f"(this spec has {len(objectives)}); use 'pruner: none'"
            )
        if objectives[0].direction != "maximize":
            raise ConfigError(
                f"{source}: 'pruner' reports validation accuracy (higher is better) and needs "
                "a maximized objective"
            )
    if sampler["type"] in GRID_SAMPLERS:
        for p in space.values():
            if p.type == "float" and p.step is None:
                raise ConfigError(
                    f"{source}: 'space.{p.name}': the grid sampler needs a 'step' for float "
                    "params (otherwise the grid is infinite)"
                )


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file."""
    path = Path(path)
    source = str(path)
    raw, text = bench_config.read_yaml(path, "sweep spec")
    return parse_spec(raw, source=source, spec_path=path, text=text)
