"""Read CIFAR-10's python batches (torchvision's ``cifar-10-batches-py``) without trusting the pickle.

The batches are pickles, and unpickling runs whatever callables the file names. The
unpickler here resolves only the names a pickled dict of numpy arrays needs (numpy's array
and dtype reconstruction, ``_codecs.encode`` for bytes in protocol 2); any other global is
refused with one line naming the file, before it is imported.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from toolkit.datasets.checks import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
_ROW = 3 * 32 * 32


def _numpy_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object for the numpy callables that rebuild an array, under numpy 1 and 2 names."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 moved numpy.core to numpy._core
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer  # protocol 5
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds builtin containers and numpy arrays and nothing else."""

    _allowed: dict[tuple[str, str], object] = {}

    def find_class(self, module: str, name: str) -> object:
        if not self._allowed:
            import _codecs

            type(self)._allowed = {**_numpy_globals(), ("_codecs", "encode"): _codecs.encode}
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")
        return found


def load_batch(path: Path) -> dict:
    """One pickled batch as a dict with str keys (Python 2's byte-string keys decoded as latin-1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path} (set run.data_root to the folder holding {FOLDER}/, "
                        "or run.download=true)")
    try:
        with path.open("rb") as f:
            # latin1: the batches were pickled by Python 2, whose str (array bytes included) must stay bytes-exact
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"CIFAR-10 file refused: {path}: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"CIFAR-10 file corrupt: {path} is not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR-10 file corrupt: {path} holds a {type(entry).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _images_and_labels(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = load_batch(path)
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10 file corrupt: {path} 'data' is {got}, expected uint8 (N, {_ROW})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"CIFAR-10 file corrupt: {path} 'labels' are not integers") from e
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR-10 file corrupt: {path} has {len(data)} images and labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"CIFAR-10 labels corrupt in {path}: labels span ({labels.min()}, {labels.max()}), "
                        f"expected 0..{num_classes - 1}")
    # rows are the red, green then blue planes of a 32x32 image, row-major: exactly (C, H, W)
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(train_images, train_labels, test_images, test_labels, class_names)`` from ``cifar-10-batches-py/``.

    Images are uint8 (N, 3, 32, 32), labels int64 (N,).
    """
    folder = Path(folder)
    meta = load_batch(folder / META)
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names) or len(names) < 2:
        raise DataError(f"CIFAR-10 file corrupt: {folder / META} lacks a list of 'label_names'")
    class_names = tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)
    parts = [_images_and_labels(folder / name, len(class_names)) for name in TRAIN_BATCHES]
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    test_x, test_y = _images_and_labels(folder / TEST_BATCH, len(class_names))
    return train_x, train_y, test_x, test_y, class_names
