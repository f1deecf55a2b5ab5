"""Online consistency training inside the classifier loop (``consistency.weight`` > 0): it trains, it logs
its own figures, it reads no label beyond the labeled ones, and it is part of the stage's study."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.config import Config, stage_digest


def test_consistency_settings_move_the_classifier_stages_and_nothing_else():
    base = Config().study
    on = base.replace(**{"consistency.weight": 1.0})
    for stage in ("supervised", "pseudolabel", "student", "tune"):
        assert stage_digest(base, stage) != stage_digest(on, stage), stage
    for stage in ("pretrain", "probe"):
        assert stage_digest(base, stage) == stage_digest(on, stage), stage


@pytest.mark.parametrize("bad", [{"consistency.weight": -1}, {"consistency.threshold_floor": 0.99},
                                 {"consistency.schedule": "sometimes"}, {"consistency.ema_decay": 1.0}])
def test_impossible_consistency_settings_are_refused(bad):
    from toolkit.config import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        Config().replace(**bad)


def test_a_classifier_trains_with_the_consistency_term_and_reads_no_pool_label(tiny_config, monkeypatch, tmp_path):
    """The supervised stage with FixMatch's term on: finite losses, a mask rate in [0, 1], the schedule's
    threshold per chunk; and training again with every label outside the labeled set replaced by garbage
    in the worker's data gives the same weights to the last bit (no pool or validation label is read)."""
    import toolkit.engine.workers as workers
    from toolkit.datasets.training_data import load_image_data
    from toolkit.stages.supervised import supervised

    cfg = tiny_config.replace(**{"classifier.steps": 20, "classifier.eval_every": 10, "consistency.weight": 1.0,
                                 "consistency.threshold_start": 0.9, "consistency.threshold_floor": 0.5,
                                 "consistency.schedule": "linear", "consistency.class_adaptive": True,
                                 "consistency.distribution_alignment": True, "tracking.enabled": False,
                                 "run.threads": 1})
    seen = []
    real = workers.consistency_steps

    def spy(model, opt, batches, pool, setup, gen, accelerator):
        out = real(model, opt, batches, pool, setup, gen, accelerator)
        seen.append((setup["threshold"], out))
        return out

    monkeypatch.setattr(workers, "consistency_steps", spy)
    clean = supervised(cfg.study, cfg.execution)
    assert [t for t, _ in seen] == [0.9, 0.5]  # the linear schedule over the two chunks
    for _, out in seen:
        assert math.isfinite(out["unlabeled_loss"]) and 0.0 <= out["mask_rate"] <= 1.0
    assert math.isfinite(clean.metrics["test_acc"])

    from toolkit.stages.data_inputs import load_data_and_split

    _, split = load_data_and_split(cfg.study, cfg.execution)

    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        d = load_image_data(*args, **kwargs)
        labels = (d.train_labels + 3) % 10
        labels[split.labeled] = d.train_labels[split.labeled]
        return d.__class__(**{**d.__dict__, "train_labels": labels})

    monkeypatch.setattr(workers, "load_image_data", poisoned)
    other = cfg.replace(**{"run.output_dir": str(tmp_path / "poisoned")})
    dirty = supervised(other.study, other.execution)
    assert calls, "the worker did not read the poisoned data"
    weights = [torch.load(r.model_path, weights_only=True)["state_dict"] for r in (clean, dirty)]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_the_teacher_follows_the_student(tiny_config):
    """The EMA teacher starts as the student and moves toward it: after steps it differs from its start."""
    from toolkit.config import AugmentConfig, ConsistencyConfig
    from toolkit.engine.consistency_loop import ConsistencyState, consistency_steps
    from toolkit.engine.loops import MixedBatches, OptimState
    from toolkit.maths.augment import make_generator
    from toolkit.maths.models import Classifier

    class _Plain:
        def autocast(self):
            return torch.autocast("cpu", enabled=False)

        def backward(self, loss):
            loss.backward()

    torch.manual_seed(0)
    model = Classifier(tiny_config.model)
    x = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(20) % 10
    state = ConsistencyState.start(model, y, 10)
    start = {k: v.clone() for k, v in state.teacher.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    setup = {"aug": AugmentConfig(), "consistency": ConsistencyConfig(weight=1.0, threshold_start=0.1,
                                                                     threshold_floor=0.1),
             "state": state, "threshold": 0.1, "label_smoothing": 0.0, "plain": model, "step": 0}
    out = consistency_steps(model, OptimState(opt, sched), MixedBatches(x, y, None, None, 3, 8, 1.0),
                            torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8), setup,
                            make_generator(0, "cpu"), _Plain())
    assert out["mask_rate"] > 0
    moved = [k for k, v in state.teacher.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved
    for p in state.teacher.parameters():
        assert not p.requires_grad
