"""Classifier steps with online consistency training: FixMatch's loss on unlabeled pool images, whose
pseudo-labels come from an EMA teacher's weak views, under a threshold that follows the pseudo-labeler's
schedules (optionally FlexMatch's class-adaptive thresholds and ReMixMatch's distribution alignment).

Each step: a batch of labeled (+ pseudo-labeled) images as ``classifier_steps`` draws it, and
``unlabeled_ratio`` times as many pool images; the teacher (no grad, eval mode) sees a weak view of
the pool images, the student sees a strong view; the loss is cross-entropy on the labeled batch plus
``weight`` times ``fixmatch_loss``. The threshold statistics and the teacher's mean prediction are
summed over all ranks (``distributed.all_reduce_sum``), so 2 workers decide what 1 process would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import AugmentConfig, ConsistencyConfig
from toolkit.datasets.mnist import to_float
from toolkit.engine.loops import MixedBatches, OptimState, _channels_last
from toolkit.maths.augment import augment
from toolkit.maths.consistency import (align_distribution, class_thresholds, confident_counts, ema_update,
                                       fixmatch_loss, update_running_mean)
from toolkit.maths.distributed import all_reduce_sum


@dataclass
class ConsistencyState:
    """What the consistency term carries from step to step: the EMA teacher, the running statistics."""

    teacher: nn.Module
    prior: torch.Tensor          # (C,) the labeled class frequencies (the target of distribution alignment)
    running_mean: torch.Tensor   # (C,) the teacher's running mean prediction on the pool
    counts: torch.Tensor         # (C,) running confident counts (FlexMatch's sigma), summed over ranks
    unused: torch.Tensor         # () running count of pool images below the threshold

    @classmethod
    def start(cls, model: nn.Module, labels: torch.Tensor, num_classes: int) -> "ConsistencyState":
        import copy

        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        prior = torch.bincount(labels, minlength=num_classes).float()
        prior = prior / prior.sum()
        device = labels.device
        return cls(teacher, prior, prior.clone(), torch.zeros(num_classes, device=device),
                   torch.zeros((), device=device))


def consistency_steps(model: nn.Module, opt: OptimState, batches: MixedBatches, pool: Any, setup: dict,
                      gen: torch.Generator, accelerator: Any) -> dict[str, float]:
    """``batches.steps`` optimizer steps with the consistency term; ``pool``: uint8 (U, C, S, S) images (a tensor
    or ``StreamedImages``); ``setup``: {"aug": AugmentConfig, "consistency": ConsistencyConfig, "state":
    ConsistencyState, "threshold": float, "label_smoothing": float, "plain": the unwrapped model, "step": the
    training's step count before these steps}.
    Returns the mean losses, the share of pool images that passed the threshold, and images/s."""
    aug: AugmentConfig = setup["aug"]
    cc: ConsistencyConfig = setup["consistency"]
    state: ConsistencyState = setup["state"]
    weak_aug, strong_aug = replace(aug, strength=cc.weak_strength), replace(aug, strength=cc.strong_strength)
    model.train()
    device = batches.labeled_x.device
    n_pool = len(pool)
    sums = {k: torch.zeros((), device=device) for k in ("train_loss", "unlabeled_loss", "mask", "correct")}
    seen, t0 = 0, time.perf_counter()
    step = setup["step"]
    for xb, yb in batches.draw(gen):
        ui = torch.randint(n_pool, (len(xb) * cc.unlabeled_ratio,), generator=gen, device=device)
        u = to_float(pool[ui].to(device))
        x = augment(to_float(xb), aug, gen)
        with torch.no_grad():
            probs = F.softmax(state.teacher(_channels_last(augment(u, weak_aug, gen))).float(), dim=1)
            if cc.distribution_alignment:
                mean = all_reduce_sum(probs.sum(0)) / all_reduce_sum(torch.tensor(float(len(probs)), device=device))
                state.running_mean = update_running_mean(state.running_mean, mean)
                probs = align_distribution(probs, state.prior, state.running_mean)
            thresholds = _thresholds(state, probs, setup["threshold"], cc.class_adaptive)
        strong = augment(u, strong_aug, gen)
        with accelerator.autocast():
            logits = model(_channels_last(torch.cat([x, strong])))
        logits_x, logits_u = logits[: len(x)].float(), logits[len(x):].float()
        sup = F.cross_entropy(logits_x, yb, label_smoothing=setup["label_smoothing"])
        unsup, mask = fixmatch_loss(logits_u, probs, thresholds)
        opt.update(sup + cc.weight * unsup, accelerator)
        # Mean Teacher's warm-up: a young student's teacher follows it closely, later the average is long
        step += 1
        ema_update(state.teacher, setup["plain"], min(cc.ema_decay, (1 + step) / (10 + step)))
        sums["train_loss"] += sup.detach()
        sums["unlabeled_loss"] += unsup.detach()
        sums["mask"] += mask.float().mean()
        sums["correct"] += (logits_x.argmax(1) == yb).sum()
        seen += yb.numel()
    steps = max(batches.steps, 1)
    seconds = time.perf_counter() - t0
    return {
        "train_loss": float(sums["train_loss"]) / steps,
        "train_acc": float(sums["correct"]) / max(seen, 1),
        "unlabeled_loss": float(sums["unlabeled_loss"]) / steps,
        "mask_rate": float(sums["mask"]) / steps,
        "images_per_s": batches.steps * batches.batch_size * (1 + cc.unlabeled_ratio) / seconds if seconds > 0 else 0.0,
    }


def _thresholds(state: ConsistencyState, probs: torch.Tensor, base: float, adaptive: bool) -> torch.Tensor:
    """(C,) thresholds: ``base`` for every class, or FlexMatch's from running confident counts summed over ranks."""
    num_classes = probs.shape[1]
    if not adaptive:
        return torch.full((num_classes,), base, device=probs.device)
    counts, below = confident_counts(probs, base, num_classes)
    # running sums over recent steps (FlexMatch keeps each pool image's latest prediction; with random
    # batches a decaying sum of the global batch's counts estimates the same proportions)
    state.counts = 0.99 * state.counts + all_reduce_sum(counts)
    state.unused = 0.99 * state.unused + all_reduce_sum(below)
    return class_thresholds(base, state.counts, state.unused)
