"""The engine's loops and batch sources on the synthetic digits (``fake_mnist_root``): real digits do not matter here.

2-worker DDP equality of the same loops is in tests/test_train_ray.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.maths.augment import make_generator
from toolkit.config import Study
from toolkit.datasets.mnist import load_mnist
from toolkit.engine.loops import (CPU_FORWARD_BATCH, EpochBatches, MixedBatches, OptimState, classifier_steps, evaluate,
                            predict_logits, simclr_epoch)
from toolkit.maths.models import Classifier, SimCLRModel


class _NoAccelerator:
    """The two Accelerate calls the loops make, in one plain CPU process."""

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def backward(self, loss):
        loss.backward()


@pytest.fixture(scope="module")
def fake(fake_mnist_root):
    return load_mnist(fake_mnist_root, train_subset=600, test_subset=300)


def _opt(model, lr=3e-3, decay=True):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = (lambda step: 1.0 / (1 + step)) if decay else (lambda step: 1.0)
    return OptimState(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_global_batch_without_overlap(fake, world):
    images = torch.arange(103)  # stands for 103 images: the slices are what matters
    whole = list(EpochBatches(images, 16, seed=3, epoch=1))
    per_rank = [list(EpochBatches(images, 16, 3, 1, rank, world)) for rank in range(world)]
    assert len(whole) == 103 // 16 and all(len(p) == len(whole) for p in per_rank)  # ragged tail dropped
    for step, batch in enumerate(whole):
        assert torch.equal(torch.cat([p[step] for p in per_rank]), batch)
    seen = torch.cat(whole)
    assert seen.unique().numel() == seen.numel() == 16 * (103 // 16)  # no image twice in an epoch
    # another epoch, another order; the same epoch, the same order
    assert not torch.equal(torch.cat(list(EpochBatches(images, 16, 3, 2))), seen)
    assert torch.equal(torch.cat(list(EpochBatches(images, 16, 3, 1))), seen)


def test_mixed_batches_draw_the_labeled_share_from_the_true_labels(fake):
    lx, ly = fake.train_images[:20], fake.train_labels[:20]
    px, py = fake.train_images[100:300], (fake.train_labels[100:300] + 1) % 10  # pseudo-labels told apart
    mix = MixedBatches(lx, ly, px, py, steps=3, batch_size=10, labeled_fraction=0.3)
    assert mix.n_labeled == 3
    batches = list(mix.draw(make_generator(0, "cpu")))
    assert len(batches) == 3
    for xb, yb in batches:
        assert xb.shape == (10, 28, 28) and xb.dtype == torch.uint8 and yb.shape == (10,)
        for x, y in zip(xb[:3], yb[:3]):  # true labels first
            assert any(torch.equal(x, t) and y == t_y for t, t_y in zip(lx, ly))
        for x, y in zip(xb[3:], yb[3:]):
            assert any(torch.equal(x, t) and y == t_y for t, t_y in zip(px, py))
    no_pseudo = MixedBatches(lx, ly, None, None, steps=1, batch_size=10, labeled_fraction=0.3)
    assert no_pseudo.n_labeled == 10
    # the same generator seed gives the same batches
    again = list(mix.draw(make_generator(0, "cpu")))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_optim_state_steps_the_schedule_after_the_optimizer():
    p = torch.nn.Parameter(torch.ones(1))
    opt = _opt(torch.nn.ParameterList([p]), lr=0.1)
    opt.update((p * 2).sum(), _NoAccelerator())
    assert p.item() == pytest.approx(1 - 0.1, abs=1e-6)  # Adam's first step moves by lr
    assert opt.scheduler.get_last_lr()[0] == pytest.approx(0.05)  # 0.1 / (1 + 1)


def test_classifier_steps_learn_the_fake_digits(fake):
    # no augmentation: the fake classes differ by where their bars are, which shifts would blur
    cfg = Study().replace(**{"model.width": 8, "augment.strength": 0.0})
    torch.manual_seed(0)
    model = Classifier(cfg.model).to(memory_format=torch.channels_last)
    before = evaluate(model, fake.test_images, fake.test_labels)
    opt = _opt(model, lr=1e-2, decay=False)
    batches = MixedBatches(fake.train_images[:100], fake.train_labels[:100], None, None, steps=10, batch_size=16,
                           labeled_fraction=1.0)
    first = classifier_steps(model, opt, batches, cfg.augment, make_generator(0, "cpu"), _NoAccelerator(), 0.0)
    second = classifier_steps(model, opt, batches, cfg.augment, make_generator(1, "cpu"), _NoAccelerator(), 0.0)
    after = evaluate(model, fake.test_images, fake.test_labels)
    # seen: training loss 1.61 -> 1.02 between the halves, test loss 2.31 -> 0.61; a loop that does
    # not learn stays near ln 10 = 2.3
    assert second["train_loss"] < 0.8 * first["train_loss"], (first, second)
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert first["images_per_s"] > 0


def test_simclr_epoch_is_deterministic_and_moves_the_weights(fake):
    cfg = Study().replace(**{"model.width": 8})

    def run():
        torch.manual_seed(0)
        model = SimCLRModel(cfg.model).to(memory_format=torch.channels_last)
        start = [p.detach().clone() for p in model.parameters()]
        stats = simclr_epoch(model, _opt(model), EpochBatches(fake.train_images[:96], 32, 0, 0), cfg.augment,
                             cfg.pretrain.temperature, make_generator(5, "cpu"), _NoAccelerator())
        moved = max((p.detach() - s).abs().max().item() for p, s in zip(model.parameters(), start))
        return stats, moved, [p.detach() for p in model.parameters()]

    stats, moved, weights = run()
    again, _, weights_again = run()
    assert stats["loss"] == again["loss"] and all(torch.equal(a, b) for a, b in zip(weights, weights_again))
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0 and moved > 0
    # 3 steps x 32 images x 2 views
    assert stats["views_per_s"] == pytest.approx(2 * 3 * 32 / stats["epoch_seconds"])


class BatchRecorder(torch.nn.Module):
    """A linear classifier that records the size of every forward pass."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(28 * 28, 10)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return self.lin(x.flatten(1))


def test_cpu_predictions_run_in_small_forward_passes_with_the_same_logits():
    torch.manual_seed(0)
    model = BatchRecorder()
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    logits = predict_logits(model, images, batch_size=2048)
    # on a CPU the caller's 2048 is capped: small passes stay in the cache
    assert model.seen == [CPU_FORWARD_BATCH, CPU_FORWARD_BATCH, 300 - 2 * CPU_FORWARD_BATCH]
    model.seen.clear()
    assert predict_logits(model, images, batch_size=100).shape == (300, 10) and model.seen == [100, 100, 100]
    row_by_row = torch.cat([predict_logits(model, images[i: i + 1]) for i in range(300)])
    assert torch.allclose(logits, row_by_row, atol=1e-5)
    assert model.training  # the mode it came in with


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_predictions_keep_the_callers_batch():
    model = BatchRecorder().cuda()
    images = torch.randint(0, 256, (3000, 28, 28), dtype=torch.uint8, device="cuda")
    assert predict_logits(model, images, batch_size=2048).shape == (3000, 10)
    assert model.seen == [2048, 952]


def test_test_time_augmentation_averages_the_plain_image_and_seeded_views():
    from dataclasses import replace

    from toolkit.config import AugmentConfig
    from toolkit.engine.loops import predict_probs, predict_probs_tta, tta_recipe

    torch.manual_seed(0)
    model = BatchRecorder()
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    plain = predict_logits(model, images).softmax(1)
    aug = AugmentConfig()
    assert torch.allclose(predict_probs_tta(model, images, aug, views=0), plain)
    assert tta_recipe(aug, 0, 0.5) is None and torch.allclose(predict_probs(model, images, None), plain)
    model.seen.clear()
    tta = predict_probs_tta(model, images, aug, views=3, seed=7)
    # the plain pass and 3 augmented passes, each in the CPU's small forward passes
    assert sum(model.seen) == 4 * 300 and max(model.seen) <= CPU_FORWARD_BATCH
    assert torch.allclose(tta.sum(1), torch.ones(300), atol=1e-5)
    assert (tta - plain).abs().max() > 1e-3  # the views are not the plain image
    assert torch.allclose(tta, predict_probs_tta(model, images, aug, views=3, seed=7))  # seeded: it repeats
    assert not torch.allclose(tta, predict_probs_tta(model, images, aug, views=3, seed=8))
    # the mean itself: the plain softmax plus each view's, over 4
    g = make_generator(7, "cpu")
    from toolkit.maths.augment import augment
    from toolkit.datasets.mnist import to_float
    manual = plain.clone()
    for i in range(0, 300, CPU_FORWARD_BATCH):
        x = to_float(images[i: i + CPU_FORWARD_BATCH])
        for _ in range(3):
            manual[i: i + CPU_FORWARD_BATCH] += model(augment(x, aug, g)).softmax(1)
    assert torch.allclose(tta, manual / 4, atol=1e-5)
    # the recipe a model file carries: plain types, the strength replaced, the same predictions
    recipe = tta_recipe(aug, 3, 0.5)
    assert recipe == {"views": 3, "augment": {**vars(replace(aug, strength=0.5))}}
    assert torch.allclose(predict_probs(model, images, recipe),
                          predict_probs_tta(model, images, replace(aug, strength=0.5), views=3), atol=1e-6)
    # a plain softmax the caller already has is the mean's first term, and no plain pass runs for it
    model.seen.clear()
    given = predict_probs(model, images, recipe, plain=plain)
    assert sum(model.seen) == 3 * 300  # the views alone
    assert torch.allclose(given, predict_probs(model, images, recipe), atol=1e-6)
    assert torch.equal(plain, predict_logits(model, images).softmax(1))  # the caller's tensor is left as it was
    assert model.training  # the mode it came in with


@pytest.mark.parametrize("recipe, words", [
    ({"views": 4, "augment": {"strength": 0.5, "swirl": 3.0}}, "swirl"),
    ({"views": 4}, "KeyError"),
    ({"views": -1, "augment": {"strength": 0.5}}, "views must be >= 0"),
    ({"views": "many", "augment": {}}, "ValueError"),
    ({"views": 4, "augment": {"blur_prob": 2.0}}, "augment.blur_prob"),
])
def test_a_recipe_that_does_not_read_is_one_valueerror_line(recipe, words):
    from toolkit.engine.loops import read_tta_recipe

    with pytest.raises(ValueError) as e:
        read_tta_recipe(recipe)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_written_recipe_reads_back():
    from toolkit.config import AugmentConfig
    from toolkit.engine.loops import read_tta_recipe, tta_recipe

    aug, views = read_tta_recipe(tta_recipe(AugmentConfig(), 8, 0.5))
    assert views == 8 and aug == AugmentConfig(strength=0.5)
