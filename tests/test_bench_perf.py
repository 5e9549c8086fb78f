"""``fusebench perf``: a real (tiny) measured case, and bad input refused before anything runs."""

from __future__ import annotations

import pytest

from bench.perf import Case, run_case
from fusebench import cli


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "avg,blend"], "unknown method"),
        (["--widths", "64,wide"], "--widths must be integers"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_perf_bad_input_exits_2(argv, message, capsys):
    assert cli.main(["perf", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err


def test_perf_case_measures_time_and_memory_beyond_the_inputs():
    row = run_case(Case("mlp W=256", "mlp", 256, 2, "nt"), "cpu", repeats=2)
    assert row["first_s"] > 0 and row["median_s"] > 0
    # one member: 3072*256 + 256*256 + 256*10 float32 weights
    assert row["model_mb"] == pytest.approx((3072 * 256 + 256 * 256 + 2560) * 4 / 2**20)
    # NT's extra memory holds at least the fused model's new tensors, and no N-wide concatenation
    assert 0.5 * row["model_mb"] < row["peak_extra_mb"] < 4 * row["model_mb"]
