"""Read a user's image folder into the uint8 cache, refusing bad input in one line that names the file.

The layout::

    <root>/labeled/<class name>/...   images, any depth below the class folder (required, >= 2 classes)
    <root>/unlabeled/...              images without labels, any depth (optional; not empty if present)
    <root>/test/<class name>/...      held-out images, only reported (optional; classes of labeled/ only)

Any format Pillow reads, any sizes, grayscale or colour (converted as ``convert.py`` says).
Names starting with ``.`` are skipped (``.DS_Store``, editors' files); anything else that is
not an image is an error. Files are sorted by relative path, classes by name (label = the
class's index), so the same folder gives the same arrays everywhere. Symbolic links are
followed; a link back to a folder above it is refused.

Defaults from the data: ``image_size`` is the most common shorter side, ``channels`` is 1
when every image's mode is grayscale (a palette image counts as colour), else 3.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.datasets import cache
from toolkit.datasets.checks import DataError, check_class_names
from toolkit.datasets.convert import GRAY_MODES, ChannelStats, image_to_chw

PARTS = ("labeled", "unlabeled", "test")


@dataclass(frozen=True)
class Listing:
    """What a folder holds, checked: relative paths per part, labels, and (path, size, mtime) for the digest."""

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, tuple[str, ...]]  # part -> relative paths (posix), sorted
    labels: dict[str, np.ndarray]  # "labeled" / "test" -> int64 class indices
    stats: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class FolderData:
    """The folder decoded: uint8 (N, C, S, S) arrays per part (memory maps of the cache) and its listing."""

    listing: Listing
    images: dict[str, np.ndarray]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    digest: str


def _walk(top: Path, root: Path) -> list[Path]:
    """Every non-hidden file below ``top``, following links but refusing a link back to a folder above it."""
    files: list[Path] = []
    chain = [top, *(p for p in top.parents if p == root or root in p.parents)]
    stack = [(top, frozenset(os.path.realpath(p) for p in chain))]
    while stack:
        folder, above = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DataError(f"cannot read folder {folder}: {e.strerror or e}") from e
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links; a self-referring link raises ELOOP
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror or e} (a symlink loop?)") from e
            if not is_dir:
                files.append(path)
                continue
            real = os.path.realpath(path)
            if real in above:
                raise DataError(f"symlink loop: {path} leads back to {real}, a folder above it; remove the link")
            stack.append((path, above | {real}))
    return sorted(files, key=lambda p: p.as_posix())


def _subfolders(top: Path, root: Path) -> list[str]:
    """Class folders of ``top``; a file directly in it is an error (it would have no class)."""
    names = []
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError as e:
            raise DataError(f"cannot read {entry.path}: {e.strerror or e} (a symlink loop?)") from e
        if not is_dir:
            rel = Path(entry.path).relative_to(root).as_posix()
            raise DataError(f"{root}: {rel} is directly in {top.name}/: put each image in {top.name}/<class name>/")
        names.append(entry.name)
    return names


def _stat(path: Path, root: Path) -> tuple[str, int, int]:
    rel = path.relative_to(root).as_posix()
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e} (a broken link or symlink loop?)") from e
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"not a regular file: {path}")
    if st.st_size == 0:
        raise DataError(f"empty image file (0 bytes): {path}")
    return rel, st.st_size, st.st_mtime_ns


def _class_files(top: Path, root: Path, names: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for index, name in enumerate(names):
        found = _walk(top / name, root)
        if not found:
            raise DataError(f"class {name!r} has no images: {top / name} is empty")
        files += found
        labels += [index] * len(found)
    return files, labels


def scan(root: Path) -> Listing:
    """Check ``root``'s layout, class names and files (not yet their pixels); its listing."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (set run.data_root to a folder holding labeled/<class name>/)")
    unexpected = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in PARTS)
    if unexpected:
        raise DataError(f"image folder {root} holds {unexpected[0]!r}: expected only labeled/, unlabeled/ and test/")
    if not (root / "labeled").is_dir():
        raise DataError(f"image folder {root} has no labeled/ folder: put images in labeled/<class name>/")
    class_names = _subfolders(root / "labeled", root)
    check_class_names(tuple(class_names), str(root / "labeled"))
    if len(class_names) < 2:
        found = f"one class ({class_names[0]!r})" if class_names else "no class folders"
        raise DataError(f"{root / 'labeled'} has {found}: a classifier needs at least two classes")
    found, local = _class_files(root / "labeled", root, class_names)
    paths, labels = {"labeled": found}, {"labeled": np.asarray(local, dtype=np.int64)}
    if (root / "unlabeled").is_dir():
        paths["unlabeled"] = _walk(root / "unlabeled", root)
        if not paths["unlabeled"]:
            raise DataError(f"{root / 'unlabeled'} is empty: put images there or remove the folder")
    if (root / "test").is_dir():
        test_names = _subfolders(root / "test", root)
        extra = [n for n in test_names if n not in class_names]
        if extra:
            raise DataError(f"{root / 'test'} has class {extra[0]!r}, which labeled/ lacks "
                            f"(labeled classes: {', '.join(class_names)})")
        found, local = _class_files(root / "test", root, test_names)
        if not found:
            raise DataError(f"{root / 'test'} is empty: put images in test/<class name>/ or remove the folder")
        paths["test"] = found
        labels["test"] = np.asarray([class_names.index(test_names[i]) for i in local], dtype=np.int64)
    stats = {part: [_stat(p, root) for p in ps] for part, ps in paths.items()}
    return Listing(root, tuple(class_names), {part: tuple(s[0] for s in st) for part, st in stats.items()},
                   labels, tuple(s for part in PARTS for s in stats.get(part, ())))


def _open_error(path: Path, e: BaseException) -> DataError:
    if isinstance(e, Image.UnidentifiedImageError):
        return DataError(f"not an image Pillow can read: {path}")
    lines = str(e).splitlines()
    reason = getattr(e, "strerror", None) or (lines[0] if lines else type(e).__name__)
    return DataError(f"cannot read image {path}: {reason}")


_STATS_CHUNK_BYTES = 16 << 20
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def inspect(listing: Listing) -> dict:
    """Open every image's header (no pixels): refuses non-images early; the defaults ``image_size``, ``channels``."""
    sides: Counter[int] = Counter()
    gray = True
    for part in PARTS:
        for rel in listing.files.get(part, ()):
            path = listing.root / rel
            try:
                with Image.open(path) as im:
                    (w, h), mode = im.size, im.mode
            except _DECODE_ERRORS as e:
                raise _open_error(path, e) from e
            if part != "test":
                sides[min(w, h)] += 1
            gray = gray and mode in GRAY_MODES
    most = max(sides.values())
    return {"image_size": max(s for s, n in sides.items() if n == most), "channels": 1 if gray else 3}


def decode_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file as uint8 (channels, image_size, image_size)."""
    try:
        with Image.open(path) as im:
            im.load()
            return image_to_chw(im, image_size, channels)
    except _DECODE_ERRORS as e:
        raise _open_error(path, e) from e


def _build(listing: Listing, key: str, target: tuple[int, int], cache_dir: Path) -> None:
    size, channels = target
    stats = ChannelStats(channels)
    with cache.CacheWriter(cache_dir, key) as writer:
        for part in PARTS:
            if part not in listing.files:
                continue
            rels = listing.files[part]
            out = writer.array(part, (len(rels), channels, size, size))
            for i, rel in enumerate(rels):
                out[i] = decode_image(listing.root / rel, size, channels)
            if part != "test":  # normalisation comes from the training images only
                for _, chunk in cache.iter_chunks(out, _STATS_CHUNK_BYTES):
                    stats.add(chunk)
        mean, std = stats.mean_std()
        writer.commit({"mean": mean, "std": std})


def read_folder(root: Path, image_size: int | None, channels: int | None, cache_dir: Path) -> FolderData:
    """The folder at ``root`` decoded once into ``cache_dir`` (reused while no file changes)."""
    listing = scan(root)
    digest = cache.source_digest("folder", listing.stats)
    inspected = False
    if image_size is None or channels is None:
        note_name = f"defaults-{digest[:32]}"
        defaults = cache.read_note(cache_dir, note_name)
        if defaults is None:
            defaults, inspected = inspect(listing), True
            cache.write_note(cache_dir, note_name, defaults)
        image_size = image_size or int(defaults["image_size"])
        channels = channels or int(defaults["channels"])
    key = cache.cache_key(digest, image_size, channels)
    found = cache.open_cached(cache_dir, key)
    if found is None:
        if not inspected:
            inspect(listing)  # a non-image fails here, before any pixel is decoded
        _build(listing, key, (image_size, channels), cache_dir)
        found = cache.open_cached(cache_dir, key)
        if found is None:
            raise DataError(f"the image cache in {cache_dir} could not be read back after writing it")
    arrays, meta = found
    return FolderData(listing, arrays, image_size, channels, tuple(meta["mean"]), tuple(meta["std"]), key)
