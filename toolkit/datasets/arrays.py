"""Read a user's images given as numpy arrays: one ``.npz`` file, or a folder of ``.npy`` files.

Keys (the ``.npz`` member names, or the ``.npy`` file stems):
- ``images``: (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3 (required);
- ``labels``: (N,) integers, ``-1`` where the label is unknown (optional: none known);
- ``unlabeled``: (M, ...) more images without labels (optional);
- ``test_images`` + ``test_labels``: held-out images, only reported (optional, together);
- ``class_names``: (K,) strings (optional: ``"0"`` .. ``"K-1"``, K = the largest label + 1).
Pixels: uint8 as they are; bool as 0/255; other integers must lie in 0..255; floats in [0, 1]
(scaled by 255 and rounded). Nothing is unpickled (``allow_pickle=False``). A folder of
``.npy`` files is memory-mapped, so uint8 arrays larger than RAM are read only where used
(keep unlabeled images in ``unlabeled`` then: splitting ``images`` by ``-1`` labels copies).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.datasets.checks import DataError, check_class_names

KEYS = ("images", "labels", "unlabeled", "test_images", "test_labels", "class_names")
_IMAGE_KEYS = ("images", "unlabeled", "test_images")


@dataclass(frozen=True)
class ArraySource:
    """Arrays as found, checked: uint8 (N, C, H, W) views per part, int64 labels, names, file stats."""

    labeled: np.ndarray
    labels: np.ndarray | None
    unlabeled: np.ndarray
    test: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    stats: tuple[tuple[str, int, int], ...]
    # where each row came from, as the user's arrays name it ("images[17]", "unlabeled[3]")
    labeled_names: tuple[str, ...] = ()
    unlabeled_names: tuple[str, ...] = ()


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__


def _load(root: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    if root.is_file():
        try:
            with np.load(root, allow_pickle=False) as npz:
                found = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"cannot read array file {root}: {_first_line(e)}"
                            " (expected an .npz written by numpy.savez without object arrays)") from e
        return found, [root]
    if not root.is_dir():
        raise DataError(f"array data not found: {root} (set run.data_root to an .npz file or a folder of .npy files)")
    files = sorted(root.glob("*.npy"))
    found = {}
    for f in files:
        try:
            found[f.stem] = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read array file {f}: {_first_line(e)}") from e
    return found, files


def as_nchw(a: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, C, H, W) for an image array of any accepted layout and pixel type."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] not in (1, 3) and a.shape[3] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1] not in (1, 3) or min(a.shape[2:]) < 1:
        raise DataError(f"{where} has shape {a.shape}: expected (N, H, W), (N, C, H, W) or (N, H, W, C), C = 1 or 3")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = a.min(), a.max()
    if np.issubdtype(a.dtype, np.integer) and 0 <= lo and hi <= 255:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating) and np.isfinite(lo) and np.isfinite(hi) and 0 <= lo and hi <= 1:
        return np.rint(a * 255.0).astype(np.uint8)
    raise DataError(f"{where} holds {a.dtype} pixels in [{lo}, {hi}]: expected uint8, integers in 0..255 "
                    "or floats in [0, 1]")


def _labels(a: np.ndarray, n: int, where: str, unknown_ok: bool) -> np.ndarray:
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{where} is {a.dtype} {a.shape}: expected {n} integer labels, one per image")
    a = np.asarray(a, dtype=np.int64)
    lowest = -1 if unknown_ok else 0
    if n and a.min() < lowest:
        raise DataError(f"{where} holds label {a.min()}: labels are class indices from 0"
                        + (" (-1: unknown)" if unknown_ok else ""))
    return a


def _class_names(found: dict, labels: list[np.ndarray], where: str) -> tuple[str, ...]:
    top = max((int(y.max()) for y in labels if y.size), default=-1)
    if "class_names" not in found:
        names = tuple(str(i) for i in range(top + 1))
    else:
        raw = found["class_names"]
        if raw.ndim != 1 or raw.dtype.kind not in "US":
            raise DataError(f"{where}: class_names is {raw.dtype} {raw.shape}: expected a 1-D array of strings")
        names = tuple(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in raw.tolist())
        if top >= len(names):
            raise DataError(f"{where}: label {top} has no class name (class_names holds {len(names)})")
    check_class_names(names, where)
    return names


def read_arrays(root: Path) -> ArraySource:
    """The arrays at ``root`` (an ``.npz`` file or a folder of ``.npy`` files), checked as this module says."""
    root = Path(root).expanduser().resolve()
    found, files = _load(root)
    unknown = sorted(set(found) - set(KEYS))
    if unknown:
        raise DataError(f"{root}: unknown array {unknown[0]!r}: expected only {', '.join(KEYS)}")
    if "images" not in found:
        raise DataError(f"{root} holds no 'images' array (keys: {', '.join(sorted(found)) or 'none'})")
    if ("test_images" in found) != ("test_labels" in found):
        raise DataError(f"{root}: test_images and test_labels come together (test images are only reported)")
    parts = {key: as_nchw(found[key], f"{root}: {key}") for key in _IMAGE_KEYS if key in found}
    shapes = {p.shape[1:] for p in parts.values()}
    if len(shapes) > 1:
        raise DataError(f"{root}: image arrays differ in (C, H, W): {sorted(shapes)}; give one shape")
    images = parts["images"]
    if len(images) == 0:
        raise DataError(f"{root}: 'images' is empty")
    labels = (_labels(found["labels"], len(images), f"{root}: labels", unknown_ok=True)
              if "labels" in found else np.full(len(images), -1, dtype=np.int64))
    test_labels = (_labels(found["test_labels"], len(parts["test_images"]), f"{root}: test_labels", unknown_ok=False)
                   if "test_images" in found else None)
    known = labels >= 0
    names = _class_names(found, [labels, *([test_labels] if test_labels is not None else [])], str(root))
    if known.any() and len(np.unique(labels[known])) < 2:
        raise DataError(f"{root}: the known labels name one class ({names[int(labels[known][0])]!r}): "
                        "a classifier needs at least two")
    # views where possible: a memory-mapped array stays on disk
    if known.all():
        labeled, unlabeled_here = images, images[:0]
    elif not known.any():
        labeled, unlabeled_here = images[:0], images
    else:
        labeled, unlabeled_here = images[known], images[~known]
    unlabeled = parts.get("unlabeled")
    unlabeled = unlabeled_here if unlabeled is None else (
        unlabeled if len(unlabeled_here) == 0 else np.concatenate([unlabeled_here, unlabeled]))
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    extra = len(parts["unlabeled"]) if "unlabeled" in parts else 0
    row_names = (tuple(f"images[{i}]" for i in np.flatnonzero(known)),
                 tuple(f"images[{i}]" for i in np.flatnonzero(~known)) + tuple(f"unlabeled[{i}]" for i in range(extra)))
    return ArraySource(labeled, labels[known] if known.any() else None, unlabeled, parts.get("test_images"),
                       test_labels, names, stats, *row_names)
