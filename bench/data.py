"""Data sets for experiments: train / val / test splits, held on the device when small.

Why tensors on the device: for small data sets (digits, CIFAR, MNIST) a per-sample DataLoader spends
far more time in Python than the model spends computing; slicing one pre-normalized tensor is ~free.
Larger data (big images, ImageFolder) goes through a DataLoader.
The validation split is carved from the training split with a fixed seed, so every member, every
method and every repeat sees the same split (the repeat seed only changes the members).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from bench.errors import ConfigError, FusebenchError

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "imagefolder")
SPLIT_SEED = 12345  # fixed: splits never depend on the repeat seed
DIGITS_TEST_FRACTION = 0.2
# Bytes of float32 data (all splits) we are willing to hold on the device when on_device is "auto".
AUTO_ON_DEVICE_BYTES = {"cpu": 1 << 30, "cuda": 2 << 30}
PREPROCESSING_VERSION = 1  # bump when preprocessing changes: it is part of the member cache key

# name -> (torchvision class, in_chans, num_classes, native size, mean, std)
_TV = {
    "cifar10": ("CIFAR10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("MNIST", 1, 10, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", 1, 10, 28, (0.2860,), (0.3530,)),
    "svhn": ("SVHN", 3, 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TensorSplit:
    """A split held as one normalized float tensor (on the device): batches are index slices."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.x.device)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                yield self.x[idx], self.y[idx]
        else:
            for i in range(0, n, batch_size):
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]


class LoaderSplit:
    """A split read sample by sample through a DataLoader, moved to the device per batch."""

    def __init__(self, dataset: Dataset, device: torch.device, num_workers: int = 0):
        self.dataset, self.device, self.num_workers = dataset, device, num_workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The order is drawn exactly as TensorSplit draws it, so a member trained through a DataLoader
        # sees the same batches as one trained from device-resident tensors (one cache entry serves both).
        order = torch.randperm(len(self), generator=generator).tolist() if shuffle else None
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=order,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        non_blocking = self.device.type == "cuda"
        for x, y in loader:
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)


@dataclass
class DataBundle:
    name: str
    in_chans: int
    num_classes: int
    image_size: int
    train: TensorSplit | LoaderSplit
    val: TensorSplit | LoaderSplit
    test: TensorSplit | LoaderSplit
    device: torch.device
    on_device: bool
    dims: int = 2  # spatial dimensions of one example: 2 for images, 1 for signals (mnist1d)

    def example_inputs(self, n: int = 2) -> torch.Tensor:
        """A batch of real training images (fusion traces with it; real data keeps BN stats sane)."""
        x, _ = next(self.train.batches(n))
        return x


class _NormalizedTensorDataset(Dataset):
    """Per-sample access to a float image tensor (the DataLoader path for tensor-native data sets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def check_name(name: str) -> None:
    if name not in DATASETS:
        from bench.validation import did_you_mean

        hint = did_you_mean(name, DATASETS, cutoff=0.4)
        raise ConfigError(f"data.name: unknown data set '{name}'{hint}; known: {', '.join(DATASETS)}")


def _split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, carved) index arrays: a fixed-seed random ``fraction`` of range(n) is carved out."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_carved = max(1, int(round(n * fraction)))
    return np.sort(perm[n_carved:]), np.sort(perm[:n_carved])


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [
        F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        for chunk in x.split(4096)
    ]
    return torch.cat(out)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, -1, *([1] * (x.dim() - 2)))  # per channel, for images and for 1-D signals
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: '{device}' is not a device (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusebenchError(f"device: '{device}' requested but CUDA is not available")
    return dev


def _want_on_device(on_device, n_values: int, device: torch.device) -> bool:
    if on_device == "auto":
        return n_values * 4 <= AUTO_ON_DEVICE_BYTES.get(device.type, 1 << 30)
    return bool(on_device)


def _from_arrays(name, xtr, ytr, xte, yte, mean, std, num_classes, dcfg, device, dims=2) -> DataBundle:
    """Build the bundle from full train / test tensors (N, C, H, W) in [0, 1] (float) and int labels
    (``dims=1``: signals (N, C, L))."""
    keep, carved = _split_indices(len(ytr), dcfg["val_fraction"], SPLIT_SEED)
    size = dcfg["image_size"] or xtr.shape[-1]
    n_values = (len(ytr) + len(yte)) * xtr.shape[1] * size**dims
    on_dev = _want_on_device(dcfg["on_device"], n_values, device)

    def prep(x):
        return _normalize(_resize(x.float(), dcfg["image_size"]), mean, std).contiguous()

    xtr, xte = prep(xtr), prep(xte)
    ytr, yte = ytr.long(), yte.long()
    keep_t, carved_t = torch.from_numpy(keep), torch.from_numpy(carved)
    parts = {
        "train": (xtr[keep_t], ytr[keep_t]),
        "val": (xtr[carved_t], ytr[carved_t]),
        "test": (xte, yte),
    }
    if on_dev:
        splits = {k: TensorSplit(x.to(device), y.to(device)) for k, (x, y) in parts.items()}
    else:
        splits = {k: LoaderSplit(_NormalizedTensorDataset(x, y), device) for k, (x, y) in parts.items()}
    return DataBundle(
        name, xtr.shape[1], num_classes, size, device=device, on_device=on_dev, dims=dims, **splits
    )


def _digits(dcfg: dict, device: torch.device) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    train_idx, test_idx = _split_indices(len(y), DIGITS_TEST_FRACTION, SPLIT_SEED + 1)
    xtr, ytr = x[train_idx], y[train_idx]
    # Fixed normalization constants, computed once on the full digits set (independent of the split).
    mean, std = (float(x.mean()),), (float(x.std()),)
    return _from_arrays("digits", xtr, ytr, x[test_idx], y[test_idx], mean, std, 10, dcfg, device)


# MNIST-1D (Greydanus & Kobak, ICML 2024): generated offline from the package's ten templates. 10,000
# samples instead of the package's 5,000, so that the test split (20 %) has 2,000 examples and one example
# is 0.05 points of accuracy; the generator's other settings are the package defaults.
MNIST1D_SAMPLES = 10_000
MNIST1D_SEED = 42


def _mnist1d_arrays(root: str) -> dict[str, np.ndarray]:
    """The generated arrays, cached as an .npz under ``root`` (generating takes seconds in pure Python)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise FusebenchError("data set 'mnist1d' needs the mnist1d package: pip install mnist1d") from None
    import random

    args = get_dataset_args()
    args.num_samples, args.seed = MNIST1D_SAMPLES, MNIST1D_SEED
    keys = sorted(k for k in vars(args) if k != "url")
    tag = hashlib.sha256(repr([(k, getattr(args, k)) for k in keys]).encode()).hexdigest()[:12]
    path = Path(os.path.expanduser(root)) / f"mnist1d-{tag}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is regenerated below
    # make_dataset seeds numpy's and random's global generators: keep the experiment's streams intact
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: concurrent workers never read a half-written file
    except OSError:
        pass  # a read-only data root: generate every time
    return arrays


def _mnist1d(dcfg: dict, device: torch.device) -> DataBundle:
    if dcfg["image_size"] is not None:
        raise ConfigError("data.image_size: mnist1d is a 1-D signal of 40 points; leave image_size null")
    a = _mnist1d_arrays(dcfg["root"])
    xtr = torch.from_numpy(a["x"].astype(np.float32)).unsqueeze(1)  # (N, 1, 40), already standardized
    xte = torch.from_numpy(a["x_test"].astype(np.float32)).unsqueeze(1)
    ytr = torch.from_numpy(a["y"].astype(np.int64))
    yte = torch.from_numpy(a["y_test"].astype(np.int64))
    bundle = _from_arrays("mnist1d", xtr, ytr, xte, yte, (0.0,), (1.0,), 10, dcfg, device, dims=1)
    return bundle


def _torchvision_raw(name: str, dcfg: dict):
    """Load the torchvision data set's raw arrays, turning "not there" into a clear error."""
    import torchvision.datasets as tvd

    cls_name = _TV[name][0]
    cls = getattr(tvd, cls_name)
    root = os.path.expanduser(dcfg["root"])
    download = dcfg["download"]
    try:
        if name == "svhn":
            tr = cls(root, split="train", download=download)
            te = cls(root, split="test", download=download)
        else:
            tr = cls(root, train=True, download=download)
            te = cls(root, train=False, download=download)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            hint = (
                "set data.download=true to download it, or point data.root at it"
                if not download
                else "the download did not produce a valid copy"
            )
            raise FusebenchError(f"data set '{name}' not found under {root}: {hint}") from None
        raise
    except OSError as exc:
        raise FusebenchError(f"data set '{name}' could not be read/downloaded under {root}: {exc}") from None
    return tr, te


def _tv_tensors(ds, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data
    data = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    if name in ("cifar10", "cifar100"):
        data = data.permute(0, 3, 1, 2)  # HWC -> CHW
    elif name in ("mnist", "fashion_mnist"):
        data = data.unsqueeze(1)
    # svhn is already (N, 3, 32, 32)
    labels = ds.labels if name == "svhn" else ds.targets
    return data.float().div_(255.0), torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _torchvision(name: str, dcfg: dict, device: torch.device) -> DataBundle:
    _, in_chans, num_classes, native, mean, std = _TV[name]
    tr, te = _torchvision_raw(name, dcfg)
    xtr, ytr = _tv_tensors(tr, name)
    xte, yte = _tv_tensors(te, name)
    return _from_arrays(name, xtr, ytr, xte, yte, mean, std, num_classes, dcfg, device)


def _imagefolder(dcfg: dict, device: torch.device) -> DataBundle:
    """``root/train`` + ``root/test`` (or ``root/val``) if present, else one folder split 80/20."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    size = dcfg["image_size"]
    if size is None:
        raise ConfigError("data.image_size: required for data.name=imagefolder (images are resized to it)")
    root = Path(os.path.expanduser(dcfg["root"]))
    if not root.is_dir():
        raise FusebenchError(f"data set 'imagefolder' not found: {root} is not a folder")
    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )

    def load(path: Path) -> ImageFolder:
        try:
            return ImageFolder(str(path), transform=tf, loader=_rgb)
        except (FileNotFoundError, OSError) as exc:
            raise FusebenchError(f"data set 'imagefolder' under {path}: {exc}") from None

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        full_train, test = load(root / "train"), load(test_dir)
        if full_train.classes != test.classes:
            raise FusebenchError(f"imagefolder {root}: train and {test_dir.name} have different classes")
        test_ds: Dataset = test
        n_classes = len(full_train.classes)
        train_ds: Dataset = full_train
    else:
        full = load(root)
        keep, carved = _split_indices(len(full), DIGITS_TEST_FRACTION, SPLIT_SEED + 1)
        train_ds, test_ds = Subset(full, keep.tolist()), Subset(full, carved.tolist())
        n_classes = len(full.classes)
    keep, carved = _split_indices(len(train_ds), dcfg["val_fraction"], SPLIT_SEED)  # type: ignore[arg-type]
    workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    splits = {
        "train": LoaderSplit(Subset(train_ds, keep.tolist()), device, workers),
        "val": LoaderSplit(Subset(train_ds, carved.tolist()), device, workers),
        "test": LoaderSplit(test_ds, device, workers),
    }
    return DataBundle("imagefolder", 3, n_classes, size, device=device, on_device=False, **splits)


def _rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def load_data(dcfg: dict, device: torch.device) -> DataBundle:
    """The data set named by the ``data`` section of the config, split and placed."""
    check_name(dcfg["name"])
    if dcfg["name"] == "digits":
        return _digits(dcfg, device)
    if dcfg["name"] == "mnist1d":
        return _mnist1d(dcfg, device)
    if dcfg["name"] == "imagefolder":
        return _imagefolder(dcfg, device)
    return _torchvision(dcfg["name"], dcfg, device)
