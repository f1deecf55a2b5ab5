"""Images too large to hold whole: left in the uint8 cache's memory maps and read a batch at a time.

``StreamedImages`` stands where a resident uint8 (N, C, S, S) tensor would: indexing it (an index
tensor or a slice) reads just those rows from the maps and returns them as a tensor on its device,
so a training batch, a forward pass's chunk or a pool's slice costs what it reads, and the same
rows give the same bytes as the resident tensor (the two paths train identically). ``subset``
narrows it without reading anything. ``residency`` (``cache.py``) decides which of the two a
dataset gets: resident while it fits ``run.resident_mb`` (default: half the free memory).
"""

from __future__ import annotations

import numpy as np
import torch


class StreamedImages:
    """uint8 (N, C, S, S) rows of one or more arrays (e.g. a folder's labeled and unlabeled parts), read on use."""

    def __init__(self, parts: list[np.ndarray], rows: np.ndarray | None = None, device: torch.device | str = "cpu"):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.rows = np.arange(self.offsets[-1], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.device = torch.device(device)
        self.dtype = torch.uint8

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.parts[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def _positions(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return self.rows[index]
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        return self.rows[np.asarray(index, dtype=np.int64).reshape(-1)]

    def subset(self, index) -> "StreamedImages":
        """These rows (an index tensor, array or slice), still unread."""
        return StreamedImages(self.parts, self._positions(index), self.device)

    def to(self, device: torch.device | str) -> "StreamedImages":
        """The same rows, delivered to ``device`` when read (nothing moves now)."""
        return StreamedImages(self.parts, self.rows, device)

    def __getitem__(self, index) -> torch.Tensor:
        """The rows ``index`` names, read from the maps in ascending order (one pass over the file) and
        returned in the order asked, as a uint8 tensor on this object's device."""
        rows = self._positions(index)
        out = np.empty((len(rows), *self.parts[0].shape[1:]), dtype=np.uint8)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        part_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        for p in np.unique(part_of):
            where = part_of == p
            out[order[where]] = self.parts[p][sorted_rows[where] - self.offsets[p]]
        return torch.from_numpy(out).to(self.device)


def take(images: torch.Tensor | StreamedImages, index) -> torch.Tensor | StreamedImages:
    """``images[index]`` for a resident tensor; for streamed images, those rows still unread (a large
    subset: a pool, SimCLR's images) so that a later batch reads only its own rows."""
    if isinstance(images, StreamedImages):
        return images.subset(index)
    return images[index]
