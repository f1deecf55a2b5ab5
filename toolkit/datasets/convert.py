"""Turn one image (a Pillow image or a uint8 (C, H, W) array) into uint8 (C, S, S), and count pixel statistics.

Every reader goes through here, so a folder of PNGs and an array of the same pixels give the
same bytes. The conversion, in order:
1. mode: EXIF orientation applied; transparency composited onto white (what a viewer shows);
   16-bit grayscale scaled by 255/65535; palette, CMYK and the like to RGB; 1-bit to 0/255;
2. channels: colour to gray by Pillow's ITU-R 601-2 luma (L = .299 R + .587 G + .114 B),
   gray to colour by repeating the plane;
3. size: the largest centred square is kept (no stretching), then resized to S x S with
   Pillow's bilinear filter (antialiased when shrinking). An image already S x S is untouched.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# modes whose pixels carry no colour: a dataset of only these defaults to one channel
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255, 255)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """RGBA onto a white background -> RGB."""
    background = Image.new("RGBA", img.size, _WHITE)
    background.alpha_composite(img.convert("RGBA"))
    return background.convert("RGB")


def to_l_or_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright, in mode L (no colour in its mode) or RGB (everything else)."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8))
    if mode in ("L", "RGB"):
        return img
    has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
    if has_alpha:
        flat = _flatten_alpha(img)
        return flat.convert("L") if mode in GRAY_MODES else flat
    return img.convert("L") if mode in GRAY_MODES else img.convert("RGB")


def _square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def image_to_chw(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """A Pillow image as uint8 (channels, size, size), by the steps in this module's docstring."""
    img = to_l_or_rgb(img)
    want = "L" if channels == 1 else "RGB"
    if img.mode != want:
        img = img.convert(want)
    a = np.asarray(_square(img, size), dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def array_to_chw(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A uint8 (C, H, W) image (C = 1 or 3) as uint8 (channels, size, size), exactly as a file of it would be."""
    c, h, w = image.shape
    if c == channels and h == w == size:
        return np.ascontiguousarray(image)
    # a 2-D uint8 array becomes mode L, an (H, W, 3) one RGB
    pil = Image.fromarray(np.ascontiguousarray(image[0] if c == 1 else image.transpose(1, 2, 0)))
    return image_to_chw(pil, size, channels)


class ChannelStats:
    """Per-channel mean and standard deviation of pixels in [0, 1], accumulated batch by batch.

    The sums are exact integers, so the result does not depend on how the pixels were batched.
    """

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.sums = [0] * channels
        self.squares = [0] * channels

    def add(self, batch: np.ndarray) -> None:
        """Count a uint8 batch (N, C, H, W)."""
        if batch.size == 0:
            return
        self.count += batch.shape[0] * batch.shape[2] * batch.shape[3]
        sums = batch.sum(axis=(0, 2, 3), dtype=np.uint64)
        squares = np.square(batch, dtype=np.uint32).sum(axis=(0, 2, 3), dtype=np.uint64)
        for c in range(len(self.sums)):
            self.sums[c] += int(sums[c])
            self.squares[c] += int(squares[c])

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel in [0, 1], rounded to 4 decimals; (0.5, 0.5) per channel with no pixels."""
        if self.count == 0:
            return tuple(0.5 for _ in self.sums), tuple(0.5 for _ in self.sums)
        mean = [s / self.count / 255.0 for s in self.sums]
        var = [max(q / self.count / 255.0**2 - m * m, 0.0) for q, m in zip(self.squares, mean)]
        return tuple(round(m, 4) for m in mean), tuple(round(v**0.5, 4) for v in var)
