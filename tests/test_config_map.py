"""The one map from stage to config (``config.STAGE_SECTIONS``) and one default per setting.

Every config key either decides a stage's result, and then changing it changes the stage
key of every stage whose sections hold it (and of no other), or it is declared
infrastructure (where and how a run executes), and then it changes no stage key. A key in
neither is an error: a new section must be given to the stages that read it or declared
infrastructure. No data are needed: these tests look at configs only.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from toolkit import config, data, engine, losses, probes, pseudo_labels, schedules
from toolkit.config import (
    INFRASTRUCTURE_KEYS,
    INFRASTRUCTURE_SECTIONS,
    STAGE_SECTIONS,
    Config,
    ConfigError,
    all_keys,
    is_infrastructure,
    stage_digest,
)

# A valid value other than the default, for keys whose default cannot simply be nudged
# (strings with a fixed vocabulary or a format, lists). Other keys are found by _other_value.
OTHER_VALUES = {
    "data.root": "/elsewhere/mnist",
    "model.init": "simclr:/elsewhere/model.pt",
    "probe.checkpoint": "/elsewhere/simclr.pt",
    "pseudolabel.mode": "oneshot",
    "pseudolabel.schedule": "cosine",
    "pseudolabel.inference": "local",
    "tune.space": "/elsewhere/space.yaml",
    "tune.search": "optuna",
    "pipeline.seeds": [0, 1],
    "student.teachers": ["/elsewhere/model.pt"],
    "pipeline.stages": ["pretrain", "probe"],
    "report.run_id": "0123456789abcdef0123456789abcdef",
    "ray.address": "ray://head:10001",
    "ray.storage_path": "/shared/ray",
    "tracking.uri": "sqlite:///elsewhere.db",
    "tracking.experiment": "another",
    "run.name": "another-run",
    "run.output_dir": "elsewhere",
    "run.backend": "local",
    "run.device": "cpu",
}

TRAINING_STAGES = ("pretrain", "probe", "supervised", "pseudolabel", "tune", "pipeline")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _other_value(key: str, default):
    """A value != default that ``Config`` accepts for ``key`` (all other keys at their defaults)."""
    if key in OTHER_VALUES:
        candidates = [OTHER_VALUES[key]]
    elif isinstance(default, bool):
        candidates = [not default]
    elif isinstance(default, int):
        candidates = [default + 1, default - 1, default * 2]
    elif isinstance(default, float):
        candidates = [default * 0.5, default + 0.01, default - 0.01, default * 1.1, default + 1.0, 0.5]
    elif isinstance(default, str):
        candidates = ["another", "x.yaml"]
    else:
        candidates = []
    for value in candidates:
        if value == default:
            continue
        try:
            Config().replace(**{key: value})
        except ConfigError:
            continue
        return value
    pytest.fail(f"no valid value other than {default!r} found for {key}: add one to OTHER_VALUES")


KEYS = list(all_keys().items())


@pytest.mark.parametrize("key,field", KEYS, ids=[k for k, _ in KEYS])
def test_each_key_changes_exactly_the_stage_keys_that_use_it(key, field):
    section = key.split(".")[0]
    base = Config()
    changed = base.replace(**{key: _other_value(key, _default(field))})
    for stage, sections in STAGE_SECTIONS.items():
        uses = section in sections and not is_infrastructure(key)
        moved = stage_digest(changed, stage) != stage_digest(base, stage)
        assert moved == uses, (
            f"{key}: the {stage} stage key {'changed' if moved else 'did not change'}, but {key} "
            f"{'decides' if uses else 'does not decide'} its result")


def test_every_key_is_used_by_a_stage_or_declared_infrastructure():
    used = {s for sections in STAGE_SECTIONS.values() for s in sections}
    orphans = [k for k in all_keys() if k.split(".")[0] not in used and not is_infrastructure(k)]
    assert not orphans, (f"{orphans} decide no stage's result and are not infrastructure: add their section to "
                         "config.STAGE_SECTIONS or declare them in INFRASTRUCTURE_SECTIONS / INFRASTRUCTURE_KEYS")


def test_the_map_names_only_real_sections_and_keys():
    # a typo here would silently turn a key into a result key, or drop a section from a stage key
    sections = {k.split(".")[0] for k in all_keys()}
    for stage, stage_sections in STAGE_SECTIONS.items():
        assert set(stage_sections) <= sections, stage
    assert set(INFRASTRUCTURE_SECTIONS) <= sections
    assert INFRASTRUCTURE_KEYS <= set(all_keys())


def test_every_training_stage_depends_on_some_result_key():
    for stage in TRAINING_STAGES:
        assert config.result_keys(stage), stage


@pytest.mark.parametrize("key", ["run.seed", "split.seed"])
def test_seeds_change_the_key_of_every_training_stage(key):
    base = Config()
    changed = base.replace(**{key: 1})
    for stage in TRAINING_STAGES:
        assert stage_digest(changed, stage) != stage_digest(base, stage), f"{key} does not change the {stage} key"


def test_where_and_how_a_run_executes_changes_no_stage_key():
    base = Config()
    changed = base.replace(**{
        "ray.num_workers": 4, "ray.use_gpu": True, "tracking.uri": "sqlite:///other.db", "run.output_dir": "other",
        "run.backend": "local", "run.device": "cpu", "run.threads": 2, "data.root": "/other",
        "pseudolabel.inference": "local", "tune.max_concurrent": 4,
    })
    for stage in STAGE_SECTIONS:
        assert stage_digest(changed, stage) == stage_digest(base, stage), stage


# --- one default per setting ---------------------------------------------------------------------

# (function, parameter, config key): the same setting. The function either has no default
# for it (callers pass the config's value) or the config's default.
SAME_SETTING = [
    (schedules.exponential_threshold, "rate", "pseudolabel.threshold_rate"),
    (schedules.step_threshold, "rate", "pseudolabel.threshold_rate"),
    (schedules.step_threshold, "step_every", "pseudolabel.step_every"),
    (probes.knn_predict, "k", "probe.knn_k"),
    (losses.nt_xent_loss, "temperature", "pretrain.temperature"),
    (data.make_split, "labels_per_class", "split.labels_per_class"),
    (data.make_split, "val_size", "split.val_size"),
    (data.make_split, "seed", "split.seed"),
    (data.load_mnist, "train_subset", "data.train_subset"),
    (data.load_mnist, "test_subset", "data.test_subset"),
    (data.load_mnist, "download", "data.download"),
    (engine.classifier_steps, "label_smoothing", "classifier.label_smoothing"),
    (pseudo_labels.select_pseudo_labels, "class_adaptive", "pseudolabel.class_adaptive"),
]


@pytest.mark.parametrize("fn,param,key", SAME_SETTING, ids=[f"{f.__name__}.{p}" for f, p, _ in SAME_SETTING])
def test_a_function_default_is_the_config_default(fn, param, key):
    default = inspect.signature(fn).parameters[param].default
    if default is not inspect.Parameter.empty:
        assert default == _default(all_keys()[key]), f"{fn.__name__}({param}={default!r}) but {key} defaults otherwise"


def test_knn_default_k_is_the_probe_config_k():
    assert inspect.signature(probes.knn_predict).parameters["k"].default == config.ProbeConfig().knn_k


def test_the_threshold_schedules_have_no_rate_of_their_own():
    # threshold_at's None means "not given": a schedule that reads the rate refuses to guess one
    for kind in ("exponential", "step"):
        with pytest.raises(ValueError, match="rate is required"):
            schedules.threshold_at(1, kind, 0.99, 0.9, 5, step_every=1)


def test_the_default_config_runs_every_schedule_with_its_own_rate():
    pc = config.PseudoLabelConfig()
    for kind in schedules.THRESHOLD_SCHEDULES:
        values = [schedules.threshold_at(r, kind, pc.threshold_start, pc.threshold_floor, pc.rounds,
                                         pc.threshold_rate, pc.step_every) for r in range(pc.rounds)]
        assert values[0] == pc.threshold_start and all(pc.threshold_floor <= v <= pc.threshold_start for v in values)
    # exponential at the config's rate 0.5: the gap to the floor halves each round
    exp = [schedules.threshold_at(r, "exponential", 0.99, 0.9, 5, pc.threshold_rate, pc.step_every) for r in range(5)]
    assert exp == pytest.approx([0.99, 0.945, 0.9225, 0.91125, 0.905625], abs=1e-12)


def test_schedule_names_live_in_schedules():
    assert config.THRESHOLD_SCHEDULES is schedules.THRESHOLD_SCHEDULES
    for kind in schedules.THRESHOLD_SCHEDULES:
        assert Config().replace(**{"pseudolabel.schedule": kind}).pseudolabel.schedule == kind
    with pytest.raises(ConfigError, match="^pseudolabel.schedule="):
        Config().replace(**{"pseudolabel.schedule": "polynomial"})


@pytest.mark.parametrize("kind", ["exponential", "step"])
@pytest.mark.parametrize("rate", [0.02, 0.5, 0.99, 1.0, 1.5])
def test_the_config_accepts_exactly_the_rates_the_schedule_runs(kind, rate):
    try:
        schedules.threshold_at(0, kind, 0.99, 0.9, 5, rate, 1)
        runs = True
    except ValueError:
        runs = False
    try:
        Config().replace(**{"pseudolabel.schedule": kind, "pseudolabel.threshold_rate": rate})
        accepted = True
    except ConfigError as e:
        assert str(e).startswith("pseudolabel.threshold_rate=")
        accepted = False
    assert accepted == runs
