"""The losses and statistics of online consistency training (FixMatch with an EMA teacher,
FlexMatch's class-adaptive thresholds, ReMixMatch's distribution alignment).

Pure tensor maths: nothing here talks to ``torch.distributed``. The statistics that must be
global (``confident_counts``, the teacher's mean prediction) come back as float tensors for
the caller to sum with ``distributed.all_reduce_sum`` before ``class_thresholds`` and
``update_running_mean`` read them; with one process the same calls need no sum.

One training step, with B unlabeled images on this rank and C classes::

    probs_weak = softmax(teacher(weak))                       # (B, C), no grad
    probs_weak = align_distribution(probs_weak, prior, mean)  # optional (ReMixMatch)
    counts, unused = confident_counts(probs_weak, base, C)    # all_reduce_sum both
    thresholds = class_thresholds(base, counts, unused)       # (C,), or torch.full((C,), base)
    loss_u, mask = fixmatch_loss(student(strong), probs_weak, thresholds)
    ...; ema_update(teacher, student, decay)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "fixmatch_loss",
    "class_thresholds",
    "align_distribution",
    "update_running_mean",
    "ema_update",
    "confident_counts",
]


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
    # bool is an int, and NaN fails every comparison: both rejected.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    if not isinstance(probs, Tensor) or probs.ndim != 2 or probs.shape[1] < 1:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"{name} must be a 2-D tensor (B, C) with C >= 1, got {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {probs.dtype}")


def _at_least_float32(t: Tensor) -> Tensor:
    # Half precision loses the difference between 0.95 and 0.951; compare and sum in float32.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def fixmatch_loss(logits_strong: Tensor, probs_weak: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """FixMatch's unlabeled loss (Sohn et al. 2020, eq. 4) with a threshold per class.

    Shapes: ``logits_strong`` (B, C), the student's logits on the strong views (with grad);
    ``probs_weak`` (B, C), the teacher's probabilities on the weak views of the same images
    (detached here: the pseudo-label is a target); ``thresholds`` (C,), or a scalar for one
    threshold for every class. With ``q_i = max_c probs_weak[i, c]`` and the hard pseudo-label
    ``y_i = argmax_c probs_weak[i, c]`` (the lowest class on ties)::

        mask_i = q_i >= thresholds[y_i]
        loss   = (1 / B) * sum_{i : mask_i} cross_entropy(logits_strong[i], y_i)

    The sum is divided by the whole batch B, not by the number of masked rows: few confident
    rows give a small loss, which is how FixMatch (and FlexMatch's ``(ce * mask).mean()``)
    weigh the unlabeled term early in training. With no row passing, the loss is a 0 that
    still depends on ``logits_strong`` (zero gradient), so ``backward`` works on every step.
    ``>=`` matches FixMatch's ``max_probs.ge(threshold)``; the comparison is made in the dtype
    of ``probs_weak`` (at least float32), the thresholds cast to it.

    Returns ``(loss, mask)``: a scalar in ``logits_strong``'s dtype (at least float32) and a
    (B,) bool tensor.
    """
    _check_probs(logits_strong, "logits_strong")
    _check_probs(probs_weak, "probs_weak")
    if logits_strong.shape != probs_weak.shape:
        raise ValueError(
            f"logits_strong and probs_weak must have the same shape (B, C); got "
            f"{tuple(logits_strong.shape)} and {tuple(probs_weak.shape)}"
        )
    b, c = probs_weak.shape
    if b == 0:
        raise ValueError("fixmatch_loss needs at least one row; got an empty batch")
    probs = _at_least_float32(probs_weak.detach())
    thresholds = torch.as_tensor(thresholds, device=probs.device).detach().to(probs.dtype)
    if thresholds.ndim == 0:
        thresholds = thresholds.expand(c)
    if thresholds.shape != (c,):
        raise ValueError(f"thresholds must be a scalar or have shape ({c},), got {tuple(thresholds.shape)}")

    confidence, pseudo = probs.max(dim=1)  # (B,), (B,)
    mask = confidence >= thresholds[pseudo]  # (B,) bool
    ce = F.cross_entropy(_at_least_float32(logits_strong), pseudo, reduction="none")  # (B,)
    # where, not ce * mask: a non-finite ce on a row that is left out must not turn the sum into NaN.
    loss = torch.where(mask, ce, torch.zeros_like(ce)).sum() / b
    return loss, mask


def class_thresholds(base: float, confident_counts: Tensor, unused: int | Tensor, warmup: bool = True) -> Tensor:
    """FlexMatch's class-adaptive thresholds (Zhang et al. 2021, eqs. 6, 7 and 11), shape (C,).

    ``confident_counts[c]`` is sigma_c, the number of unlabeled images the teacher predicts as
    class c with confidence >= ``base`` (its "learning effect"); ``unused`` is the number it
    predicts below ``base``. Then::

        beta_c = sigma_c / max(max_c' sigma_c', unused)     warmup=True  (eq. 11)
        beta_c = sigma_c / max_c' sigma_c'                  warmup=False (eq. 6)
        T_c    = base * M(beta_c),   M(x) = x / (2 - x)     (the convex mapping, eq. 7)

    with 0 / 0 defined as 0. So beta lies in [0, 1] and T_c in [0, base]: the best-learned
    class (beta = 1) keeps ``base``, a class learned half as well gets ``base / 3``. With all
    counts equal and ``unused`` 0 every threshold is ``base``; while ``unused`` is the largest
    term (early training) every threshold stays low.

    A class the teacher never predicts confidently has sigma = 0, hence beta = 0 and a
    threshold of 0: every prediction of that class passes the mask. This is what FlexMatch
    does (its ``classwise_acc`` starts at 0 and it masks with
    ``max_probs.ge(p_cutoff * (acc / (2 - acc)))``), letting a hard class in early rather than
    starving it; at the very start, with no counts at all, every threshold is 0.

    ``confident_counts`` and ``unused`` are the global ones (sum them over ranks first). The
    result has the counts' floating dtype (at least float32); the arithmetic is float64.
    """
    _check_fraction("base", base, low_open=True)
    if not isinstance(warmup, bool):
        raise ValueError(f"warmup must be a bool, got {warmup!r}")
    if not isinstance(confident_counts, Tensor) or confident_counts.ndim != 1 or confident_counts.numel() < 1:
        shape = tuple(confident_counts.shape) if isinstance(confident_counts, Tensor) else type(confident_counts)
        raise ValueError(f"confident_counts must be a 1-D tensor (C,) with C >= 1, got {shape}")
    sigma = confident_counts.detach().to(torch.float64)
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise ValueError("confident_counts must be finite and >= 0")
    unused_t = torch.as_tensor(unused, device=sigma.device).detach().to(torch.float64)
    if unused_t.numel() != 1 or not bool(torch.isfinite(unused_t)) or bool(unused_t < 0):
        raise ValueError(f"unused must be one finite number >= 0, got {unused!r}")

    denominator = sigma.max()
    if warmup:
        denominator = torch.maximum(denominator, unused_t.reshape(()))
    # 0 / 0 := 0: no counts at all (start of training) gives beta 0 for every class.
    # The inner where keeps the branch that is thrown away free of 0 / 0.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    beta = torch.where(denominator > 0, sigma / safe, torch.zeros_like(sigma))
    thresholds = base * beta / (2.0 - beta)
    out_dtype = torch.promote_types(confident_counts.dtype, torch.float32)
    return thresholds.to(out_dtype)


def align_distribution(probs: Tensor, target_prior: Tensor, running_mean: Tensor) -> Tensor:
    """ReMixMatch's distribution alignment (Berthelot et al. 2020, section 3.2), shape (B, C).

    ``probs`` (B, C) are the teacher's probabilities on unlabeled images, ``target_prior`` (C,)
    the labeled set's class frequencies (or uniform), ``running_mean`` (C,) the moving average
    of the teacher's mean prediction on unlabeled batches (``update_running_mean``)::

        aligned[i, c] = probs[i, c] * target_prior[c] / running_mean[c]
        aligned[i]   /= sum_c aligned[i, c]

    A class the teacher predicts more often than the prior says is scaled down, one it
    neglects is scaled up. With ``target_prior == running_mean`` the rows come back unchanged.
    ``running_mean`` is floored at 1e-6 so that a class whose mean has underflowed to 0 gives
    neither 0/0 nor an overflowing row (the reference code adds 1e-6 instead; the floor leaves
    every ordinary mean exact).
    """
    _check_probs(probs)
    c = probs.shape[1]
    for name, t in (("target_prior", target_prior), ("running_mean", running_mean)):
        if not isinstance(t, Tensor) or t.shape != (c,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape ({c},) to match probs {tuple(probs.shape)}, got {shape}")
    dtype = torch.promote_types(target_prior.dtype, running_mean.dtype)
    dtype = torch.promote_types(_at_least_float32(probs).dtype, dtype)
    ratio = target_prior.to(dtype) / running_mean.to(dtype).clamp_min(1e-6)  # (C,)
    aligned = probs.to(dtype) * ratio  # (B, C)
    return aligned / aligned.sum(dim=1, keepdim=True)


def update_running_mean(running_mean: Tensor, batch_mean: Tensor, momentum: float = 0.999) -> Tensor:
    """``momentum * running_mean + (1 - momentum) * batch_mean``, as a new tensor.

    Both (C,); ``batch_mean`` is the teacher's mean prediction on this step's unlabeled batch
    (the global one: sum the per-rank sums and counts with ``all_reduce_sum`` first). Both
    inputs are detached: a running statistic must not chain every step's graph together.
    """
    _check_fraction("momentum", momentum)
    if not isinstance(running_mean, Tensor) or not isinstance(batch_mean, Tensor):
        raise ValueError("running_mean and batch_mean must be tensors")
    if running_mean.shape != batch_mean.shape:
        raise ValueError(
            f"running_mean and batch_mean must have the same shape; got {tuple(running_mean.shape)} "
            f"and {tuple(batch_mean.shape)}"
        )
    return momentum * running_mean.detach() + (1.0 - momentum) * batch_mean.detach()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Move the teacher towards the student in place (Mean Teacher; FixMatch's EMA model).

    For every parameter ``teacher_p <- decay * teacher_p + (1 - decay) * student_p``; every
    buffer (BatchNorm's running mean, variance and batch count) is copied from the student, as
    the reference FixMatch EMA does, so the teacher normalises with statistics of the weights
    it now holds. ``decay`` 0 copies the student exactly, 1 keeps the teacher exactly. The two
    modules must have the same architecture (the same parameter and buffer names and shapes);
    unwrap a DDP student (``.module``) first.
    """
    _check_fraction("decay", decay)
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        raise ValueError("teacher and student must have the same parameter and buffer names")
    for name, tp in t_params.items():
        sp = s_params[name]
        if tp.shape != sp.shape:
            raise ValueError(f"parameter {name}: teacher {tuple(tp.shape)} != student {tuple(sp.shape)}")
        # mul then add (not lerp): decay 0 and 1 give the student and the teacher bit for bit.
        tp.mul_(decay).add_(sp.to(tp.dtype), alpha=1.0 - decay)
    for name, tb in t_buffers.items():
        tb.copy_(s_buffers[name])


def confident_counts(probs: Tensor, threshold: float, num_classes: int) -> tuple[Tensor, Tensor]:
    """FlexMatch's learning-effect counts for one batch of teacher probabilities ``probs`` (B, C).

    Returns ``(counts, below)``: ``counts`` (C,), how many rows have ``max_c probs >= threshold``,
    by their argmax class (the lowest on ties); ``below`` (a 0-d tensor), how many rows do not.
    ``counts.sum() + below == B``. Both are float32 on ``probs``' device (whole numbers, exact up
    to 2**24) so that they can be summed across ranks with ``distributed.all_reduce_sum`` and
    passed to ``class_thresholds`` as its ``confident_counts`` and ``unused``.
    """
    _check_probs(probs)
    _check_fraction("threshold", threshold, low_open=True)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes != probs.shape[1]:
        raise ValueError(f"num_classes must equal probs' column count {probs.shape[1]}, got {num_classes!r}")
    confidence, label = _at_least_float32(probs.detach()).max(dim=1)  # (B,), (B,)
    confident = confidence >= threshold
    counts = torch.bincount(label[confident], minlength=num_classes).to(torch.float32)
    below = (~confident).sum().to(torch.float32)
    return counts, below
