"""The linear probe: L2-regularised multinomial logistic regression on standardised features,
fitted to convergence by full-batch L-BFGS, and the choice of its penalty ``C`` on validation.

The objective is convex (the frozen-feature protocol of SimCLR, Chen et al. 2020, B.8), so the
result depends on the features and ``C`` alone, never on the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.maths.probes.features import Standardize, _check_feats_labels, _seeded
from toolkit.maths.probes.metrics import accuracy, predict


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int = 10,
    *,
    C: float = 1.0,
    max_iter: int = 200,
    batch_size: int = 16384,
    seed: int = 0,
) -> nn.Sequential:
    """Fit ``Standardize -> Linear`` by L-BFGS; return it in eval mode on the features' device.

    Minimises ``mean_i CE_i + ||W||^2 / (2 C N)``: scikit-learn's ``LogisticRegression(C)``
    divided by N, so the penalty is strong with 100 labels and weak with 60,000 (bias is not
    penalised). ``max_iter`` bounds the L-BFGS iterations (each is at least one pass over the
    data). ``batch_size`` only bounds memory: the full-batch loss and gradient are accumulated
    over chunks of that many rows, so it does not change the solution. ``seed`` is accepted for
    a uniform signature; the weights start at zero and the objective is convex.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if max_iter < 1 or batch_size < 1:
        raise ValueError(f"max_iter and batch_size must be >= 1, got {max_iter}, {batch_size}")
    n, d = train_feats.shape
    device = train_feats.device
    with _seeded(seed, device):  # nn.Linear's init draws from the global RNG: leave it untouched
        std = Standardize.fit(train_feats)
        linear = nn.Linear(d, num_classes).to(device)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    l2 = 1.0 / (2.0 * C * n)

    opt = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            x = std(train_feats[start : start + batch_size])
            # sum / n per chunk: the accumulated gradient equals the full-batch mean gradient.
            loss = F.cross_entropy(linear(x), labels[start : start + batch_size], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = l2 * linear.weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return nn.Sequential(std, linear).eval()


def select_linear_C(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),
    num_classes: int = 10,
) -> tuple[float, dict[float, float]]:
    """The inverse regularisation ``C`` of the linear probe with the best *validation* accuracy.

    Returns (best C, {C: val acc}); ties go to the smaller C (the stronger penalty).
    """
    scores = {}
    for c in grid:
        probe = train_linear_probe(train_feats, train_labels, num_classes, C=c)
        scores[c] = accuracy(predict(probe, val_feats), val_labels)
    best = max(grid, key=lambda c: (scores[c], -c))
    return best, scores


def select_linear_C_cv(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    folds: int = 5,
    grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),
    num_classes: int = 10,
) -> tuple[float, dict[float, float]]:
    """``C`` chosen by stratified ``folds``-fold cross-validation inside the training labels alone.

    The strict protocol's choice: no label outside the training set is read. Fold ``k`` holds
    the images whose rank within their class is ``k`` modulo ``folds`` (deterministic, every
    class in every fold when it has ``folds`` images). Returns (best C, {C: mean held-out
    accuracy}); ties go to the smaller C.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    fold_of = torch.empty_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        fold_of[where] = torch.arange(len(where), device=labels.device) % folds
    scores = {c: 0.0 for c in grid}
    for k in range(folds):
        held, kept = fold_of == k, fold_of != k
        if not held.any() or not kept.any():
            raise ValueError(f"{folds}-fold cross-validation needs at least {folds} labeled images")
        for c in grid:
            probe = train_linear_probe(train_feats[kept], labels[kept], num_classes, C=c)
            scores[c] += accuracy(predict(probe, train_feats[held]), labels[held]) / folds
    best = max(grid, key=lambda c: (scores[c], -c))
    return best, scores


def nested_cv_accuracy(
    feats: torch.Tensor,
    labels: torch.Tensor,
    folds: int = 5,
    num_classes: int = 10,
    grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),
) -> tuple[float, int]:
    """An honest accuracy estimate of the linear probe from the labeled images alone: each outer fold is
    predicted by a probe whose ``C`` was chosen by cross-validation inside the other folds, so no image
    helps choose the probe that predicts it. Returns (held-out accuracy over all images, images predicted)."""
    labels = _check_feats_labels(feats, labels, num_classes, "train")
    fold_of = torch.empty_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        fold_of[where] = torch.arange(len(where), device=labels.device) % folds
    right = 0.0
    for k in range(folds):
        held, kept = fold_of == k, fold_of != k
        if not held.any():
            continue
        inner = max(2, min(folds - 1, int(torch.bincount(labels[kept]).clamp(min=1).min())))
        c, _ = select_linear_C_cv(feats[kept], labels[kept], folds=inner, grid=grid, num_classes=num_classes)
        probe = train_linear_probe(feats[kept], labels[kept], num_classes, C=c)
        right += accuracy(predict(probe, feats[held]), labels[held]) * int(held.sum())
    return right / len(labels), len(labels)
