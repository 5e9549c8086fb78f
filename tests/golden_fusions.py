"""Fused state dicts of a fixed set of models and methods, hashed: the proof that a refactoring of the fusion
library changed no result.

``python tests/golden_fusions.py [--write FILE] [--check FILE] [--models a,b] [--methods x,y]`` fuses two
seeded members of each model (``bench.zoo``'s members: random, live, with distinct BatchNorm statistics) with
each method and prints, per case, the sha256 of the fused state dict (bit identity on one machine) and a
position-weighted checksum per tensor (``sum(t * w)`` with ``w`` drawn from a seeded generator: moved by any
permutation, robust to the last-bit differences between CPUs). ``--write`` stores both; ``--check`` compares
the sha256 (reported) and the checksums (1e-6 of the tensor's weighted absolute sum, failing). ``tests/test_fusion_golden.py`` checks the
stored checksums of the fast cases; the whole set is run against the commit before a redesign.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ["mlp", "resnet18", "vit_tiny_patch16_224", "maxvit_pico_rw_256", "levit_128", "gmlp_ti16_224",
          "resnest14d"]  # fmt: skip
METHODS = ["nt", "nt_wide", "avg", "ot", "weight_matching", "zipit"]
FAST = ["mlp", "resnet18", "vit_tiny_patch16_224"]


def members(name: str):
    """Two members and (example batch, data batch)."""
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        out = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            out.append(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)))
        x = torch.randn(2, 20, generator=gen)
        return out, x, torch.randn(64, 20, generator=gen)
    from bench.zoo import INPUT_SIZE, _members

    ms = _members(name, INPUT_SIZE)
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE, generator=gen)
    return ms, x, torch.randn(16, 3, INPUT_SIZE, INPUT_SIZE, generator=gen)


def fuse(method: str, ms, x, data):
    import fusion

    if method == "nt_wide":
        return fusion.fuse(ms, "nt", example_inputs=x, sparsity=0.25)
    if method == "zipit":
        return fusion.fuse(ms, "zipit", example_inputs=x, data=data)
    return fusion.fuse(ms, method, example_inputs=x)


def digest(model: nn.Module) -> tuple[str, dict]:
    state = model.state_dict()
    h = hashlib.sha256()
    sums = {}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        if t.is_floating_point():
            w = torch.rand(t.shape, generator=torch.Generator().manual_seed(len(name) * 7919 + t.numel()),
                           dtype=torch.float64)  # fmt: skip
            sums[name] = [float((t.double() * w).sum()), float((t.double().abs() * w).sum()), list(t.shape)]
        else:
            sums[name] = [hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16], None, list(t.shape)]
    return h.hexdigest(), sums


def run(models, methods) -> dict:
    import fusion

    out = {}
    for name in models:
        ms, x, data = members(name)
        for method in methods:
            torch.manual_seed(0)
            t = time.perf_counter()
            try:
                fused = fuse(method, ms, x, data)
            except fusion.FusionError as exc:  # a refusal is a result too: the same refusal, word for word
                sha = "refused: " + hashlib.sha256(str(exc).encode()).hexdigest()
                out[f"{name}/{method}"] = {"sha256": sha, "sums": {}, "refused": str(exc)}
            else:
                sha, sums = digest(fused)
                out[f"{name}/{method}"] = {"sha256": sha, "sums": sums}
            print(f"{name:24s} {method:16s} {sha[:16]}  {time.perf_counter() - t:6.2f} s", flush=True)
    return out


def compare(ref: dict, new: dict, rtol: float = 1e-6) -> list[str]:
    """Differences between two runs: a case or tensor missing or moved beyond ``rtol`` (checksums)."""
    problems = []
    for case, want in ref.items():
        got = new.get(case)
        if got is None:
            continue
        if want.get("refused") != got.get("refused"):
            problems.append(f"{case}: refused {want.get('refused')!r} before, {got.get('refused')!r} now")
            continue
        for name, (s, a, shape) in want["sums"].items():
            g = got["sums"].get(name)
            if g is None or g[2] != shape:
                problems.append(f"{case}: {name} missing or reshaped ({g and g[2]} vs {shape})")
            elif a is None:
                if g[0] != s:
                    problems.append(f"{case}: integer tensor {name} differs")
            elif abs(g[0] - s) > rtol * max(a, 1e-12):
                problems.append(f"{case}: {name} checksum {g[0]!r} vs {s!r}")
        extra = set(got["sums"]) - set(want["sums"])
        if extra:
            problems.append(f"{case}: tensors not in the reference: {sorted(extra)[:3]}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--write", default=None)
    p.add_argument("--check", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.models.split(","), args.methods.split(","))
    if args.write:
        Path(args.write).write_text(json.dumps(result, indent=0, sort_keys=True))
    if args.check:
        ref = json.loads(Path(args.check).read_text())
        same = [c for c in result if c in ref and ref[c]["sha256"] == result[c]["sha256"]]
        print(f"bit-identical: {len(same)} of {len([c for c in result if c in ref])} cases")
        for c in result:
            if c in ref and c not in same:
                print(f"  not bit-identical: {c}")
        problems = compare(ref, result)
        for line in problems:
            print("DIFF", line)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
