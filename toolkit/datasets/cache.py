"""The uint8 image cache: decode once into memory-mapped ``.npy`` files, read back whole or in chunks.

An entry is a folder ``<cache_dir>/<key>/`` holding one ``<part>.npy`` per image array
(uint8 (N, C, H, W)) and ``meta.json``. The key is a digest of the source files' relative
paths, sizes and modification times plus the target size and channels, so a changed,
added or removed file, or another target, makes a new entry; the same files give the same
key wherever the folder lives. An entry is written in a temporary folder and renamed into
place: a crash or a bad file leaves nothing half-written, and two processes building the
same entry at once both end with one complete copy.

Where the limit is: images stay resident (on the GPU, or in RAM on CPU) while they take at
most ``DEVICE_FRACTION`` of the memory free there (``memory_budget``); beyond that they are
streamed from the memory map in chunks of at most ``max_bytes`` (``iter_chunks``), so a
folder of 1,000,000 64x64 colour images (12 GB) never needs more than one chunk in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

FORMAT_VERSION = 1  # bump when the conversion (convert.py) changes what bytes a source gives
DEVICE_FRACTION = 0.5
_META = "meta.json"


def default_cache_dir() -> Path:
    """``$TOOLKIT_CACHE_DIR``, else ``~/.cache/toolkit/datasets`` (absolute)."""
    env = os.environ.get("TOOLKIT_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "toolkit" / "datasets"


def source_digest(kind: str, entries: Iterable[tuple[str, int, int]]) -> str:
    """A digest of a source: its reader's name and each file's (relative path, size, mtime in ns), in order."""
    h = hashlib.sha256(f"{kind}\n".encode())
    for rel, size, mtime_ns in entries:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def cache_key(digest: str, image_size: int, channels: int) -> str:
    """The entry name for a source converted to (channels, image_size, image_size)."""
    text = f"v{FORMAT_VERSION}:{digest}:{image_size}:{channels}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class CacheWriter:
    """Builds one entry: ``array(...)`` gives writable memory maps, ``commit(meta)`` publishes them.

    Used as a context manager; leaving it by an exception removes everything it wrote.
    """

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.final = Path(cache_dir) / key
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}.tmp-"))
        self.arrays: dict[str, np.memmap] = {}

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)  # after a commit it is already gone

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A new uint8 memory-mapped array ``<name>.npy`` of ``shape``, to be filled by the caller."""
        a = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape)
        self.arrays[name] = a
        return a

    def commit(self, meta: dict) -> Path:
        """Flush the arrays, write ``meta.json`` and rename the entry into place; its final path."""
        for a in self.arrays.values():
            if a.size:
                a.flush()
        self.arrays.clear()
        meta = {**meta, "format": FORMAT_VERSION, "parts": sorted(p.stem for p in self.tmp.glob("*.npy"))}
        (self.tmp / _META).write_text(json.dumps(meta))
        if self.final.exists() and not (self.final / _META).is_file():
            shutil.rmtree(self.final, ignore_errors=True)  # a leftover without meta is no entry
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not (self.final / _META).is_file():
                raise
            # another process published the same entry first: its copy holds the same bytes
        return self.final


def open_cached(cache_dir: Path, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """The entry's arrays (read-only memory maps) and its meta, or None when it is absent or damaged.

    A damaged entry (unreadable meta, a missing or short array) is removed, so it is rebuilt.
    """
    entry = Path(cache_dir) / key
    if not (entry / _META).is_file():
        return None
    try:
        meta = json.loads((entry / _META).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError("another cache format")
        arrays = {part: np.load(entry / f"{part}.npy", mmap_mode="r", allow_pickle=False) for part in meta["parts"]}
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return arrays, meta


def read_note(cache_dir: Path, name: str) -> dict | None:
    """A small JSON note kept beside the entries (e.g. a folder's default size), or None."""
    try:
        return json.loads((Path(cache_dir) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def write_note(cache_dir: Path, name: str, note: dict) -> None:
    """Write a note atomically (write, then rename)."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(note, f)
        os.replace(tmp, Path(cache_dir) / f"{name}.json")
    finally:
        Path(tmp).unlink(missing_ok=True)


def iter_chunks(images: np.ndarray, max_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, images[start:start + n])`` in order, each chunk an in-memory copy of at most ``max_bytes``."""
    row = int(np.prod(images.shape[1:], dtype=np.int64)) * images.itemsize
    if row > max_bytes:
        raise ValueError(f"one image takes {row} bytes, more than max_bytes={max_bytes}")
    step = max(1, max_bytes // max(row, 1))
    for start in range(0, len(images), step):
        yield start, np.array(images[start:start + step])


def memory_budget(device: str = "cpu", fraction: float = DEVICE_FRACTION) -> int:
    """Bytes of images that may stay resident on ``device``: ``fraction`` of its free memory now."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * fraction)


def residency(nbytes: int, budget_bytes: int) -> str:
    """``"resident"`` when ``nbytes`` of images fit the budget, else ``"streamed"`` (chunks from the cache)."""
    return "resident" if nbytes <= budget_bytes else "streamed"
