"""What ``toolkit predict`` reads as images (``predict.input``), and their conversion to a model's input.

An idx3 file as MNIST ships it (``.gz`` too), a ``.npy`` uint8 array ``(N, H, W)``, ``(N, C, H, W)``
or ``(N, H, W, C)`` (C = 1 or 3; the layout rule of the array datasets), or one image file or a
folder of them (PNG, JPEG, ...: any size and mode). Reading comes first and checks everything it
can without a model (a bad path must not wait for a model download); converting needs the model's
``ImageSpec`` and is training's own conversion (``toolkit.datasets.convert``, and the folder
datasets' decoder for files), so a picture meets the network as a training image did.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from toolkit.datasets.mnist import DataError
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec

# image files by name: a folder's other files are skipped, a single file of another name is read as idx3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IDX3_MAGIC, IDX1_MAGIC = 2051, 2049


def _idx3_images(raw: bytes, path: Path) -> np.ndarray:
    """uint8 (N, 1, H, W): the images of an idx3 file (magic 2051, dims N x H x W): the one idx reader."""
    from toolkit.datasets.idx import parse_idx

    if int.from_bytes(raw[:4], "big") == IDX1_MAGIC:
        raise DataError(f"predict.input {path} is an idx1 (labels) file; give the images (idx3) file")
    images = parse_idx(raw, path, 3, "predict.input")
    if len(images) and min(images.shape[1:]) < 1:
        raise DataError(f"predict.input {path}: images of {images.shape[1]}x{images.shape[2]} pixels hold nothing")
    return images[:, None]


def _npy_images(path: Path) -> np.ndarray:
    """uint8 (N, C, H, W), C = 1 or 3, from an array in any layout the array datasets take."""
    from toolkit.datasets.arrays import as_nchw  # the layout rule of training's arrays, so both agree

    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain .npy array"
        raise DataError(f"predict.input {path}: not a readable .npy array ({type(e).__name__}: {e})".splitlines()[0]) from None
    if x.ndim == 2:
        x = x[None]  # one image
    if x.dtype != np.uint8:
        raise DataError(f"predict.input {path}: dtype {x.dtype}, expected uint8 images with values 0..255 "
                        "(from floats in [0, 1]: (x * 255).round().astype(np.uint8))")
    return as_nchw(x, f"predict.input {path}")


_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)


def _check_picture(path: Path) -> None:
    """Open the file's header (no pixels): a file that is no image is refused before a model is loaded."""
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise DataError(f"predict.input {path}: not a readable image ({e})".splitlines()[0]) from None


@dataclass
class Images:
    """The images at ``predict.input``, read but not yet converted: that needs the model's spec."""

    names: list[str]
    arrays: np.ndarray | None = None  # uint8 (N, C, H, W) from an idx3 or .npy file
    files: Sequence[Path] = ()  # image files, decoded one at a time when converted

    def __len__(self) -> int:
        return len(self.names)

    def to_spec(self, spec: ImageSpec) -> torch.Tensor:
        """uint8 (N, spec.channels, S, S), by training's conversion (``toolkit.datasets.convert``)."""
        from toolkit.datasets.convert import array_to_chw
        from toolkit.datasets.folder import decode_image

        c, s = spec.channels, spec.image_size
        if self.arrays is not None and self.arrays.shape[1:] == spec.input_shape():
            return torch.from_numpy(np.ascontiguousarray(self.arrays))  # as the model takes them: untouched
        out = np.empty((len(self), c, s, s), np.uint8)
        if self.arrays is not None:
            for i, image in enumerate(self.arrays):
                out[i] = array_to_chw(image, s, c)
        for i, path in enumerate(self.files):
            try:
                # training's own decoder (folder datasets): the same pixels for the same file
                out[i] = decode_image(path, s, c)
            except DataError as e:
                raise DataError(f"predict.input: {e}".splitlines()[0]) from None
        return torch.from_numpy(out)


def load_images(path: str | os.PathLike) -> Images:
    """The images at ``path`` and a name per image (file name, or ``<file>:<index>``); DataError if none."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"predict.input {p}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"predict.input {p}: no PNG/JPEG images in this folder "
                            f"(image files: {', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            _check_picture(f)
        return Images([f.name for f in files], files=files)
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        _check_picture(p)
        return Images([p.name], files=[p])
    if suffix == ".npy":
        images = _npy_images(p)
    else:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise DataError(f"predict.input {p}: broken gzip file ({e})") from None
        elif int.from_bytes(raw[:4], "big") not in (IDX3_MAGIC, IDX1_MAGIC):
            raise DataError(f"predict.input {p}: unknown format; expected an idx3 image file (.gz too), "
                            "a .npy uint8 array (N, H, W) / (N, C, H, W) / (N, H, W, C), or image files")
        images = _idx3_images(raw, p)
    if len(images) == 0:
        raise DataError(f"predict.input {p}: holds no images")
    return Images([f"{p.name}:{i}" for i in range(len(images))], arrays=images)


def read_images(path: str | os.PathLike, spec: ImageSpec = MNIST_SPEC) -> tuple[torch.Tensor, list[str]]:
    """uint8 images ``(N, C, S, S)`` converted to ``spec``, and a name per image."""
    images = load_images(path)
    return images.to_spec(spec), images.names
