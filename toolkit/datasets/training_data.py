"""The images a study trains on, as the engine reads them: one ``ImageData`` for any registered dataset,
and its labeled / validation / pool split.

Two kinds of data, two kinds of split (``Split.kind``):

* a *benchmark* (MNIST, Fashion-MNIST, KMNIST, CIFAR-10) is fully labeled: the split draws
  ``split.labels_per_class`` labeled images per class by ``split.seed``, a validation set, and
  hides the rest of the labels in the pool (read only for diagnostics);
* a *real* dataset (``folder``, ``npz``) has only its owner's labels: the labeled set is every
  labeled image, the pool every unlabeled one (its labels are -1: none exist), and no image is
  held out for validation, so validation figures are the labeled images' own (in-sample,
  named so) and the honest estimate comes from cross-validation inside the labels.

Images are uint8 (N, C, S, S); the first ``n_labeled`` training images of a real dataset are
its labeled ones, in the order of their files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from toolkit.datasets.cache import memory_budget
from toolkit.datasets.checks import DataError
from toolkit.datasets.streamed import StreamedImages
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec

UNKNOWN = -1  # the label of an image nobody labeled


@dataclass(frozen=True)
class ImageData:
    """Training and test images of one dataset, its spec and class names."""

    train_images: torch.Tensor | StreamedImages  # uint8 (N, C, S, S); streamed when larger than the memory set aside
    train_labels: torch.Tensor  # int64 (N,); UNKNOWN where no label exists
    test_images: torch.Tensor   # uint8 (M, C, S, S); M = 0 without a test set
    test_labels: torch.Tensor   # int64 (M,)
    spec: ImageSpec = MNIST_SPEC
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))
    kind: str = "benchmark"     # "benchmark" | "real"
    name: str = "mnist"
    train_files: tuple[str, ...] | None = None  # a folder's relative paths, row i = file i

    def to(self, device: torch.device | str) -> "ImageData":
        moved = (t.to(device) for t in (self.train_images, self.train_labels, self.test_images, self.test_labels))
        return replace(self, **dict(zip(("train_images", "train_labels", "test_images", "test_labels"), moved)))

    @property
    def has_test(self) -> bool:
        return len(self.test_labels) > 0


def _tensor(a: np.ndarray | None, shape: tuple[int, ...], dtype=torch.uint8) -> torch.Tensor:
    if a is None:
        return torch.zeros(shape, dtype=dtype)
    # a copy: the cache hands out read-only memory maps, and torch wants to own what it may write
    return torch.from_numpy(np.array(a, copy=True)).to(dtype)


def load_image_data(data, root: str = "", download: bool = False, resident_bytes: int = 0) -> ImageData:
    """``data`` (a ``DataConfig``) read from ``root``: MNIST at its own size through its checked reader
    (the same tensors as ever), every other dataset through the registry and its uint8 cache.

    Training images larger than ``resident_bytes`` (0: half the free memory, ``cache.memory_budget``)
    stay in the cache's memory maps as ``StreamedImages``, read a batch at a time."""
    if data.name == "mnist" and data.image_size in (0, 28) and data.channels in (0, 1):
        from toolkit.datasets.mnist import load_mnist

        m = load_mnist(root, download, data.train_subset, data.test_subset)
        return ImageData(m.train_images.unsqueeze(1), m.train_labels, m.test_images.unsqueeze(1), m.test_labels)

    from toolkit.datasets.registry import load_dataset

    ds = load_dataset(data.name, root, data.image_size or None, data.channels or None, download)
    info = ds.info
    spec = ImageSpec(info.channels, info.image_size, info.num_classes, tuple(info.mean), tuple(info.std))
    c, s = info.channels, info.image_size
    if info.kind == "benchmark":
        n = data.train_subset or len(ds.labeled)
        m = data.test_subset or (len(ds.test) if ds.test is not None else 0)
        parts = [ds.labeled[:n]]
        labels = _tensor(ds.labels[:n], (0,), torch.int64)
        files = None
    else:
        known = ds.labels if ds.labels is not None else np.full(len(ds.labeled), UNKNOWN, dtype=np.int64)
        parts = [ds.labeled, ds.unlabeled]
        labels = torch.cat([_tensor(known, (0,), torch.int64),
                            torch.full((len(ds.unlabeled),), UNKNOWN, dtype=torch.int64)])
        m = data.test_subset or (len(ds.test) if ds.test is not None else 0)
        files = None
        if ds.labeled_files is not None:  # a folder's paths below its root, an npz's "images[i]" / "unlabeled[i]"
            files = tuple(ds.labeled_files) + tuple(ds.unlabeled_files or ())
    nbytes = sum(int(p.nbytes) for p in parts)
    if nbytes > (resident_bytes or memory_budget("cpu")):
        train = StreamedImages(parts)  # read a batch at a time from the cache: never whole in memory
    else:
        train = torch.cat([_tensor(p, (0, c, s, s)) for p in parts])
    test = _tensor(ds.test[:m] if ds.test is not None else None, (0, c, s, s))
    test_labels = _tensor(ds.test_labels[:m] if ds.test_labels is not None else None, (0,), torch.int64)
    return ImageData(train, labels.contiguous(), test.contiguous(), test_labels.contiguous(), spec,
                     tuple(info.class_names), info.kind, data.name, files)


def real_split(labels: torch.Tensor, labels_per_class: int, num_classes: int, class_names: tuple[str, ...]):
    """A real dataset's split: every labeled image is labeled, every other one is in the pool, and the
    validation set is the labeled set itself (in-sample: no label is spared to hold out)."""
    from toolkit.datasets.mnist import Split

    labels = labels.cpu()
    labeled = (labels != UNKNOWN).nonzero().flatten()
    pool = (labels == UNKNOWN).nonzero().flatten()
    counts = torch.bincount(labels[labeled], minlength=num_classes)
    for c in range(num_classes):
        if int(counts[c]) < labels_per_class:
            raise DataError(f"class {class_names[c]!r} has {int(counts[c])} labeled images, fewer than "
                            f"split.labels_per_class={labels_per_class} (lower it, or label more)")
    if len(pool) == 0:
        raise DataError("the dataset has no unlabeled images: put some in unlabeled/ (they are what gets labeled)")
    return Split(labeled, labeled.clone(), pool, 0, labels_per_class, kind="real")
