"""The fast cases of ``tests/golden_fusions.py`` against the fused models recorded before the fusion library's
redesign (``tests/golden/fusions.json``, made at ec13651): the same members fused by every method give the
same tensors (position-weighted checksums to 1e-6 of each tensor's weighted absolute sum: a moved unit shows) or the same refusal."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import golden_fusions as golden

REFERENCE = json.loads((Path(__file__).parent / "golden" / "fusions.json").read_text())


@pytest.mark.parametrize("model", golden.FAST)
def test_fused_models_are_those_of_before_the_redesign(model):
    result = golden.run([model], golden.METHODS)
    assert set(result) <= set(REFERENCE)
    assert golden.compare({c: REFERENCE[c] for c in result}, result) == []


def test_the_comparison_sees_two_units_swapped_in_a_wide_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 5))
    _, before = golden.digest(model)
    with torch.no_grad():
        model[0].weight[[7, 3000]] = model[0].weight[[3000, 7]].clone()
    _, after = golden.digest(model)
    problems = golden.compare({"m": {"sums": before}}, {"m": {"sums": after}})
    assert problems and all("0.weight" in p for p in problems)
