"""The training and inference loops, written once.

Ray Train workers, the in-process ``local`` backend, Ray Data actors and Tune
trials all call these functions. Images stay uint8 on the device and are
converted and augmented per batch; ranks agree on one global permutation per
epoch and each takes its own slice, so the global batch is the same whatever
the number of workers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment, two_views
from .config import AugmentConfig
from .data import to_float
from .losses import nt_xent_loss


def epoch_permutation(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The same permutation of range(n) on every rank (seeded by seed and epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def local_slice(global_idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's equal share of a global batch (the global batch must divide by world)."""
    per = global_idx.numel() // world
    return global_idx[rank * per: (rank + 1) * per]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def simclr_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    images: torch.Tensor,
    global_batch: int,
    aug: AugmentConfig,
    temperature: float,
    seed: int,
    epoch: int,
    gen: torch.Generator,
    accelerator: Any,
    rank: int = 0,
    world: int = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """One SimCLR epoch over ``images`` (uint8 (N, 28, 28) on the device). Returns mean loss and views/s."""
    model.train()
    device = images.device
    perm = epoch_permutation(images.shape[0], seed, epoch, device)
    steps = images.shape[0] // global_batch  # drop the ragged tail: NT-Xent wants full batches
    total, t0 = torch.zeros((), device=device), time.perf_counter()
    for step in range(steps):
        idx = local_slice(perm[step * global_batch: (step + 1) * global_batch], rank, world)
        v1, v2 = two_views(to_float(images[idx]), aug, gen)
        with accelerator.autocast():
            z = model(_channels_last(torch.cat([v1, v2])))
        z1, z2 = z.float().chunk(2)
        loss = nt_xent_loss(z1, z2, temperature, gather=True)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        total += loss.detach()
        if on_step:
            on_step(step, steps)
    mean_loss = float(total) / max(steps, 1)  # syncs the device before the clock stops
    seconds = time.perf_counter() - t0
    return {
        "loss": mean_loss,
        "views_per_s": 2 * steps * global_batch / seconds if seconds > 0 else 0.0,
        "epoch_seconds": seconds,
    }


def classifier_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    labeled_x: torch.Tensor,
    labeled_y: torch.Tensor,
    pseudo_x: torch.Tensor | None,
    pseudo_y: torch.Tensor | None,
    steps: int,
    local_batch: int,
    labeled_fraction: float,
    aug: AugmentConfig,
    gen: torch.Generator,
    accelerator: Any,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """``steps`` optimizer steps on freshly augmented batches.

    Each batch draws ``labeled_fraction`` of its images from the true labels and the
    rest from the pseudo-labels (all from the true labels when there are none), with
    replacement: with 100 labels an "epoch" means nothing, steps do.
    """
    model.train()
    device = labeled_x.device
    have_pseudo = pseudo_x is not None and pseudo_x.shape[0] > 0
    n_lab = local_batch if not have_pseudo else max(1, round(local_batch * labeled_fraction))
    n_pse = local_batch - n_lab
    total, correct, seen, t0 = torch.zeros((), device=device), torch.zeros((), device=device), 0, time.perf_counter()
    for _ in range(steps):
        li = torch.randint(labeled_x.shape[0], (n_lab,), generator=gen, device=device)
        xb, yb = labeled_x[li], labeled_y[li]
        if n_pse:
            pi = torch.randint(pseudo_x.shape[0], (n_pse,), generator=gen, device=device)
            xb, yb = torch.cat([xb, pseudo_x[pi]]), torch.cat([yb, pseudo_y[pi]])
        x = augment(to_float(xb), aug, gen)
        with accelerator.autocast():
            logits = model(_channels_last(x))
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        total += loss.detach()
        correct += (logits.argmax(1) == yb).sum()
        seen += yb.numel()
    train_loss, train_acc = float(total) / steps, float(correct) / max(seen, 1)  # device sync
    seconds = time.perf_counter() - t0
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "images_per_s": steps * local_batch / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 2048, autocast: Any = None) -> torch.Tensor:
    """Logits (N, C) in float32 for uint8 images (N, 28, 28), in eval mode."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = _channels_last(to_float(images[i: i + batch_size]))
        if autocast is not None:
            with autocast():
                outs.append(model(x).float())
        else:
            outs.append(model(x).float())
    model.train(was_training)
    if not outs:
        return torch.zeros(0, 0, device=images.device)
    return torch.cat(outs)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2048) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier on uint8 images."""
    logits = predict_logits(model, images, batch_size)
    return {
        "acc": float((logits.argmax(1) == labels).float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
    }


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Frozen-encoder features (N, D) in float32, computed in batches on the images' device."""
    return predict_logits(encoder, images, batch_size)
