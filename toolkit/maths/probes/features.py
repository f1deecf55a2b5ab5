"""What every probe shares: standardisation fitted on the training features, the check of
(features, labels) inputs, and a seeded block that leaves the global RNG as it found it.

Each probe is a named protocol that must not change silently, so they all validate inputs and
seed the same way; writing that once keeps the three probes comparable.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training-set statistics kept as buffers (saved in state_dict)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    @classmethod
    def fit(cls, feats: torch.Tensor, eps: float = 1e-6) -> "Standardize":
        feats = feats.float()
        mean = feats.mean(0)
        std = feats.std(0, unbiased=False)
        # Constant dimensions (e.g. dead ReLU units) would divide by zero: leave them unscaled.
        std = torch.where(std > eps, std, torch.ones_like(std))
        return cls(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def _check_feats_labels(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """Validate (N, D) features and (N,) labels; return the labels as int64 on the features' device."""
    if feats.ndim != 2:
        raise ValueError(f"{name}_feats must be 2-D (N, D), got shape {tuple(feats.shape)}")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"{name}_labels must be 1-D with {feats.shape[0]} entries to match {name}_feats, "
            f"got shape {tuple(labels.shape)}"
        )
    if feats.shape[0] == 0:
        raise ValueError(f"{name}_feats is empty")
    labels = labels.to(device=feats.device, dtype=torch.long)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}_labels must lie in [0, {num_classes}), got range [{lo}, {hi}]")
    return labels


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU RNG (and this CUDA device's) for the block, then restore them: no global side effects."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield
