"""The training and inference loops, written once.

Ray Train workers, the in-process ``local`` backend, Ray Data actors and Tune
trials all call these functions. Images stay uint8 on the device and are
converted and augmented per batch; ranks agree on one global permutation per
epoch and each takes its own slice, so the global batch is the same whatever
the number of workers.

A loop takes a few objects, as torchvision's ``train_one_epoch`` does: the model,
an ``OptimState`` (optimizer and the schedule stepped with it), a batch source
(``EpochBatches`` for SimCLR, ``MixedBatches`` for the classifier), the
augmentation config, a ``torch.Generator`` and the Accelerate ``accelerator``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.maths.augment import augment, make_generator, two_views
from toolkit.config import AugmentConfig
from toolkit.datasets.mnist import to_float
from toolkit.maths.losses import nt_xent_loss


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


@dataclass(frozen=True)
class OptimState:
    """The optimizer and the learning-rate schedule stepped after every optimizer step."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LRScheduler (LambdaLR in toolkit)

    def update(self, loss: torch.Tensor, accelerator: Any) -> None:
        """One update: clear the gradients, backward through ``accelerator``, optimizer step, schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        self.optimizer.step()
        self.scheduler.step()


@dataclass(frozen=True)
class EpochBatches:
    """One SimCLR epoch of this rank's batches: full global batches of a permutation every rank shares.

    The permutation depends on (``seed``, ``epoch``) only; rank ``rank`` of ``world``
    takes its equal slice of each global batch, so the global batch does not depend on
    the number of workers. The ragged tail is dropped: NT-Xent wants full batches.
    """

    images: torch.Tensor  # uint8 (N, C, S, S) on the device
    global_batch: int
    seed: int
    epoch: int
    rank: int = 0
    world: int = 1

    @property
    def steps(self) -> int:
        return self.images.shape[0] // self.global_batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        """This rank's uint8 batches (global_batch / world, C, S, S), one per step."""
        perm = epoch_permutation(self.images.shape[0], self.seed, self.epoch, self.images.device)
        gb = self.global_batch
        return (self.images[local_slice(perm[s * gb: (s + 1) * gb], self.rank, self.world)] for s in range(self.steps))


@dataclass(frozen=True)
class MixedBatches:
    """``steps`` classifier batches of ``batch_size`` images, drawn with replacement.

    Each batch draws ``labeled_fraction`` of its images from the true labels and the
    rest from the pseudo-labels (all from the true labels when there are none): with
    100 labels an "epoch" means nothing, steps do.
    """

    labeled_x: torch.Tensor  # uint8 (L, C, S, S) on the device
    labeled_y: torch.Tensor  # int64 (L,)
    pseudo_x: torch.Tensor | None  # uint8 (P, C, S, S) or None
    pseudo_y: torch.Tensor | None  # int64 (P,) or None
    steps: int
    batch_size: int  # images per batch on this rank
    labeled_fraction: float

    @property
    def n_labeled(self) -> int:
        """Images per batch with true labels (the rest are pseudo-labeled)."""
        have_pseudo = self.pseudo_x is not None and self.pseudo_x.shape[0] > 0
        return self.batch_size if not have_pseudo else max(1, round(self.batch_size * self.labeled_fraction))

    def draw(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` (uint8 images, labels) batches; indices come from ``gen`` one batch at a time."""
        device = self.labeled_x.device
        n_lab = self.n_labeled
        n_pse = self.batch_size - n_lab
        for _ in range(self.steps):
            li = torch.randint(self.labeled_x.shape[0], (n_lab,), generator=gen, device=device)
            xb, yb = self.labeled_x[li], self.labeled_y[li]
            if n_pse:
                pi = torch.randint(self.pseudo_x.shape[0], (n_pse,), generator=gen, device=device)
                xb, yb = torch.cat([xb, self.pseudo_x[pi]]), torch.cat([yb, self.pseudo_y[pi]])
            yield xb, yb


def simclr_epoch(
    model: nn.Module,
    opt: OptimState,
    batches: EpochBatches,
    aug: AugmentConfig,
    temperature: float,
    gen: torch.Generator,
    accelerator: Any,
) -> dict[str, float]:
    """One SimCLR epoch over ``batches``: two views per image from ``gen``, NT-Xent gathered over ranks.

    Returns the mean loss, views/s (all ranks) and the epoch's seconds.
    """
    model.train()
    device = batches.images.device
    steps = batches.steps
    local_batches = iter(batches)  # draws the epoch's permutation before the clock starts
    total, t0 = torch.zeros((), device=device), time.perf_counter()
    for xb in local_batches:
        v1, v2 = two_views(to_float(xb), aug, gen)
        with accelerator.autocast():
            z = model(_channels_last(torch.cat([v1, v2])))
        z1, z2 = z.float().chunk(2)
        loss = nt_xent_loss(z1, z2, temperature, gather=True)
        opt.update(loss, accelerator)
        total += loss.detach()
    mean_loss = float(total) / max(steps, 1)  # syncs the device before the clock stops
    seconds = time.perf_counter() - t0
    return {
        "loss": mean_loss,
        "views_per_s": 2 * steps * batches.global_batch / seconds if seconds > 0 else 0.0,
        "epoch_seconds": seconds,
    }


def classifier_steps(
    model: nn.Module,
    opt: OptimState,
    batches: MixedBatches,
    aug: AugmentConfig,
    gen: torch.Generator,
    accelerator: Any,
    label_smoothing: float,
) -> dict[str, float]:
    """One optimizer step per batch of ``batches``, each freshly augmented from ``gen``.

    ``gen`` draws a batch's indices and then its augmentation, batch after batch.
    Returns the mean training loss and accuracy and images/s on this rank.
    """
    model.train()
    device = batches.labeled_x.device
    total, correct, seen, t0 = torch.zeros((), device=device), torch.zeros((), device=device), 0, time.perf_counter()
    for xb, yb in batches.draw(gen):
        x = augment(to_float(xb), aug, gen)
        with accelerator.autocast():
            logits = model(_channels_last(x))
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        opt.update(loss, accelerator)
        total += loss.detach()
        correct += (logits.argmax(1) == yb).sum()
        seen += yb.numel()
    train_loss, train_acc = float(total) / batches.steps, float(correct) / max(seen, 1)  # device sync
    seconds = time.perf_counter() - t0
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "images_per_s": batches.steps * batches.batch_size / seconds if seconds > 0 else 0.0,
    }


# On a CPU, forward passes of 128 images run 2.0-2.5x as fast as passes of 2048 (2-core AMD
# EPYC, the cpu profile's width-16 CNN: 58,900 pool images in 4.8 s against 9.5 s;
# benchmarks/RESULTS.md), likely because a small batch's activations stay closer in the
# cache hierarchy. GPUs want large batches; there the caller's size holds.
CPU_FORWARD_BATCH = 128


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 2048, autocast: Any = None) -> torch.Tensor:
    """Logits (N, C) in float32 for uint8 images (N, C, S, S), in eval mode.

    ``batch_size`` images per forward pass at most; on a CPU at most ``CPU_FORWARD_BATCH``.
    """
    was_training = model.training
    model.eval()
    if images.device.type == "cpu":
        batch_size = min(batch_size, CPU_FORWARD_BATCH)
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
def predict_probs_tta(model: nn.Module, images: torch.Tensor, aug: AugmentConfig, views: int, seed: int = 0,
                      batch_size: int = 2048, plain: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax probabilities (N, C) of uint8 images (N, C, S, S), averaged over the plain image and
    ``views`` augmented copies (test-time augmentation; ``views`` = 0: the plain softmax).

    The copies are drawn from a generator seeded with ``seed``, so a model's predictions repeat
    from run to run on one device. ``plain``: the plain softmax of these images, when the caller
    has it already (it is not recomputed).
    """
    # the caller's tensor is copied (the views are added in place); a fresh one needs no copy
    probs = plain.clone() if plain is not None else F.softmax(predict_logits(model, images, batch_size), dim=1)
    if views == 0 or images.shape[0] == 0:
        return probs
    was_training = model.training
    model.eval()
    if images.device.type == "cpu":
        batch_size = min(batch_size, CPU_FORWARD_BATCH)
    gen = make_generator(seed, images.device)
    for i in range(0, images.shape[0], batch_size):
        x = to_float(images[i: i + batch_size])
        for _ in range(views):
            probs[i: i + batch_size] += F.softmax(model(_channels_last(augment(x, aug, gen))).float(), dim=1)
    model.train(was_training)
    return probs / (views + 1)


def tta_recipe(aug: AugmentConfig, views: int, strength: float) -> dict[str, Any] | None:
    """How a model file says it predicts: ``views`` copies augmented like ``aug`` at ``strength``
    (plain types only, so the file still loads with ``weights_only=True``); None when ``views`` = 0."""
    if views == 0:
        return None
    return {"views": int(views), "augment": {**asdict(aug), "strength": float(strength)}}


def read_tta_recipe(tta: dict[str, Any]) -> tuple[AugmentConfig, int]:
    """The augmentation and the number of views of a ``tta_recipe`` (as read back from a file).

    Raises ValueError, in one line, when the recipe does not read: a file written by hand or by
    another version must not fail halfway through a prediction."""
    try:
        aug = AugmentConfig(**tta["augment"])
        aug.validate()
        views = int(tta["views"])
    except Exception as e:  # noqa: BLE001 - any malformed recipe means the same thing to the caller
        raise ValueError(f"{type(e).__name__}: {e}".splitlines()[0]) from None
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    return aug, views


def predict_probs(model: nn.Module, images: torch.Tensor, tta: dict[str, Any] | None = None,
                  batch_size: int = 2048, plain: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax probabilities of uint8 images, with the test-time augmentation ``tta`` (a
    ``tta_recipe``) when given. ``plain``: the plain softmax of these images when the caller has
    it; without ``tta`` it is returned as it is, with ``tta`` the mean starts from a copy."""
    if not tta:
        return plain if plain is not None else F.softmax(predict_logits(model, images, batch_size), dim=1)
    aug, views = read_tta_recipe(tta)
    return predict_probs_tta(model, images, aug, views, batch_size=batch_size, plain=plain)


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
