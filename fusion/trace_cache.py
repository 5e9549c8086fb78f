"""Verified traces kept on disk: a fresh process (each sweep trial is one) does not trace and self-check an
architecture that an earlier process already verified.

Tracing builds torch-pruning's dependency graph and walks it; the self-check permutes every group of a
float64 copy of the model and runs it twice. Both depend on the architecture only, so a verified trace is
stored under a key made of everything it depends on:

* the model's fingerprint (every module's name, type and settings, every tensor's name, shape and dtype,
  the example inputs' shapes and dtypes, the output layers; see ``trace._fingerprint``);
* the source files of the model's module classes (a changed ``forward`` changes the couplings);
* this package's own source and the versions of torch, torch-pruning and timm.

A model whose classes have no source file (defined interactively) is not cached. The directory is
``$FUSION_TRACE_CACHE``, else ``$XDG_CACHE_HOME/fusebench/traces`` (``~/.cache/...``);
``FUSION_TRACE_CACHE=off`` disables it. Files hold tensors and plain values only and are read with
``torch.load(weights_only=True)``; a file that cannot be read is ignored (the trace is then recomputed and
the file rewritten), and one that cannot be written is skipped with no error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .groups import ChannelGraph, ChannelGroup, Slot

ENV = "FUSION_TRACE_CACHE"
_FORMAT = 1


def cache_dir() -> Path | None:
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fusebench" / "traces"


def _file_digest(path: str) -> str:
    stat = os.stat(path)  # an edited file (a notebook's model code) is read again
    return _digest(path, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    package = Path(__file__).parent
    sources = sorted(str(p) for p in package.rglob("*.py"))
    versions = []
    for dist in ("torch", "torch-pruning", "timm"):
        try:
            versions.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((dist, None))
    return repr(([(Path(s).relative_to(package).as_posix(), _file_digest(s)) for s in sources], versions))


def key(model: nn.Module, fingerprint: tuple) -> str | None:
    """The cache key of ``model``'s verified trace, or None when the cache is off or its classes' sources
    cannot be read."""
    if cache_dir() is None:
        return None  # nothing to read or write: no source file is hashed
    files = set()
    for cls in {type(m) for m in model.modules()}:
        try:
            files.add(inspect.getsourcefile(cls))
        except TypeError:
            return None
    if None in files:
        return None
    try:
        digests = sorted(_file_digest(f) for f in files)
    except OSError:
        return None
    text = repr((_FORMAT, _environment(), digests, fingerprint))
    return hashlib.sha256(text.encode()).hexdigest()


def _path(digest: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / f"{digest}.pt"


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool, type(None)))


def store(digest: str | None, graph: ChannelGraph) -> None:
    """Write ``graph`` (verified) under ``digest``; atomically, and silently skipped if impossible."""
    path = _path(digest) if digest else None
    if path is None:
        return
    positions: list[torch.Tensor] = []
    groups = []
    for g in graph.groups:
        slots = []
        for s in g.slots:
            fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(Slot) if f.name != "positions"}
            fields["positions"] = len(positions)
            positions.append(s.positions.detach().cpu())
            slots.append(fields)
        fields = {f.name: getattr(g, f.name) for f in dataclasses.fields(ChannelGroup) if f.name != "slots"}
        groups.append({**fields, "slots": slots})
    fields = {f.name for f in dataclasses.fields(ChannelGraph)}
    extras = {k: v for k, v in vars(graph).items() if not k.startswith("_") and k not in fields and _plain(v)}
    meta = {
        "groups": groups,
        "output_layers": graph.output_layers,
        "shapes": {n: list(s) for n, s in graph.shapes.items()},
        "pinned": list(graph.pinned),
        "extras": extras,
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"meta": json.dumps(meta), "positions": positions}, f)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except (OSError, TypeError, ValueError):
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def load(digest: str | None) -> ChannelGraph | None:
    """The verified trace stored under ``digest``, or None (absent, unreadable, or from another format)."""
    path = _path(digest) if digest else None
    if path is None or not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(data["meta"])
        positions = data["positions"]
        groups = [
            ChannelGroup(
                **{k: v for k, v in g.items() if k != "slots"},
                slots=[Slot(**{**s, "positions": positions[s["positions"]]}) for s in g["slots"]],
            )
            for g in meta["groups"]
        ]
        graph = ChannelGraph(
            groups=groups,
            output_layers=list(meta["output_layers"]),
            shapes={n: tuple(s) for n, s in meta["shapes"].items()},
            pinned=list(meta["pinned"]),
        )
        for k, v in meta["extras"].items():
            setattr(graph, k, v)
    except Exception:  # noqa: BLE001 - a damaged or foreign file is a cache miss, never an error
        return None
    graph._verified = True
    return graph
