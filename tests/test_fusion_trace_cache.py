"""Verified traces on disk (``fusion.trace_cache``): a fresh process reuses a trace another one verified,
only for the same architecture, inputs and code, and a damaged file is a cache miss, never a wrong model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member

import fusion
from fusion import trace, trace_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV, str(tmp_path))
    trace._CACHE.clear()
    yield tmp_path
    trace._CACHE.clear()


def _same_graph(a, b) -> None:
    assert a.output_layers == b.output_layers and a.shapes == b.shapes and a.pinned == b.pinned
    assert [(g.name, g.n_units, g.unit_kind) for g in a.groups] == [
        (g.name, g.n_units, g.unit_kind) for g in b.groups
    ]
    for ga, gb in zip(a.groups, b.groups):
        assert len(ga.slots) == len(gb.slots)
        for sa, sb in zip(ga.slots, gb.slots):
            assert (sa.tensor, sa.dim, sa.role, sa.kind, sa.is_weight, sa.layer) == (
                sb.tensor,
                sb.dim,
                sb.role,
                sb.kind,
                sb.is_weight,
                sb.layer,
            )
            assert torch.equal(sa.positions, sb.positions)
    assert a.tensor_dims == b.tensor_dims


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_a_stored_trace_is_the_trace_and_is_not_traced_again(cache, arch, monkeypatch):
    model, x = make_fusion_member(arch, 0), fusion_example_input(arch)
    traced = fusion.channel_groups(model, x)
    assert len(list(cache.glob("*.pt"))) == 1
    trace._CACHE.clear()  # as in a fresh process

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(trace, "_trace", no_trace)
    monkeypatch.setattr(trace, "verify_permutation_invariance", no_trace)
    loaded = fusion.channel_groups(make_fusion_member(arch, 1), x)  # other weights: the same architecture
    _same_graph(traced, loaded)
    assert getattr(loaded, "check_precision", None) == getattr(traced, "check_precision", None)
    members = [make_fusion_member(arch, s) for s in range(2)]
    fused = fusion.fuse(members, "nt", example_inputs=x)
    trace._CACHE.clear()
    monkeypatch.undo()
    monkeypatch.setenv(trace_cache.ENV, "off")
    reference = fusion.fuse(members, "nt", example_inputs=x)
    for (n, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n


def test_another_architecture_or_input_shape_is_not_served_from_the_cache(cache):
    x = fusion_example_input("mlp")
    fusion.channel_groups(make_fusion_member("mlp", 0), x)
    trace._CACHE.clear()
    wider = nn.Sequential(nn.Linear(x.shape[1], 40), nn.ReLU(), nn.Linear(40, 3))
    fusion.channel_groups(wider, x)
    fusion.channel_groups(make_fusion_member("mlp", 0), torch.randn(7, x.shape[1]))
    assert len(list(cache.glob("*.pt"))) == 3


class _RollNet(nn.Module):
    """Each channel reads its neighbour's mean through ``roll``, which torch-pruning maps as element-wise:
    a coupling the trace misses and the self-check refuses."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.fc((h * torch.roll(h.mean((2, 3), keepdim=True), 1, dims=1)).mean((2, 3)))


def test_a_refused_model_is_never_stored(cache):
    model = _RollNet().eval()
    for _ in range(2):
        with pytest.raises(fusion.FusionError, match="not traced completely"):
            fusion.channel_groups(model, torch.randn(1, 3, 8, 8))
        trace._CACHE.clear()
    assert not list(cache.glob("*.pt"))


def test_a_damaged_file_is_a_miss_and_is_rewritten(cache):
    model, x = make_fusion_member("mlp", 0), fusion_example_input("mlp")
    traced = fusion.channel_groups(model, x)
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"not a trace")
    trace._CACHE.clear()
    _same_graph(traced, fusion.channel_groups(model, x))
    assert trace_cache.load(path.stem) is not None


def test_a_class_defined_without_a_source_file_is_not_cached(cache):
    namespace: dict = {}
    exec(
        "import torch.nn as nn\nclass Tiny(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.a = nn.Linear(4, 6)\n        self.b = nn.Linear(6, 2)\n    def forward(self, x):\n        return self.b(self.a(x).relu())\n",
        namespace,
    )
    fusion.channel_groups(namespace["Tiny"](), torch.randn(2, 4))
    assert not list(cache.glob("*.pt"))


def test_off_and_an_unwritable_folder_store_nothing_and_still_fuse(tmp_path, monkeypatch):
    x = fusion_example_input("mlp")
    members = [make_fusion_member("mlp", s) for s in range(2)]
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    for value in ("off", str(blocker / "traces")):
        monkeypatch.setenv(trace_cache.ENV, value)
        trace._CACHE.clear()
        fusion.fuse(members, "nt", example_inputs=x)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    trace._CACHE.clear()


def test_a_second_process_reuses_the_first_ones_trace(cache):
    """The case the cache is for: each sweep trial is a fresh process."""
    script = (
        "import sys, time; sys.path.insert(0, 'tests')\n"
        "from conftest import make_fusion_member, fusion_example_input\n"
        "import fusion, fusion.trace as t\n"
        "calls = []\n"
        "real = t._trace\n"
        "t._trace = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "fusion.fuse([make_fusion_member('resnet18', s) for s in range(2)], 'nt', example_inputs=fusion_example_input('resnet18'))\n"
        "print(len(calls))\n"
    )
    env = {**os.environ, trace_cache.ENV: str(cache), "PYTHONPATH": str(REPO)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    ]
    assert [r.stdout.strip() for r in runs] == ["1", "0"]


def test_editing_a_model_class_source_changes_the_key(cache, tmp_path, monkeypatch):
    import importlib

    source = tmp_path / "edited_model.py"
    code = "import torch.nn as nn\nclass M(nn.Sequential):\n    def __init__(self):\n        super().__init__(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"
    source.write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("edited_model")
    x = torch.randn(2, 4)
    fingerprint = trace._fingerprint(module.M(), x, None)
    before = trace_cache.key(module.M(), fingerprint)
    assert before == trace_cache.key(module.M(), fingerprint)
    source.write_text(code + "    def forward(self, x):\n        return super().forward(x).flip(1)\n")
    os.utime(source, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    module = importlib.reload(module)
    assert trace_cache.key(module.M(), fingerprint) != before


def test_with_the_cache_off_no_key_is_made(monkeypatch):
    """``off`` skips the cache's own work too: no class source file is read or hashed."""
    monkeypatch.setenv(trace_cache.ENV, "off")
    monkeypatch.setattr(trace_cache, "_file_digest", lambda path: (_ for _ in ()).throw(AssertionError(path)))
    model = make_fusion_member("mlp", 0)
    assert trace_cache.key(model, trace._fingerprint(model, fusion_example_input("mlp"), None)) is None
