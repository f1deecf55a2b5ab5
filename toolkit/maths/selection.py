"""Choose which unlabeled samples join the next round's training set, and with what label.

One offline pseudo-labeling round predicts class probabilities over the whole unlabeled pool,
then calls ``select_pseudo_labels`` once. Pure torch: no Ray, no MLflow, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toolkit.maths.probes.knn import knn_votes


@dataclass(frozen=True)
class PseudoLabelSelection:
    """The samples picked from a ``(N, C)`` probability table, in increasing position order.

    positions:        (K,) int64, row indices into the probability table.
    labels:           (K,) int64, predicted class (argmax) of each selected row.
    confidences:      (K,) float, max probability of each selected row.
    class_thresholds: (C,) float, the confidence threshold actually applied to each class.
    """

    positions: Tensor
    labels: Tensor
    confidences: Tensor
    class_thresholds: Tensor

    def __len__(self) -> int:
        return int(self.positions.numel())

    def counts_per_class(self, num_classes: int) -> Tensor:
        """(num_classes,) int64: how many selected samples carry each label."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        return torch.bincount(self.labels, minlength=num_classes)


def flexmatch_class_thresholds(labels: Tensor, confidences: Tensor, threshold: float, num_classes: int) -> Tensor:
    """FlexMatch curriculum thresholds (Zhang et al. 2021, convex mapping, threshold warm-up).

    With ``N`` pool samples, predicted label ``y_i`` and confidence ``p_i``::

        sigma_c = #{i : y_i = c and p_i >= threshold}        # learning effect of class c
        beta_c  = sigma_c / max(max_c' sigma_c', N - sum_c' sigma_c')
        T_c     = M(beta_c) * threshold,   M(x) = x / (2 - x)

    ``N - sum sigma`` counts the samples no class has claimed yet ("unused"); while it is the
    largest term all thresholds stay low (warm-up). Once the pool is mostly used, the
    best-learned class gets ``beta = 1`` and so ``T = threshold``; less-learned classes get
    lower thresholds. ``>=`` matches FlexMatch's ``max_probs.ge(p_cutoff)``. Returns (C,)
    float64.
    """
    n = labels.numel()
    if n == 0:  # empty pool: nothing to learn from, nothing to select
        return torch.full((num_classes,), threshold, dtype=torch.float64, device=labels.device)
    confident = confidences >= threshold
    sigma = torch.bincount(labels[confident], minlength=num_classes).to(torch.float64)
    unused = n - sigma.sum()
    # n >= 1 makes the denominator >= 1: either some class has sigma >= 1 or unused >= 1.
    beta = sigma / torch.maximum(sigma.max(), unused)
    return beta / (2.0 - beta) * threshold


def select_pseudo_labels(
    probs: Tensor,
    threshold: float,
    per_class_cap: int | None = None,
    class_adaptive: bool = False,
) -> PseudoLabelSelection:
    """Pick confident predictions from ``probs`` (N, C) as pseudo-labels.

    For each row, ``confidence = max_c probs[i, c]`` and ``label = argmax_c probs[i, c]``
    (the lowest class index on ties).

    - Plain: keep rows with ``confidence >= threshold``; every class threshold is ``threshold``.
    - ``class_adaptive=True``: FlexMatch's per-class thresholds (see
      ``flexmatch_class_thresholds``): ``sigma_c`` = rows labelled ``c`` with
      ``confidence >= threshold``; ``beta_c = sigma_c / max(max_c sigma_c, N - sum_c sigma_c)``;
      ``T_c = beta_c / (2 - beta_c) * threshold``; keep rows with ``confidence >= T_label``.
    - ``per_class_cap=k``: afterwards keep at most ``k`` rows per predicted class, the most
      confident first, equal confidences by lower position, so no class floods the training set.

    The result is deterministic and lists positions in increasing order. Comparisons are done
    in the dtype of ``probs`` (half precision is promoted to float32).
    """
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a 2-D tensor (N, C), got {shape}")
    if probs.shape[1] < 1:
        raise ValueError(f"probs must have at least one class column, got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got {probs.dtype}")
    if isinstance(threshold, bool) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if per_class_cap is not None and (
        isinstance(per_class_cap, bool) or not isinstance(per_class_cap, int) or per_class_cap < 0
    ):
        raise ValueError(f"per_class_cap must be None or an integer >= 0, got {per_class_cap!r}")

    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    probs = probs.detach()
    num_classes = probs.shape[1]
    confidences, labels = probs.max(dim=1)  # (N,), (N,); first max index on ties

    if class_adaptive:
        # Cast to the probs dtype so that T_c == threshold compares exactly like the plain rule.
        class_thresholds = flexmatch_class_thresholds(labels, confidences, threshold, num_classes).to(probs.dtype)
    else:
        class_thresholds = torch.full((num_classes,), threshold, dtype=probs.dtype, device=probs.device)

    keep = confidences >= class_thresholds[labels]
    positions = torch.nonzero(keep, as_tuple=False).flatten()  # increasing

    if per_class_cap is not None and positions.numel() > 0:
        # Order kept rows by (label asc, confidence desc, position asc) with two stable sorts,
        # then keep the first `per_class_cap` of each label run.
        by_conf = torch.sort(confidences[positions], descending=True, stable=True).indices
        positions = positions[by_conf]
        by_label = torch.sort(labels[positions], stable=True).indices
        positions = positions[by_label]
        sorted_labels = labels[positions]
        run_start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
        rank_in_class = torch.arange(positions.numel(), device=positions.device) - run_start
        positions = torch.sort(positions[rank_in_class < per_class_cap]).values

    return PseudoLabelSelection(
        positions=positions,
        labels=labels[positions],
        confidences=confidences[positions],
        class_thresholds=class_thresholds,
    )


def knn_smooth(probs: Tensor, feats: Tensor, k: int, temperature: float = 0.07, chunk_size: int = 2048) -> Tensor:
    """Each row's class probabilities averaged over itself and its ``k`` nearest neighbours.

    The kNN probe's vote (``probes.knn_votes``: cosine similarity of ``feats`` (N, D), each
    neighbour weighted ``exp(sim / T)``) with the rows as both bank and queries, so the row
    itself (similarity 1) weighs most. A label that is wrong while its neighbourhood in a
    label-free embedding agrees on another class is outvoted: isolated mistakes of the
    classifiers are revised, shared ones are not. Returns (N, C) rows summing to 1, on the
    features' device. Peak extra memory about ``chunk_size x N`` floats.
    """
    if probs.ndim != 2 or feats.ndim != 2 or probs.shape[0] != feats.shape[0]:
        raise ValueError(f"need (N, C) probs and (N, D) feats with the same N, got {tuple(probs.shape)} "
                         f"and {tuple(feats.shape)}")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")
    votes = knn_votes(feats, probs, feats, k + 1, temperature, chunk_size)  # + the row itself
    return votes / votes.sum(1, keepdim=True)
