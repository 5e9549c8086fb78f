"""``fusebench perf``: real measured cases, and bad input refused before anything runs."""

from __future__ import annotations

import pytest
import torch

from bench.perf import Case, method_data, run_case
from fusebench import cli


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "avg,blend"], "unknown method"),
        (["--widths", "64,wide"], "--widths must be integers"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--case", "resnet50 N=2"], "no case matches"),
    ],
)
def test_perf_bad_input_exits_2(argv, message, capsys):
    assert cli.main(["perf", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err


def test_perf_case_measures_time_and_memory_beyond_the_inputs():
    row = run_case(Case("mlp W=256", "mlp", 256, 2, "nt"), "cpu", repeats=2)
    assert row["first_s"] > 0 and row["cached_s"] > 0 and row["median_s"] > 0
    # one member: 3072*256 + 256*256 + 256*10 float32 weights
    assert row["model_mb"] == pytest.approx((3072 * 256 + 256 * 256 + 2560) * 4 / 2**20)
    # NT's extra memory holds at least the fused model's new tensors, and no N-wide concatenation
    assert 0.5 * row["model_mb"] < row["peak_extra_mb"] < 4 * row["model_mb"]


def _mlp_mb(width: int, n: int = 1) -> float:
    """float32 size of ``n`` MLPs 3072 -> width -> width -> 10 (no bias) concatenated: N*W wide, the hidden
    layer N*W x N*W (block-diagonal, but dense)."""
    wide = n * width
    return (3072 * wide + wide * wide + wide * 10) * 4 / 2**20


@pytest.mark.slow
def test_nt_never_builds_the_concatenated_model():
    """An oracle for the memory claim: with N = 4 members of width 2048, the concatenated model NT is defined
    by would take 352 MB (8.8 members: the hidden layer grows with N²), while NT's peak beyond its inputs must
    stay under 3 members (120 MB): the fused model (one member) plus scores and gathering buffers. An NT that
    built the concatenation, even briefly, would exceed the bound by more than twice."""
    width, n = 2048, 4
    row = run_case(Case(f"mlp W={width}", "mlp", width, n, "nt"), "cpu", repeats=2)
    member, concatenated = _mlp_mb(width), _mlp_mb(width, n)
    assert row["model_mb"] == pytest.approx(member)
    bound = 3 * member
    assert concatenated > 2 * bound  # the oracle can tell the two apart
    assert 0.5 * member < row["peak_extra_mb"] < bound, row


def test_perf_case_glob_runs_only_the_matching_cases(capsys):
    assert (
        cli.main(
            [
                "perf",
                "--quick",
                "--methods",
                "avg",
                "--widths",
                "64,128",
                "--case",
                "mlp W=128 N=*",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mlp W=128 avg N=2:" in out and "mlp W=64" not in out


def test_methods_that_observe_activations_get_a_fixed_batch_the_others_none():
    x = torch.randn(2, 3, 32, 32)
    assert method_data("nt", x) is None and method_data("weight_matching", x) is None
    for method in ("zipit", "activation_matching"):
        data = method_data(method, x)
        assert data.shape == (256, 3, 32, 32)
        assert torch.equal(data, method_data(method, x))  # the same batch in every process
