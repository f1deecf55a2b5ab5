"""Folds of the labeled images: the strict protocol's validation, drawn from the labels it already has.

A search that chooses by the validation split's accuracy reads labels beyond the ones a user
would have (the standard protocol). Cross-validation inside the labeled images reads none:
fold ``f`` holds out about a ``1/k`` share of every class's labeled images as validation and
trains on the rest; the pool is the same in every fold. Only the labeled images' labels
are read, so the folds of a benchmark split are the same whatever the other labels are.
"""

from __future__ import annotations

import torch

from toolkit.config import ConfigError
from toolkit.datasets.mnist import Split

FOLD_KIND = "label_fold"  # Split.kind of a fold: its validation images are held-out labeled images


def smallest_class(labels: torch.Tensor) -> int:
    """The fewest labeled images any class present has."""
    counts = torch.bincount(labels)
    return int(counts[counts > 0].min())


def check_folds(folds: int, labeled_labels: torch.Tensor) -> None:
    """ConfigError unless every class has at least ``folds`` labeled images (each fold then validates every
    class, and each fold's training images keep every class)."""
    fewest = smallest_class(labeled_labels)
    if folds > fewest:
        raise ConfigError(f"tune.folds={folds} is not allowed: the smallest class has {fewest} labeled images, and "
                          f"each fold holds out at least one of each class; use tune.folds <= {fewest}")


def label_folds(split: Split, labels: torch.Tensor, folds: int) -> list[Split]:
    """``folds`` splits: in split ``f`` the labeled images of fold ``f`` are the validation images and the
    other labeled images the labeled set; the pool is ``split.pool`` in each.

    Stratified: each class's labeled images, in an order drawn by ``split.seed``, are dealt to
    the folds in turn, each class going on from the fold where the previous one stopped, so
    that the folds' sizes differ by at most one overall. Reads ``labels[split.labeled]`` only.
    """
    labeled_labels = labels[split.labeled]
    check_folds(folds, labeled_labels)
    gen = torch.Generator().manual_seed(split.seed)
    fold_of = torch.empty(len(split.labeled), dtype=torch.long)
    start = 0
    for c in torch.unique(labeled_labels).tolist():
        members = (labeled_labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        fold_of[members] = (torch.arange(len(members)) + start) % folds
        start = (start + len(members)) % folds
    out = []
    for f in range(folds):
        held = fold_of == f
        out.append(Split(labeled=split.labeled[~held], val=split.labeled[held], pool=split.pool, seed=split.seed,
                         labels_per_class=split.labels_per_class, kind=FOLD_KIND))
    return out
