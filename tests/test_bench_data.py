"""Data: digits splits and device-resident batches; the real torchvision CIFAR-10 path on a tiny folder."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from bench.config import load_config, resolve
from bench.data import load_data
from bench.errors import ConfigError, FusebenchError


def _dcfg(*overrides):
    return load_config(None, list(overrides))["data"]


def test_digits_splits_are_fixed_disjoint_and_normalized():
    from sklearn.datasets import load_digits

    d = load_data(_dcfg(), torch.device("cpu"))
    assert (d.in_chans, d.num_classes, d.image_size, d.on_device) == (1, 10, 8, True)
    n_tr, n_val, n_te = len(d.train), len(d.val), len(d.test)
    assert n_tr + n_val + n_te == 1797 and n_val == round(0.1 * (n_tr + n_val))
    assert d.train.x.shape == (n_tr, 1, 8, 8)
    # Undo the normalization and find every image in sklearn's array: the splits partition the data set.
    raw = load_digits()
    x = torch.cat([d.train.x, d.val.x, d.test.x])
    mean, std = raw.images.mean() / 16, (raw.images / 16).std(ddof=1)
    back = np.rint((x.squeeze(1).numpy() * std + mean) * 16).astype(int).reshape(len(x), -1)
    y = torch.cat([d.train.y, d.val.y, d.test.y]).numpy()
    order = np.lexsort(back.T[::-1])
    ref = raw.images.reshape(1797, -1).astype(int)
    ref_order = np.lexsort(ref.T[::-1])
    assert np.array_equal(back[order], ref[ref_order])
    assert sorted(y.tolist()) == sorted(raw.target.tolist())
    assert abs(float(d.train.x.mean())) < 0.1 and abs(float(d.train.x.std()) - 1) < 0.1
    again = load_data(_dcfg(), torch.device("cpu"))
    assert torch.equal(again.val.x, d.val.x)  # fixed seed


def test_device_tensors_and_dataloader_give_the_same_batches():
    fast = load_data(_dcfg("data.on_device=true"), torch.device("cpu"))
    slow = load_data(_dcfg("data.on_device=false"), torch.device("cpu"))
    assert fast.on_device and not slow.on_device
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for (xa, ya), (xb, yb) in zip(
        fast.train.batches(64, shuffle=True, generator=g1), slow.train.batches(64, shuffle=True, generator=g2)
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    resized = load_data(_dcfg("data.image_size=16"), torch.device("cpu"))
    assert resized.train.x.shape[1:] == (1, 16, 16) and resized.image_size == 16


def _write_cifar(root, n_per_batch=6, n_test=5):
    """A CIFAR-10 folder in the real format (pickled dicts of uint8 rows), with known pixels and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def test_cifar10_real_loading_path(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    written = _write_cifar(tmp_path)
    # Bypass only the md5 checks against the real files (data batches and batches.meta).
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)
    d = load_data(
        _dcfg("data.name=cifar10", f"data.root={tmp_path}", "data.val_fraction=0.2"), torch.device("cpu")
    )
    assert (d.in_chans, d.num_classes, d.image_size) == (3, 10, 32)
    assert len(d.train) + len(d.val) == 30 and len(d.val) == 6 and len(d.test) == 5
    # Test split: image 0 recomputed from the pickled row (CHW uint8) and CIFAR-10's normalization.
    row, labels = written["test_batch"]
    img = torch.from_numpy(row[0].reshape(3, 32, 32).astype(np.float32) / 255)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(d.test.x[0], (img - mean) / std, atol=1e-5)
    assert d.test.y.tolist() == labels
    all_train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert sorted(torch.cat([d.train.y, d.val.y]).tolist()) == sorted(all_train_labels)
    small = load_data(
        _dcfg("data.name=cifar10", f"data.root={tmp_path}", "data.image_size=8"), torch.device("cpu")
    )
    assert small.test.x.shape == (5, 3, 8, 8)


def test_missing_and_unknown_data_sets(tmp_path):
    with pytest.raises(FusebenchError, match=r"data set 'cifar10' not found under .*data.download=true"):
        load_data(_dcfg("data.name=cifar10", f"data.root={tmp_path}"), torch.device("cpu"))
    with pytest.raises(FusebenchError, match=r"data set 'mnist' not found"):
        load_data(_dcfg("data.name=mnist", f"data.root={tmp_path}"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"unknown data set 'fashion-mnist'.*did you mean 'fashion_mnist'"):
        load_data(_dcfg("data.name=fashion-mnist"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"data.image_size: required"):
        load_data(_dcfg("data.name=imagefolder", f"data.root={tmp_path}"), torch.device("cpu"))


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    cfg = _dcfg(
        "data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=8", "data.val_fraction=0.2"
    )
    d = load_data(cfg, torch.device("cpu"))
    assert (d.in_chans, d.num_classes, d.image_size, d.on_device) == (3, 2, 8, False)
    assert (len(d.train), len(d.val), len(d.test)) == (8, 2, 4)
    x, y = next(d.test.batches(4))
    assert x.shape == (4, 3, 8, 8) and sorted(y.tolist()) == [0, 0, 1, 1]


def test_mnist1d_is_generated_offline_cached_and_deterministic(tmp_path):
    from bench.data import MNIST1D_SAMPLES

    dcfg = resolve({"data": {"name": "mnist1d", "root": str(tmp_path / "a")}})["data"]
    first = load_data(dcfg, torch.device("cpu"))
    assert first.dims == 1 and first.in_chans == 1 and first.image_size == 40 and first.num_classes == 10
    sizes = {k: len(getattr(first, k)) for k in ("train", "val", "test")}
    assert sizes["test"] >= 1000 and sum(sizes.values()) == MNIST1D_SAMPLES
    assert sizes == {"train": 7200, "val": 800, "test": 2000}
    assert first.train.x.shape == (7200, 1, 40) and first.test.y.unique().numel() == 10
    assert list((tmp_path / "a").glob("mnist1d-*.npz")), "generated once, cached under data.root"
    again = load_data(dcfg, torch.device("cpu"))  # from the cache
    fresh = load_data({**dcfg, "root": str(tmp_path / "b")}, torch.device("cpu"))  # generated again
    for other in (again, fresh):
        assert torch.equal(first.train.x, other.train.x) and torch.equal(first.test.y, other.test.y)
    # train/val/test do not overlap (no signal appears twice across splits)
    rows = {tuple(r.tolist()) for split in (first.train, first.val) for r in split.x[:, 0]}
    assert not any(tuple(r.tolist()) in rows for r in first.test.x[:200, 0])


def test_mnist1d_generation_leaves_global_random_state_alone(tmp_path):
    import random

    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    load_data(resolve({"data": {"name": "mnist1d", "root": str(tmp_path)}})["data"], torch.device("cpu"))
    assert (np.random.rand(), random.random()) == expected
