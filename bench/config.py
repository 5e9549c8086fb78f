"""The experiment config: YAML file + ``key=value`` overrides, checked strictly against the defaults.

Why strict: a mistyped key (``fintune.epochs``) silently ignored would run the wrong experiment and log
it as if it were right; every unknown or mistyped key is an error naming the file and the dotted key.
The defaults below are the contract of docs/design.md §2.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from bench.errors import ConfigError

# The recipe keys shared by members and finetune beyond optimizer / lr / momentum / weight decay / epochs
# (bench.recipes.Recipe): defaults that train exactly as before they existed.
RECIPE_DEFAULTS: dict[str, Any] = {
    "nesterov": False,
    "schedule": "constant",
    "milestones": [],
    "gamma": 0.1,
    "warmup_epochs": 0,
    "label_smoothing": 0.0,
    "augment": "none",
}

DEFAULTS: dict[str, Any] = {
    "experiment": "fusebench",
    "tracking_uri": None,
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    "channels_last": "auto",
    "compile": False,
    "data": {
        "name": "digits",
        "root": "./data",
        "download": False,
        "val_fraction": 0.1,
        "image_size": None,
        "batch_size": 128,
        "on_device": "auto",
    },
    "model": {"arch": "mlp", "width": 64, "depth": 2, "kwargs": {}},
    "members": {
        "n": 2,
        "epochs": 20,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "batch_size": 64,
        **RECIPE_DEFAULTS,
        "checkpoints": [],
        "cache_dir": None,
    },
    "fusion": {
        "method": "nt",
        "options": {},
        "repair": "reset",
        "repair_batches": 20,
        "data_samples": 512,
        "lmc": False,
        "measure_memory": True,
        "log_model": False,
    },
    "finetune": {
        "epochs": 5,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0,
        **RECIPE_DEFAULTS,
        "distill": False,
        "temperature": 4.0,
        "baseline": True,
        "distill_baseline": False,
    },
}

# Keys whose value is a free-form mapping (not checked key by key).
FREE_MAPPINGS = {"model.kwargs", "fusion.options"}
# Keys that may be null besides their default type.
NULLABLE = {"tracking_uri", "data.image_size", "members.cache_dir"}
# Allowed values of enumerated keys.
CHOICES = {
    "data.on_device": ("auto", True, False),
    "members.optimizer": ("sgd", "adam", "adamw"),
    "finetune.optimizer": ("sgd", "adam", "adamw"),
    "fusion.repair": ("none", "reset", "repair"),
    "precision": ("fp32", "bf16", "fp16"),
    "channels_last": ("auto", True, False),
    "members.schedule": ("constant", "cosine", "multistep", "onecycle"),
    "finetune.schedule": ("constant", "cosine", "multistep", "onecycle"),
    "members.augment": ("none", "crop_flip"),
    "finetune.augment": ("none", "crop_flip"),
    "fusion.measure_memory": (True, False, "child"),
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _merge(base: dict, override: Any, source: str, prefix: str = "") -> dict:
    """Merge ``override`` into a copy of ``base``, checking every key and type against ``base``."""
    if not isinstance(override, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(override).__name__}")
    out = copy.deepcopy(base)
    for key, value in override.items():
        key = str(key)
        dotted = prefix + key
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest(key, list(base))}")
        out[key] = _check_value(base[key], value, source, dotted)
    return out


def _check_value(default: Any, value: Any, source: str, dotted: str) -> Any:
    if dotted in FREE_MAPPINGS:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if isinstance(default, dict):
        return _merge(default, value, source, dotted + ".")
    if value is None and dotted in NULLABLE:
        return None
    if dotted in CHOICES:
        if value not in CHOICES[dotted]:
            raise ConfigError(f"{source}: '{dotted}' must be one of {list(CHOICES[dotted])}, got {value!r}")
        return value
    if dotted == "data.image_size":
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: '{dotted}' must be a positive integer or null, got {value!r}")
        return value
    expected = type(default) if default is not None else str
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{source}: '{dotted}' must be {expected.__name__}, got {value!r}")
    return value


def _check_ranges(cfg: dict, source: str) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' {why}")

    if not 0.0 < cfg["data"]["val_fraction"] < 1.0:
        raise bad("data.val_fraction", "must be in (0, 1)")
    for key in (
        "data.batch_size", "members.batch_size", "model.width", "model.depth", "fusion.repair_batches",
        "fusion.data_samples",
    ):  # fmt: skip
        sec, name = key.split(".")
        if cfg[sec][name] < 1:
            raise bad(key, "must be >= 1")
    for key in ("members.epochs", "finetune.epochs"):
        sec, name = key.split(".")
        if cfg[sec][name] < 0:
            raise bad(key, "must be >= 0")
    if cfg["members"]["n"] < 1 and not cfg["members"]["checkpoints"]:
        raise bad("members.n", "must be >= 1")
    for key in ("members.lr", "finetune.lr", "finetune.temperature"):
        sec, name = key.split(".")
        if cfg[sec][name] <= 0:
            raise bad(key, "must be > 0")
    for sec in ("members", "finetune"):
        r = cfg[sec]
        if not 0.0 <= r["label_smoothing"] < 1.0:
            raise bad(f"{sec}.label_smoothing", "must be in [0, 1)")
        if r["warmup_epochs"] < 0 or (
            r["epochs"] and r["warmup_epochs"] >= r["epochs"] and r["warmup_epochs"]
        ):
            raise bad(f"{sec}.warmup_epochs", "must be >= 0 and below the epochs")
        if not 0.0 < r["gamma"] <= 1.0:
            raise bad(f"{sec}.gamma", "must be in (0, 1]")
        ms = r["milestones"]
        if not all(isinstance(m, int) and not isinstance(m, bool) and 0 < m for m in ms) or ms != sorted(
            set(ms)
        ):
            raise bad(f"{sec}.milestones", f"must be increasing positive epoch numbers, got {ms!r}")
        if r["schedule"] == "multistep" and not ms:
            raise bad(f"{sec}.milestones", "are required by schedule: multistep (e.g. [30, 60])")
    if not all(isinstance(p, str) for p in cfg["members"]["checkpoints"]):
        raise bad("members.checkpoints", "must be a list of file paths")


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
    cfg = _merge(DEFAULTS, raw or {}, source)
    for text in overrides or []:
        key, value = parse_override(text)
        cfg = _merge(cfg, _nest(key, value), f"override '{text}'")
    _check_ranges(cfg, source)
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
