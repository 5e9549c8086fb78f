"""Shared fixtures. Keep this small: per-package fixtures live in the test modules."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist every worker is one process per core: one torch thread each, or they
    oversubscribe the cores (the children they start inherit the setting through the environment).

    Verified traces are not kept on disk during the tests (``FUSION_TRACE_CACHE=off``, inherited by the
    commands the tests start): a test that expects the tracer to refuse or to trace must not meet a trace
    another test or an earlier session stored. The trace cache's own tests turn it on in a temporary folder."""
    os.environ["FUSION_TRACE_CACHE"] = "off"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Run torch on one thread: on a shared 2-core machine two threads per process oversubscribe the
    cores and tiny models get many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One sqlite tracking store for the session (creating one costs seconds), artifacts under tmp."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment("fusebench-tests", artifact_location=(root / "artifacts").as_uri())
    return uri


# ---------------------------------------------------------------------------- fusion test members
# the fusion core's architectures: the small ones are tested with 2 and 3 members, the big ones with 2
FUSION_SMALL = [
    "mlp",
    "grouped",
    "resnet18",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "regnety_002",
    "convnext_atto",
]
FUSION_BIG = ["vgg11", "vgg11_bn", "resnet50", "densenet121"]


def _randomize_fusion_member(model, generator) -> None:
    """Give every per-channel tensor a random, member-specific value.

    Freshly built timm models have trivial BatchNorm statistics (mean 0, var 1, weight 1, bias 0), zero
    biases and zero- or tiny-initialised residual scales (ConvNeXt's layer scale); with those, a fusion that
    gathers a normalization tensor from the wrong channel or member would still give the right outputs.
    """
    import torch

    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
            elif leaf == "running_mean" or leaf == "bias":
                t.copy_(torch.randn(t.shape, generator=generator) * 0.1)
            elif t.dim() == 1:  # norm weights, layer scales
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
            elif float(t.std()) == 0.0:  # any other zero- or constant-initialised tensor
                t.copy_(torch.randn(t.shape, generator=generator) * 0.1)


def make_fusion_member(arch: str, seed: int, randomize: bool = True):
    """One member for the fusion tests: ``arch`` is "mlp", "grouped" (a hand-built CNN with grouped,
    depthwise and channel-multiplier convolutions) or a timm name (``num_classes=10``). Eval mode.
    ``randomize=False`` skips all initialisation (for skeletons built on the meta device)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    if arch == "mlp":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)
        )
    elif arch == "grouped":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=4),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
            nn.ReLU(),  # depthwise
            nn.Conv2d(16, 32, 3, padding=1, groups=16),
            nn.ReLU(),  # channel multiplier 2
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )
    else:
        import timm

        model = timm.create_model(arch, num_classes=10)
    if not randomize:
        return model.eval()
    if arch in ("mlp", "grouped"):
        # PyTorch's default init shrinks activations layer after layer until the output is mostly bias
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    _randomize_fusion_member(model, torch.Generator().manual_seed(1000 + seed))
    return model.eval()


def fusion_example_input(arch: str, batch: int = 2, seed: int = 0):
    """A batch for ``make_fusion_member(arch, ...)``: 64 features for the MLP, 3x32x32 images otherwise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        return torch.randn(batch, 64, generator=gen)
    side = 16 if arch == "grouped" else 32
    return torch.randn(batch, 3, side, side, generator=gen)


@pytest.fixture(scope="session")
def fusion_zoo():
    """The fusion tests' member factory: ``fusion_zoo.member(arch, seed)``, ``fusion_zoo.example(arch)``."""
    from types import SimpleNamespace

    return SimpleNamespace(member=make_fusion_member, example=fusion_example_input)


def chromium_or_skip() -> str:
    """The headless browser of the rendering tests; CI installs it, so there its absence is a failure."""
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed but CI=true: .ci/run must apt-get install chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium); the browser tests need it")
    return exe


def model_out(model, x):
    """The model's output on ``x`` in eval mode, without autograd."""
    import torch

    with torch.no_grad():
        return model.eval()(x)


def rel_err(a, b) -> float:
    """The largest absolute difference of ``a`` from the reference ``b``, relative to ``b``'s largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def permuted_keeps_function(make, model, graph, x, seed: int = 1) -> None:
    """Oracle: ``model`` with every traced group permuted at random, loaded into a fresh ``make()``, computes the
    same function (persistent tensors only: the assembled state also holds non-persistent buffers)."""
    import torch

    from fusion.state import full_state

    state = graph.assemble([full_state(model)], graph.random_permutation(torch.Generator().manual_seed(seed)))
    permuted = make()
    permuted.load_state_dict({k: state[k] for k in permuted.state_dict()}, strict=True)
    assert rel_err(model_out(permuted, x), model_out(model, x)) < 1e-5


def claims(graph, tensor: str, dim: int):
    """How many times each position of a tensor dimension is claimed by the graph's slots."""
    import torch

    pos = torch.cat([graph._slot(r).positions.reshape(-1) for r in graph.tensor_dims[tensor][dim]])
    return torch.bincount(pos[pos >= 0], minlength=graph.shapes[tensor][dim])
