"""The experiment config: YAML file + ``key=value`` overrides, checked strictly against the defaults.

Why strict: a mistyped key (``fintune.epochs``) silently ignored would run the wrong experiment and log
it as if it were right; every unknown or mistyped key is an error naming the file and the dotted key.
The table below (``SCHEMA``: every key's default, type, choices and range) is the contract of
docs/design.md §2.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from bench.errors import ConfigError
from bench.validation import Field, check_ranges, defaults, did_you_mean

# The recipe keys shared by members and finetune beyond optimizer / lr / momentum / weight decay / epochs
# (bench.recipes.Recipe): defaults that train exactly as before they existed.
RECIPE_FIELDS: dict[str, Field] = {
    "nesterov": Field(False),
    "schedule": Field("constant", choices=("constant", "cosine", "multistep", "onecycle")),
    "milestones": Field([], items=int),  # increasing positive epochs (checked in _check_rules)
    "gamma": Field(0.1, gt=0.0, le=1.0),
    "warmup_epochs": Field(0, ge=0),  # below the epochs (checked in _check_rules)
    "label_smoothing": Field(0.0, ge=0.0, lt=1.0),
    "augment": Field("none", choices=("none", "crop_flip")),
}
RECIPE_DEFAULTS: dict[str, Any] = defaults(RECIPE_FIELDS)
OPTIMIZERS = ("sgd", "adam", "adamw")

#: The experiment config (docs/design.md §2): every key, its default, type, choices and range.
SCHEMA: dict[str, Any] = {
    "experiment": Field("fusebench"),
    "tracking_uri": Field(None, str, nullable=True),
    "seed": Field(0),
    "device": Field("auto"),
    "precision": Field("fp32", choices=("fp32", "bf16", "fp16")),
    "channels_last": Field("auto", choices=("auto", True, False)),
    "compile": Field(False),
    "data": {
        "name": Field("digits"),  # the known names are checked by bench.data.check_name
        "root": Field("./data"),
        "download": Field(False),
        "val_fraction": Field(0.1, gt=0.0, lt=1.0),
        "image_size": Field(None, int, nullable=True, gt=0, expect="a positive integer or null"),
        "batch_size": Field(128, ge=1),
        "on_device": Field("auto", choices=("auto", True, False)),
    },
    "model": {
        "arch": Field("mlp"),
        "width": Field(64, ge=1),
        "depth": Field(2, ge=1),
        "kwargs": Field({}, free=True),
    },
    "members": {
        "n": Field(2),  # >= 1 unless checkpoints are given (checked in _check_rules)
        "epochs": Field(20, ge=0),
        "optimizer": Field("sgd", choices=OPTIMIZERS),
        "lr": Field(0.05, gt=0.0),
        "momentum": Field(0.9),
        "weight_decay": Field(0.0005),
        "batch_size": Field(64, ge=1),
        **RECIPE_FIELDS,
        "checkpoints": Field([], items=str),
        "cache_dir": Field(None, str, nullable=True),
    },
    "fusion": {
        "method": Field("nt"),  # the fusion registry's names, checked by bench.experiment.validate
        "options": Field({}, free=True),
        "repair": Field("reset", choices=("none", "reset", "repair")),
        "repair_batches": Field(20, ge=1),
        "data_samples": Field(512, ge=1),
        "lmc": Field(False),
        "measure_memory": Field(True, choices=(True, False, "child")),
        "log_model": Field(False),
    },
    "finetune": {
        "epochs": Field(5, ge=0),
        "optimizer": Field("sgd", choices=OPTIMIZERS),
        "lr": Field(0.01, gt=0.0),
        "momentum": Field(0.9),
        "weight_decay": Field(0.0),
        **RECIPE_FIELDS,
        "distill": Field(False),
        "temperature": Field(4.0, gt=0.0),
        "baseline": Field(True),
        "distill_baseline": Field(False),
    },
}
DEFAULTS: dict[str, Any] = defaults(SCHEMA)


def _merge(table: dict, base: dict, override: Any, source: str, prefix: str = "") -> dict:
    """Merge ``override`` into a copy of ``base``, checking every key and value against ``table``."""
    if not isinstance(override, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(override).__name__}")
    out = copy.deepcopy(base)
    for key, value in override.items():
        key = str(key)
        dotted = prefix + key
        if key not in table:
            raise ConfigError(f"{source}: unknown key '{dotted}'{did_you_mean(key, table)}")
        field = table[key]
        if isinstance(field, dict):
            out[key] = _merge(field, base[key], value, source, dotted + ".")
        else:
            out[key] = copy.deepcopy(field.check(value, source, dotted))
    return out


def _check_rules(cfg: dict, source: str) -> None:
    """What one key's field cannot say: rules between keys."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' {why}")

    if cfg["members"]["n"] < 1 and not cfg["members"]["checkpoints"]:
        raise bad("members.n", "must be >= 1")
    for sec in ("members", "finetune"):
        r = cfg[sec]
        if r["epochs"] and r["warmup_epochs"] and r["warmup_epochs"] >= r["epochs"]:
            raise bad(f"{sec}.warmup_epochs", "must be >= 0 and below the epochs")
        ms = r["milestones"]
        if not all(m > 0 for m in ms) or ms != sorted(set(ms)):
            raise bad(f"{sec}.milestones", f"must be increasing positive epoch numbers, got {ms!r}")
        if r["schedule"] == "multistep" and not ms:
            raise bad(f"{sec}.milestones", "are required by schedule: multistep (e.g. [30, 60])")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value), so ``n=4`` is an int and ``x=null`` is None."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE (e.g. members.n=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from None
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def resolve(raw: dict | None = None, overrides: list[str] | None = None, *, source: str = "<config>") -> dict:
    """Defaults <- ``raw`` <- overrides, validated. Returns a new plain dict."""
    cfg = _merge(SCHEMA, DEFAULTS, raw or {}, source)
    for text in overrides or []:
        key, value = parse_override(text)
        cfg = _merge(SCHEMA, cfg, _nest(key, value), f"override '{text}'")
    check_ranges(SCHEMA, cfg, source)
    _check_rules(cfg, source)
    return cfg


def read_yaml(path: str | Path, what: str = "config") -> tuple[Any, str]:
    """(parsed YAML, its text) of a file; every failure is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Read a YAML config (None: the defaults), apply ``key=value`` overrides, validate."""
    raw: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw, _ = read_yaml(path)
        if raw is None:
            raw = {}
    return resolve(raw, overrides, source=source)


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> strings, for MLflow params (empty mappings and lists kept as their JSON text)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, (dict, list)):
            out[dotted] = json.dumps(value, sort_keys=True)
        else:
            out[dotted] = "null" if value is None else str(value)
    return out


def stable_hash(obj: Any) -> str:
    """A short hex digest of a JSON-able object that does not depend on key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
