"""The traced channel graphs of the zoo's models, hashed: the proof that a refactoring of the tracer changed
no trace. ``python tests/golden_traces.py --models-from docs/architectures.jsonl [--write F | --check F]``
traces each model (``bench.zoo``'s members, at the zoo's input size or the model's own where it walked at
that, trace cache off) with the permutation self-check and records either the graph's digest (every group's
name, unit count and kind, every slot's fields and positions, the pinned sets, contracted channels, output
layers and check precision) or the refusal's text. ``--check`` lists every model whose record differs."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FUSION_TRACE_CACHE", "off")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def describe(graph) -> dict:
    h = hashlib.sha256()
    for g in graph.groups:
        h.update(repr((g.name, g.n_units, g.unit_kind)).encode())
        for s in g.slots:
            fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "positions"}
            h.update(repr(sorted(fields.items())).encode())
            h.update(repr(tuple(s.positions.shape)).encode())
            h.update(s.positions.contiguous().numpy().tobytes())
    extra = {
        "pinned": list(graph.pinned),
        "outputs": list(graph.output_layers),
        "contracted": getattr(graph, "contracted_channels", None),
        "precision": getattr(graph, "check_precision", None),
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return {"digest": h.hexdigest(), "groups": len(graph.groups), **extra}


def trace(name: str, size: int) -> dict:
    import torch

    import fusion
    from bench.zoo import _members

    members = _members(name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in members:
            m(x)
    try:
        return describe(fusion.channel_groups(members[0], x))
    except fusion.FusionError as exc:
        return {"refused": str(exc)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models-from", default=str(ROOT / "docs" / "architectures.jsonl"))
    p.add_argument("--models", default=None, help="comma-separated subset")
    p.add_argument("--write")
    p.add_argument("--check")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in Path(args.models_from).read_text().splitlines() if line.strip()]
    wanted = set(args.models.split(",")) if args.models else None
    ref = json.loads(Path(args.check).read_text()) if args.check else {}
    out, differ = {}, []
    for row in rows:
        name = row["model"]
        if wanted and name not in wanted or row.get("status") == "skipped":
            continue
        t = time.perf_counter()
        try:
            out[name] = trace(name, int(row.get("input", 64)))
        except Exception as exc:  # noqa: BLE001 - recorded, compared like any other outcome
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        same = "" if name not in ref else (" same" if ref[name] == out[name] else " DIFFERS")
        if same == " DIFFERS":
            differ.append(name)
        print(f"{name:40s} {out[name].get('groups', '-')!s:>4} {time.perf_counter() - t:6.2f} s{same}", flush=True)
    if args.write:
        Path(args.write).write_text(json.dumps(out, indent=1, sort_keys=True))
    if args.check:
        for name in differ:
            print(f"DIFF {name}: before {ref[name]}\n     now    {out[name]}")
        print(f"{len(out) - len(differ)} of {len(out)} traces identical")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
