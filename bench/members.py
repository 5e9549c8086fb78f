"""Ensemble members: trained with the configured recipe and kept in a member cache, or brought by the user.

The cache is keyed by everything that determines a member's weights (data set, split, preprocessing,
architecture, recipe, member seed, library major versions) so that sweeps over N, methods, sparsity or
fine-tune budgets train each member once. It is meant to be shared (several processes, several machines
on one filesystem):

* files are written atomically (temporary file, fsync, ``os.replace``): a reader never sees half a file;
* a per-entry lock (``fcntl.flock``) is held around "train or load", and the entry is checked again after
  the lock is acquired, so two processes asking for the same member train it once;
* every entry carries a checksum of its tensors; an entry that does not load, does not match its key or
  fails the checksum is treated as absent and retrained (then atomically replaced).

Not part of the key: the device and ``data.on_device`` (the batch order is the same on both paths; GPU
and CPU numerics differ in the last bits only), the eval batch size, the data root of torchvision sets.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.config import RECIPE_DEFAULTS, stable_hash
from bench.data import PREPROCESSING_VERSION, SPLIT_SEED, DataBundle
from bench.errors import FusebenchError
from bench.models import BUILT_IN, arch_label, build_model
from bench.recipes import Execution, Recipe
from bench.train import train_model

CACHE_FORMAT = 1


def member_seed(repeat_seed: int, index: int) -> int:
    """Seed of member ``index``: members 0..k-1 are shared by every N >= k of one repeat."""
    return repeat_seed * 10007 + index


def cache_dir(cfg: dict) -> Path:
    return Path(cfg["members"]["cache_dir"] or os.environ.get("FUSEBENCH_CACHE") or "./runs/members")


def _major(version: str) -> str:
    return version.split(".")[0]


def member_key(cfg: dict, seed: int) -> dict:
    """Everything that determines a trained member's weights."""
    import timm

    d, m, r = cfg["data"], cfg["model"], cfg["members"]
    data = {
        "name": d["name"],
        "val_fraction": d["val_fraction"],
        "image_size": d["image_size"],
        "split_seed": SPLIT_SEED,
        "preprocessing": PREPROCESSING_VERSION,
    }
    if d["name"] == "imagefolder":
        data["root"] = str(Path(d["root"]).expanduser().resolve())
    model = {"arch": m["arch"], "kwargs": m["kwargs"]}
    if m["arch"] in BUILT_IN:
        model.update(width=m["width"], depth=m["depth"])
    recipe = {k: r[k] for k in ("epochs", "optimizer", "lr", "momentum", "weight_decay", "batch_size")}
    # recipe fields added later enter the key only when they differ from the old behaviour, so members
    # cached before them keep their keys
    for key, plain in RECIPE_DEFAULTS.items():
        if r[key] != plain:
            recipe[key] = r[key]
    if cfg["precision"] != "fp32":  # rounding changes the weights (channels_last / compile do not)
        recipe["precision"] = cfg["precision"]
    libs = {"torch": _major(torch.__version__), "timm": _major(timm.__version__)}
    return {
        "format": CACHE_FORMAT,
        "data": data,
        "model": model,
        "recipe": recipe,
        "seed": seed,
        "libs": libs,
    }


def _tensor_checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class MemberSet:
    models: list[nn.Module]
    seeds: list[int | None]
    trained: int = 0  # members trained in this call
    loaded: int = 0  # members loaded from the cache or from checkpoints
    train_seconds: float = 0.0  # wall time spent training (and waiting for another process to train)
    images_per_s: float = 0.0  # training throughput of the members trained in this call (mean)
    paths: list[str] = field(default_factory=list)


class MemberCache:
    """Train-or-load of single members in a cache folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: dict) -> Path:
        return self.root / f"{stable_hash(key)}.pt"

    def load(self, key: dict, model: nn.Module) -> bool:
        """Load the entry into ``model``; False when it is absent, corrupt, partial or for another key."""
        path = self.path(key)
        if not path.exists():
            return False
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state = payload["state_dict"]
            if payload.get("key_hash") != stable_hash(key) or payload.get("checksum") != _tensor_checksum(
                state
            ):
                raise ValueError("key or checksum mismatch")
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is simply retrained
            print(
                f"[fusebench] member cache: ignoring bad entry {path.name} ({type(exc).__name__})",
                file=sys.stderr,
            )
            return False
        return True

    def save(self, key: dict, model: nn.Module) -> Path:
        """Write atomically: a temp file in the same folder, fsync, then os.replace."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        payload = {
            "state_dict": state,
            "key_hash": stable_hash(key),
            "key": key,
            "checksum": _tensor_checksum(state),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with contextlib.suppress(OSError):  # make the rename durable
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path

    @contextlib.contextmanager
    def lock(self, key: dict):
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.path(key).with_suffix(".lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fresh_model(cfg: dict, data: DataBundle, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg["model"], data.in_chans, data.num_classes, data.image_size, data.dims)


def get_member(
    cfg: dict, data: DataBundle, seed: int, cache: MemberCache, desc: str
) -> tuple[nn.Module, bool, float]:
    """(model on data.device, trained here?, training images/s) for the member of ``seed``."""
    key = member_key(cfg, seed)
    model = _fresh_model(cfg, data, seed)
    if cache.load(key, model):  # fast path: no lock needed, writes are atomic
        return model.to(data.device).eval(), False, 0.0
    with cache.lock(key):
        if cache.load(key, model):  # another process trained it while we waited
            return model.to(data.device).eval(), False, 0.0
        model = _fresh_model(cfg, data, seed).to(data.device)
        speed = train_model(
            model,
            data,
            Recipe.from_section(cfg["members"]),
            seed=seed,
            execution=Execution.from_config(cfg, data.device),
            desc=desc,
        )
        cache.save(key, model)
    return model.eval(), True, speed


def load_checkpoint(path: str, cfg: dict, data: DataBundle) -> nn.Module:
    """A bring-your-own member: a state dict (or ``{"state_dict": ...}``) for the configured architecture."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FusebenchError(f"members.checkpoints: checkpoint {path} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the user's file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FusebenchError(
            f"members.checkpoints: checkpoint {path} does not load with torch.load(weights_only=True) "
            f"(save model.state_dict(), not the model): {msg[:200]}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FusebenchError(f"members.checkpoints: checkpoint {path} is not a state dict of tensors")
    model = build_model(cfg["model"], data.in_chans, data.num_classes, data.image_size, data.dims)
    try:
        model.load_state_dict(obj)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise FusebenchError(
            f"members.checkpoints: checkpoint {path} does not match model.arch "
            f"'{arch_label(cfg['model'])}' for {data.name} ({data.in_chans} channels, {data.num_classes} "
            f"classes): {detail}"
        ) from None
    return model.to(data.device).eval()


def get_members(cfg: dict, data: DataBundle) -> MemberSet:
    """The N members of the experiment: from checkpoints if given, else trained or loaded from the cache."""
    checkpoints = cfg["members"]["checkpoints"]
    if checkpoints:
        models = [load_checkpoint(path, cfg, data) for path in checkpoints]
        return MemberSet(models, [None] * len(models), loaded=len(models), paths=list(checkpoints))
    cache = MemberCache(cache_dir(cfg))
    n = cfg["members"]["n"]
    out = MemberSet([], [])
    for i in range(n):
        seed = member_seed(cfg["seed"], i)
        start = time.perf_counter()
        model, trained, speed = get_member(cfg, data, seed, cache, desc=f"member {i + 1}/{n}")
        if trained:
            out.trained += 1
            out.train_seconds += time.perf_counter() - start
            out.images_per_s += (speed - out.images_per_s) / out.trained
        else:
            out.loaded += 1
        out.models.append(model)
        out.seeds.append(seed)
        out.paths.append(str(cache.path(member_key(cfg, seed))))
    return out
