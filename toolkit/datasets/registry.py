"""The dataset registry: ``load_dataset(name, root, ...)`` gives any registered dataset as one ``Dataset`` value.

Registered: ``mnist``, ``fashion_mnist``, ``kmnist`` (idx files, torchvision's ``<Name>/raw``
layout), ``cifar10`` (``cifar-10-batches-py``), and a user's own data: ``folder`` (see
``folder.py``) and ``npz`` (an ``.npz`` file or a folder of ``.npy`` files, see ``arrays.py``).

Every dataset arrives the same way: uint8 images (N, C, S, S), int64 labels, and a
``DatasetInfo`` saying its channels, size, classes, normalisation and kind. A *benchmark*
is fully labeled (its training images are all in ``labeled``; a split draws from them); a
*real* dataset has only the labels its owner gave (``labels`` is None when there are none).
``image_size`` / ``channels`` default to the data's own; other values are converted once
into the uint8 cache (``cache.py``), as is every folder of image files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.datasets import cache, cifar
from toolkit.datasets.arrays import read_arrays
from toolkit.datasets.checks import DataError, check_target
from toolkit.datasets.convert import ChannelStats, array_to_chw
from toolkit.datasets.folder import read_folder
from toolkit.datasets.idx import read_idx

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_STATS_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the toolkit needs to know about a dataset, with no pixels."""

    name: str
    channels: int
    image_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, pixels in [0, 1], from the training images (labeled + unlabeled)
    std: tuple[float, ...]
    flips_allowed: bool  # whether a horizontal flip keeps every class (not for digits or characters)
    kind: str  # "benchmark" (fully labeled) or "real" (only the owner's labels exist)
    digest: str  # names the source files and the conversion: equal digests, equal arrays

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare ``info`` (its digest) instead
class Dataset:
    """Images as uint8 (N, C, S, S) arrays (memory maps where cached, read-only), labels as int64 (N,)."""

    info: DatasetInfo
    labeled: np.ndarray
    labels: np.ndarray | None  # None: no label is known (a real dataset without labels)
    unlabeled: np.ndarray  # (0, C, S, S) for a benchmark: its pool is drawn from ``labeled``
    test: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    labeled_files: tuple[str, ...] | None = None  # relative paths, for a folder: row i is file i
    unlabeled_files: tuple[str, ...] | None = None
    test_files: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _Benchmark:
    subdir: str  # under run.data_root, torchvision's layout
    torchvision_class: str
    class_names: tuple[str, ...] | None  # None: read from the data (CIFAR's batches.meta)
    flips_allowed: bool


_DIGITS = tuple(str(i) for i in range(10))
BENCHMARKS = {
    "mnist": _Benchmark("MNIST/raw", "MNIST", _DIGITS, False),
    # torchvision's first name is "T-shirt/top": a '/' is no file or metric name
    "fashion_mnist": _Benchmark("FashionMNIST/raw", "FashionMNIST", ("T-shirt_top", "Trouser", "Pullover", "Dress",
                                "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), True),
    "kmnist": _Benchmark("KMNIST/raw", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), False),
    "cifar10": _Benchmark(cifar.FOLDER, "CIFAR10", None, True),
}


def resolve_root(root: str | os.PathLike = "") -> Path:
    """``root``, else ``$TOOLKIT_DATA_DIR``, else ``./data`` (``toolkit.datasets.mnist.resolve_root``, the one rule)."""
    from toolkit.datasets.mnist import resolve_root as data_root  # here: toolkit.datasets.mnist imports this package's idx reader

    return data_root(str(root))


def _file_stats(folder: Path, names: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for name in names:
        p = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _download(name: str, base: Path) -> None:
    """Fetch a benchmark with torchvision's own downloader (needs internet; never called by the tests)."""
    import torchvision

    cls = getattr(torchvision.datasets, BENCHMARKS[name].torchvision_class)
    for train in (True, False):
        cls(root=str(base), train=train, download=True)


def _missing(name: str, base: Path) -> bool:
    folder = base / BENCHMARKS[name].subdir
    if name == "cifar10":
        return not all((folder / f).is_file() for f in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH, cifar.META))
    return not all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _IDX_FILES)


def _read_benchmark(name: str, base: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], tuple]:
    """({"labeled", "labels", "test", "test_labels"}, class names, file stats) of a benchmark's files."""
    spec = BENCHMARKS[name]
    folder = base / spec.subdir
    if name == "cifar10":
        x, y, tx, ty, names = cifar.read_cifar10(folder)
        files = (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH, cifar.META)
        return {"labeled": x, "labels": y, "test": tx, "test_labels": ty}, names, _file_stats(folder, files)
    what = spec.torchvision_class
    x, tx = (read_idx(folder / f, 3, what) for f in _IDX_FILES[0::2])
    y, ty = (read_idx(folder / f, 1, what).astype(np.int64) for f in _IDX_FILES[1::2])
    for images, labels, f in ((x, y, _IDX_FILES[1]), (tx, ty, _IDX_FILES[3])):
        if len(images) != len(labels):
            raise DataError(f"{what} files disagree: {folder / f} holds {len(labels)} labels for {len(images)} images")
        if len(labels) and labels.max() >= len(spec.class_names):
            raise DataError(f"{what} labels corrupt in {folder / f}: label {labels.max()} for "
                            f"{len(spec.class_names)} classes")
    parts = {"labeled": x[:, None], "labels": y, "test": tx[:, None], "test_labels": ty}
    return parts, spec.class_names, _file_stats(folder, _IDX_FILES)


def _stats(images: list[np.ndarray], channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    stats = ChannelStats(channels)
    for a in images:
        for _, chunk in cache.iter_chunks(a, _STATS_CHUNK_BYTES):
            stats.add(chunk)
    return stats.mean_std()


def _converted(parts: dict[str, np.ndarray], digest: str, target: tuple[int, int], cache_dir: Path) -> tuple:
    """``parts`` as uint8 (N, channels, size, size) memory maps of the cache (built on the first call), and meta."""
    size, channels = target
    key = cache.cache_key(digest, size, channels)
    found = cache.open_cached(cache_dir, key)
    if found is None:
        stats = ChannelStats(channels)
        with cache.CacheWriter(cache_dir, key) as writer:
            for part, images in parts.items():
                out = writer.array(part, (len(images), channels, size, size))
                for start, chunk in cache.iter_chunks(images, max(_STATS_CHUNK_BYTES, images[:1].nbytes)):
                    for i, image in enumerate(chunk):
                        out[start + i] = array_to_chw(image, size, channels)
                    if part != "test":
                        stats.add(out[start: start + len(chunk)])
            mean, std = stats.mean_std()
            writer.commit({"mean": mean, "std": std})
        found = cache.open_cached(cache_dir, key)
        if found is None:
            raise DataError(f"the image cache in {cache_dir} could not be read back after writing it")
    return found[0], found[1], key


def _from_arrays(source: dict, target: tuple[int | None, int | None], cache_dir: Path) -> tuple:
    """``(arrays, mean, std, digest)``: ``source``'s images at the target size and channels (converted
    through the cache where they differ)."""
    parts = {p: source[p] for p in ("labeled", "unlabeled", "test") if source.get(p) is not None}
    c, h, w = parts["labeled"].shape[1:]
    size, channels = target[0] or min(h, w), target[1] or c
    if (c, h, w) == (channels, size, size):
        train = [parts["labeled"], *([parts["unlabeled"]] if "unlabeled" in parts else [])]
        if not any(isinstance(a, np.memmap) for a in train):
            mean, std = _stats(train, channels)
            return parts, mean, std, cache.cache_key(source["digest"], size, channels)
        # memory-mapped (a folder of .npy files): read the statistics once, not on every load
        key = cache.cache_key(source["digest"], size, channels)
        note = cache.read_note(cache_dir, f"stats-{key}")
        if note is None:
            note = dict(zip(("mean", "std"), _stats(train, channels)))
            cache.write_note(cache_dir, f"stats-{key}", note)
        return parts, tuple(note["mean"]), tuple(note["std"]), key
    arrays, meta, key = _converted(parts, source["digest"], (size, channels), cache_dir)
    return arrays, tuple(meta["mean"]), tuple(meta["std"]), key


def _load_benchmark(name: str, root: Path, target: tuple, download: bool, cache_dir: Path) -> Dataset:
    base = resolve_root(root)
    if download and _missing(name, base):
        _download(name, base)
    source, class_names, files = _read_benchmark(name, base)
    source["digest"] = cache.source_digest(name, files)
    arrays, mean, std, digest = _from_arrays(source, target, cache_dir)
    labeled = arrays["labeled"]
    info = DatasetInfo(name, labeled.shape[1], labeled.shape[2], class_names, mean, std,
                       BENCHMARKS[name].flips_allowed, "benchmark", digest)
    return Dataset(info, labeled, source["labels"], labeled[:0], arrays["test"], source["test_labels"])


def _own_root(root: str | os.PathLike, name: str) -> Path:
    if not str(root):
        what = "image folder" if name == "folder" else ".npz file or .npy folder"
        raise DataError(f"data.name={name} needs run.data_root: the path of your {what}")
    return Path(root).expanduser().resolve()


def _load_folder(name: str, root: Path, target: tuple, download: bool, cache_dir: Path) -> Dataset:
    data = read_folder(_own_root(root, name), target[0], target[1], cache_dir)
    listing, images = data.listing, data.images
    info = DatasetInfo("folder", data.channels, data.image_size, listing.class_names, data.mean, data.std,
                       False, "real", data.digest)
    empty = images["labeled"][:0]
    return Dataset(info, images["labeled"], listing.labels["labeled"], images.get("unlabeled", empty),
                   images.get("test"), listing.labels.get("test"), listing.files["labeled"],
                   listing.files.get("unlabeled", ()), listing.files.get("test"))


def _load_npz(name: str, root: Path, target: tuple, download: bool, cache_dir: Path) -> Dataset:
    src = read_arrays(_own_root(root, name))
    source = {"labeled": src.labeled, "unlabeled": src.unlabeled, "test": src.test,
              "digest": cache.source_digest("npz", src.stats)}
    arrays, mean, std, digest = _from_arrays(source, target, cache_dir)
    labeled = arrays["labeled"]
    info = DatasetInfo("npz", labeled.shape[1], labeled.shape[2], src.class_names, mean, std, False, "real", digest)
    return Dataset(info, labeled, src.labels, arrays["unlabeled"], arrays.get("test"), src.test_labels,
                   src.labeled_names, src.unlabeled_names)


def _benchmark_loader(name: str) -> Callable[..., Dataset]:
    return lambda _name, root, target, download, cache_dir: _load_benchmark(name, root, target, download, cache_dir)


LOADERS: dict[str, Callable[..., Dataset]] = {
    **{name: _benchmark_loader(name) for name in BENCHMARKS},
    "folder": _load_folder,
    "npz": _load_npz,
}


def load_dataset(name: str, root: str | os.PathLike = "", image_size: int | None = None, channels: int | None = None,
                 download: bool = False, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """The registered dataset ``name`` read from ``root``, at ``image_size`` and ``channels`` (default: the data's).

    ``download`` fetches a missing benchmark with torchvision (internet needed); ``cache_dir``
    holds decoded images (default ``cache.default_cache_dir()``).
    """
    if name not in LOADERS:
        raise DataError(f"data.name={name!r} is not a registered dataset: choose one of {', '.join(LOADERS)}")
    check_target(image_size, channels)
    where = Path(cache_dir).expanduser().resolve() if cache_dir else cache.default_cache_dir()
    return LOADERS[name](name, root, (image_size, channels), download, where)


def check_labels_per_class(dataset: Dataset, labels_per_class: int) -> None:
    """Raise DataError unless every class has at least ``labels_per_class`` labeled images (naming the class)."""
    names = dataset.info.class_names
    counts = np.bincount(dataset.labels, minlength=len(names)) if dataset.labels is not None else np.zeros(len(names))
    for index, count in enumerate(counts.tolist()):
        if count < labels_per_class:
            where = f" (labeled/{names[index]}/)" if dataset.info.name == "folder" else ""
            raise DataError(f"class {names[index]!r} has {count} labeled images{where}, fewer than "
                            f"split.labels_per_class={labels_per_class}")
