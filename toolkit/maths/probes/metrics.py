"""A fitted probe's predictions and the scores reported for them: accuracy, per-class accuracy
and the confusion matrix.

Shared by the probes, the runner and the stages (which also log confusion matrices), so every
reported accuracy is computed the same way.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict(probe_module: nn.Module, feats: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Argmax class of ``probe_module`` for each row, in eval mode, ``batch_size`` rows at a time.

    Rows are moved to the module's device; predictions come back on ``feats``' device.
    """
    try:
        device = next(probe_module.buffers()).device
    except StopIteration:
        device = next(probe_module.parameters()).device
    was_training = probe_module.training
    probe_module.eval()
    try:
        out = [
            probe_module(feats[s : s + batch_size].to(device)).argmax(1).to(feats.device)
            for s in range(0, feats.shape[0], batch_size)
        ]
    finally:
        probe_module.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=feats.device)


def _check_pred_labels(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must be 1-D of equal length, got {tuple(pred.shape)} and {tuple(labels.shape)}")
    if pred.numel() == 0:
        raise ValueError("pred and labels are empty")
    return labels.to(pred.device, torch.long)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels``."""
    labels = _check_pred_labels(pred, labels)
    return (pred.long() == labels).float().mean().item()


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(C, C) int64 counts on the CPU; ``cm[t, p]`` = number of samples of true class t predicted as p."""
    labels = _check_pred_labels(pred, labels)
    pred = pred.long()
    for name, t in (("pred", pred), ("labels", labels)):
        if int(t.min()) < 0 or int(t.max()) >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    flat = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).cpu()


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> list[float]:
    """Recall of each true class; ``nan`` for a class absent from ``labels``."""
    cm = confusion_matrix(pred, labels, num_classes)
    support = cm.sum(1)
    return [cm[c, c].item() / support[c].item() if support[c] > 0 else float("nan") for c in range(num_classes)]
