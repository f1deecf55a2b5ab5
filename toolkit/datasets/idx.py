"""Read idx files (the format of MNIST, Fashion-MNIST and KMNIST) as uint8 numpy arrays.

The header is checked against the file's length before any byte is trusted: a truncated
or corrupt download is one line naming the file, never a reshape error. A file may also be
given gzipped (``<name>.gz``, as torchvision downloads it) when the plain one is absent.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from toolkit.datasets.checks import DataError

_UBYTE = 0x08  # the idx type code of unsigned bytes, the only one these datasets use


def _locate(path: Path, what: str) -> Path:
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    raise DataError(f"{what} file missing: {path} (set run.data_root or TOOLKIT_DATA_DIR to the folder holding it, "
                    "or run.download=true)")


def _parse_header(head: bytes, path: Path, ndim: int, what: str) -> tuple[int, ...]:
    """The shape declared by an idx header, after checking its magic number (uint8 type, ``ndim`` dims)."""
    header = 4 * (1 + ndim)
    if len(head) < header:
        raise DataError(f"{what} file truncated: {path} has {len(head)} bytes, less than its {header}-byte header")
    magic = int.from_bytes(head[:4], "big")
    expected = (_UBYTE << 8) | ndim
    if magic != expected:
        raise DataError(f"{what} file corrupt: {path} starts with magic number {magic}, expected {expected} "
                        f"(unsigned bytes, {ndim} dimensions)")
    return tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))


def header_shape(path: Path, ndim: int, what: str = "idx") -> tuple[int, ...]:
    """The shape a plain (not gzipped) idx file's header declares (magic number checked; its length is not)."""
    found = Path(path)
    with found.open("rb") as f:
        return _parse_header(f.read(4 * (1 + ndim)), found, ndim, what)


def check_idx(path: Path, ndim: int, what: str = "idx") -> tuple[int, ...]:
    """The shape of the idx file at ``path`` (or ``path.gz``) after checking its header and length.

    Cheap for a plain file (header and size only), so a driver can call it before it starts workers.
    """
    found = _locate(Path(path), what)
    if found.suffix == ".gz":
        return read_idx(path, ndim, what).shape
    shape = header_shape(found, ndim, what)
    size = found.stat().st_size
    expected = 4 * (1 + ndim) + int(np.prod(shape, dtype=np.int64))
    if size != expected:
        raise DataError(f"{what} file truncated or corrupt: {found} has {size} bytes, expected {expected} (from its header)")
    return shape


def read_idx(path: Path, ndim: int, what: str = "idx") -> np.ndarray:
    """The idx file at ``path`` (or ``path.gz``) as a writable uint8 array of its declared shape."""
    found = _locate(Path(path), what)
    header = 4 * (1 + ndim)
    if found.suffix != ".gz":
        shape = check_idx(found, ndim, what)
        return np.fromfile(found, dtype=np.uint8, offset=header).reshape(shape)
    try:
        raw = gzip.decompress(found.read_bytes())
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{what} file corrupt: {found} is not a readable gzip file ({e})") from e
    return parse_idx(raw, found, ndim, what)


def parse_idx(raw: bytes, path: Path, ndim: int, what: str = "idx") -> np.ndarray:
    """The bytes of an idx file (read and un-gzipped by the caller) as a writable uint8 array of its
    declared shape, header and length checked; ``path`` names it in errors."""
    header = 4 * (1 + ndim)
    shape = _parse_header(raw[:header], path, ndim, what)
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{what} file truncated or corrupt: {path} holds {len(raw)} bytes, "
                        f"expected {expected} (from its header)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
