"""Training loops and measurement helpers: fine-tune curves, distillation, honest CPU peak memory."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.config import load_config
from bench.data import load_data
from bench.measure import latency_ms, macs_and_params, peak_rss_beyond_baseline
from bench.models import build_mlp
from bench.recipes import Recipe
from bench.train import Progress, evaluate, finetune


def _allocate(mb: int) -> int:
    """Module-level (picklable): hold ``mb`` MiB of torch tensor memory, touched, then free it."""
    t = torch.ones(mb * 1024 * 1024 // 4)
    return int(t[-1].item())


def test_peak_rss_sees_torch_tensors():
    # tracemalloc would report ~0 here; the child's RSS high-water mark sees the 200 MiB tensor.
    result, peak_mb, seconds = peak_rss_beyond_baseline(_allocate, 200)
    assert result == 1 and seconds > 0
    assert 190 <= peak_mb <= 260, peak_mb


def test_peak_rss_reraises_errors():
    with pytest.raises(ValueError, match="negative dimensions"):
        peak_rss_beyond_baseline(np.empty, -1)


@pytest.fixture
def digits(one_thread):
    return load_data(load_config(None)["data"], torch.device("cpu"))


def test_finetune_curves_and_selection(digits):
    model = build_mlp(64, 16, 1, 10)
    res = finetune(model, digits, Recipe(epochs=0, lr=0.05), seed=0)
    assert len(res.test_acc) == 1 and res.best_epoch == 0 and res.train_loss == []
    calls = []
    res = finetune(
        model, digits, Recipe(epochs=3, lr=0.05), seed=0, epoch_callback=lambda e, v: calls.append((e, v))
    )
    assert len(res.test_acc) == len(res.val_acc) == 4 and len(res.train_loss) == 3
    assert calls == [(e, res.val_acc[e]) for e in (1, 2, 3)]
    assert res.best_epoch == int(np.argmax(res.val_acc))
    assert res.final_acc == pytest.approx(evaluate(model, digits.test)[0])
    assert res.test_acc[-1] > 0.8 and res.train_loss[-1] < res.train_loss[0]


def test_distillation_pulls_student_to_teacher(digits):
    torch.manual_seed(0)
    teacher, student = build_mlp(64, 16, 1, 10), build_mlp(64, 16, 1, 10)
    x = digits.val.x

    def kl():
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1),
                                  reduction="batchmean", log_target=True))  # fmt: skip

    before = kl()
    finetune(student, digits, Recipe(epochs=3, lr=0.05), seed=0, teacher=teacher, temperature=2.0)
    assert kl() < 0.5 * before


def test_progress_is_line_based_off_a_tty():
    stream = io.StringIO()
    p = Progress(3, "member 1/2", every_s=0.0, stream=stream)
    for e in (1, 2, 3):
        p.update(e, loss=0.5)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "[fusebench] member 1/2: epoch 3/3 loss=0.5000" and len(lines) == 3


def test_macs_params_latency():
    model = build_mlp(64, 16, 1, 10)
    macs, params = macs_and_params(model, torch.randn(1, 1, 8, 8))
    assert params == 64 * 16 + 16 + 16 * 10 + 10
    assert macs >= 64 * 16 + 16 * 10
    assert latency_ms(model, torch.randn(32, 1, 8, 8), repeats=3, warmup=1) > 0
