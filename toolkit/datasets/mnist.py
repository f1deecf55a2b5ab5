"""MNIST as tensors, and the labeled / validation / pool split.

MNIST is read once into uint8 tensors (N, 28, 28); everything downstream
indexes into them on the device. The idx files are checked before torchvision
touches them, because torchvision only asserts on a corrupt file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.datasets.checks import DataError  # noqa: F401 - one error class for every data file (toolkit.datasets.mnist.DataError)
from toolkit.datasets.idx import check_idx, header_shape, read_idx

NUM_CLASSES = 10
IMAGE_SIZE = 28

# file name -> expected shape (the idx magic number follows from it: unsigned bytes, len(shape) dims)
_FILES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}


def resolve_root(root: str = "") -> Path:
    """``run.data_root``, else ``$TOOLKIT_DATA_DIR``, else ``./data``; always absolute (Ray workers run elsewhere)."""
    return Path(root or os.environ.get("TOOLKIT_DATA_DIR") or "data").expanduser().resolve()


def check_idx_file(path: Path, shape: tuple[int, ...]) -> None:
    """Raise DataError unless ``path`` is an idx file of unsigned bytes with this shape (header and size only)."""
    # the declared shape first: a label file in the wrong place is named as such, not as truncated
    got = header_shape(path, len(shape), "MNIST") if path.is_file() else check_idx(path, len(shape), "MNIST")  # .gz
    if got != shape:
        raise DataError(f"MNIST file corrupt: {path} declares shape {got}, expected {shape}")
    check_idx(path, len(shape), "MNIST")


def _read_idx(path: Path) -> torch.Tensor:
    """One of MNIST's idx files (already checked) as a uint8 tensor of its declared shape."""
    return torch.from_numpy(read_idx(path, len(_FILES[path.name]), "MNIST"))


@dataclass(frozen=True)
class Mnist:
    """MNIST as uint8 images (N, 28, 28) and int64 labels (N,), train and test."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device: torch.device | str) -> "Mnist":
        return Mnist(*(t.to(device) for t in (self.train_images, self.train_labels, self.test_images, self.test_labels)))


def check_mnist(root: str = "", download: bool = False) -> Path:
    """``<root>/MNIST/raw`` after checking every file's header and size (downloading first if allowed).

    Cheap (headers and sizes only): the driver calls it before it starts Ray workers, so
    that a missing file is one line from the driver rather than a worker's traceback.
    """
    base = resolve_root(root)
    raw = base / "MNIST" / "raw"
    missing = [n for n in _FILES if not (raw / n).is_file()]
    if missing and download:
        import torchvision

        torchvision.datasets.MNIST(root=str(base), train=True, download=True)
        torchvision.datasets.MNIST(root=str(base), train=False, download=True)
    for name, shape in _FILES.items():
        check_idx_file(raw / name, shape)
    return raw


def load_mnist(root: str = "", download: bool = False, train_subset: int = 0, test_subset: int = 0) -> Mnist:
    """Load MNIST from ``<root>/MNIST/raw`` (torchvision's layout), checking every file first."""
    raw = check_mnist(root, download)

    # torchvision's layout, read directly: the files were just checked, and skipping the
    # torchvision import saves seconds in every Ray worker and inference actor
    tr_x, tr_y = _read_idx(raw / "train-images-idx3-ubyte"), _read_idx(raw / "train-labels-idx1-ubyte").long()
    te_x, te_y = _read_idx(raw / "t10k-images-idx3-ubyte"), _read_idx(raw / "t10k-labels-idx1-ubyte").long()
    for name, y in (("train-labels-idx1-ubyte", tr_y), ("t10k-labels-idx1-ubyte", te_y)):
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise DataError(f"MNIST labels corrupt in {raw / name}: labels span ({int(y.min())}, {int(y.max())}), expected 0..9")
    if train_subset:
        tr_x, tr_y = tr_x[:train_subset], tr_y[:train_subset]
    if test_subset:
        te_x, te_y = te_x[:test_subset], te_y[:test_subset]
    return Mnist(tr_x.contiguous(), tr_y.contiguous(), te_x.contiguous(), te_y.contiguous())


@dataclass(frozen=True)
class Split:
    """Indices into the training images: labeled, validation (model selection only) and the unlabeled pool."""

    labeled: torch.Tensor
    val: torch.Tensor
    pool: torch.Tensor
    seed: int
    labels_per_class: int
    # "benchmark": drawn from a fully labeled set by ``seed``; "real": the owner's labels, val = labeled (in-sample)
    kind: str = "benchmark"

    @property
    def val_is_labeled(self) -> bool:
        return self.kind == "real"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "labels_per_class": self.labels_per_class,
            "sizes": {"labeled": len(self.labeled), "val": len(self.val), "pool": len(self.pool)},
            "labeled": self.labeled.tolist(),
            "val": self.val.tolist(),
            "pool": self.pool.tolist(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict()))
        return p


def make_split(labels: torch.Tensor, labels_per_class: int, val_size: int, seed: int,
               num_classes: int = NUM_CLASSES) -> Split:
    """Stratified labeled set (``labels_per_class`` per class), random validation set, rest = pool.

    Depends only on (labels, labels_per_class, val_size, seed): the same seed gives the
    same 100 images on every machine and every worker.
    """
    from toolkit.config import ConfigError

    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    labeled = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < labels_per_class:
            raise ConfigError(
                f"split.labels_per_class={labels_per_class} is not allowed: class {c} has only {len(idx)} training images"
            )
        labeled.append(idx[torch.randperm(len(idx), generator=g)[:labels_per_class]])
    labeled_idx = torch.cat(labeled).sort().values
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[labeled_idx] = False
    rest_idx = rest.nonzero().flatten()
    if val_size >= len(rest_idx):
        raise ConfigError(
            f"split.val_size={val_size} is not allowed: only {len(rest_idx)} images are left after the labeled set"
        )
    perm = rest_idx[torch.randperm(len(rest_idx), generator=g)]
    val_idx = perm[:val_size].sort().values
    pool_idx = perm[val_size:].sort().values
    return Split(labeled_idx, val_idx, pool_idx, seed, labels_per_class)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, S, S) -> float (B, C, S, S) in [0, 1]; (B, S, S) is taken as one channel."""
    x = images_u8.unsqueeze(1) if images_u8.ndim == 3 else images_u8
    return x.float().div_(255.0)
