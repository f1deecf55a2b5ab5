"""The one map from stage to study sections (``config.STAGE_SECTIONS``), the study / execution
split, and one default per setting.

A stage's key is a plain hash of the study sections it uses. Every study key changes the key of
every stage whose sections hold it (and of no other); every execution key (where and how a run
executes) changes no stage key, by construction: the execution is another object, and no list
of exceptions exists. No data are needed: these tests look at configs only.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from toolkit import config
from toolkit.datasets import mnist as data
from toolkit.engine import loops as engine
from toolkit.maths import losses
from toolkit.maths import probes
from toolkit.maths import selection as pseudo_labels
from toolkit.maths import schedules
from toolkit.config import (
    EXECUTION_SECTIONS,
    STAGE_SECTIONS,
    STUDY_SECTIONS,
    Config,
    ConfigError,
    Execution,
    Study,
    all_keys,
    stage_digest,
)

# A valid value other than the default, for keys whose default cannot simply be nudged
# (strings with a fixed vocabulary or a format, lists). Other keys are found by _other_value.
OTHER_VALUES = {
    "consistency.schedule": "cosine",
    "data.image_size": 32,
    "data.name": "cifar10",
    "model.name": "resnet18",
    "run.data_root": "/elsewhere/mnist",
    "model.init": "simclr:/elsewhere/model.pt",
    "probe.checkpoint": "/elsewhere/simclr.pt",
    "pseudolabel.mode": "oneshot",
    "pseudolabel.schedule": "cosine",
    "inference.backend": "local",
    "tune.space": "/elsewhere/space.yaml",
    "tune.search": "optuna",
    "tune.objective": "label_folds",
    "student.smooth_space": "pixels",
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
STUDY_KEYS = [(k, f) for k, f in KEYS if k.split(".")[0] in STUDY_SECTIONS]
EXECUTION_KEYS = [(k, f) for k, f in KEYS if k.split(".")[0] in EXECUTION_SECTIONS]


def test_every_key_belongs_to_the_study_or_the_execution_and_not_both():
    assert set(STUDY_SECTIONS).isdisjoint(EXECUTION_SECTIONS)
    assert {k.split(".")[0] for k in all_keys()} == set(STUDY_SECTIONS) | set(EXECUTION_SECTIONS)
    assert set(all_keys()) == set(all_keys(Study)) | set(all_keys(Execution))


@pytest.mark.parametrize("key,field", STUDY_KEYS, ids=[k for k, _ in STUDY_KEYS])
def test_each_study_key_changes_exactly_the_stage_keys_that_use_it(key, field):
    section = key.split(".")[0]
    base = Config()
    changed = base.replace(**{key: _other_value(key, _default(field))})
    for stage, sections in STAGE_SECTIONS.items():
        uses = section in sections
        moved = stage_digest(changed.study, stage) != stage_digest(base.study, stage)
        assert moved == uses, (
            f"{key}: the {stage} stage key {'changed' if moved else 'did not change'}, but {key} "
            f"{'decides' if uses else 'does not decide'} its result")


@pytest.mark.parametrize("key,field", EXECUTION_KEYS, ids=[k for k, _ in EXECUTION_KEYS])
def test_each_execution_key_changes_no_stage_key(key, field):
    base = Config()
    changed = base.replace(**{key: _other_value(key, _default(field))})
    assert changed.execution != base.execution and changed.study == base.study
    for stage in STAGE_SECTIONS:
        assert stage_digest(changed.study, stage) == stage_digest(base.study, stage), (key, stage)


def test_a_stage_key_is_a_plain_hash_of_its_study_sections():
    import hashlib
    import json

    study = Config().replace(**{"split.seed": 3, "model.width": 16}).study
    for stage, sections in STAGE_SECTIONS.items():
        d = {s: dataclasses.asdict(getattr(study, s)) for s in sections}
        assert stage_digest(study, stage) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def test_every_study_section_decides_some_stage():
    used = {s for sections in STAGE_SECTIONS.values() for s in sections}
    assert used == set(STUDY_SECTIONS), set(STUDY_SECTIONS) - used


def test_the_map_names_only_study_sections():
    # a typo here would silently drop a section from a stage key; an execution section would move keys
    for stage, stage_sections in STAGE_SECTIONS.items():
        assert set(stage_sections) <= set(STUDY_SECTIONS), stage


def test_every_training_stage_depends_on_some_result_key():
    for stage in TRAINING_STAGES:
        assert config.result_keys(stage), stage


@pytest.mark.parametrize("key", ["model.seed", "split.seed"])
def test_seeds_change_the_key_of_every_training_stage(key):
    base = Config()
    changed = base.replace(**{key: 1})
    for stage in TRAINING_STAGES:
        assert stage_digest(changed.study, stage) != stage_digest(base.study, stage), f"{key} does not change the {stage} key"


def test_the_study_and_the_execution_refuse_each_others_keys():
    with pytest.raises(ConfigError, match="'run.backend' is not a key of the study"):
        Study().replace(**{"run.backend": "local"})
    with pytest.raises(ConfigError, match="'split.seed' is not a key of the execution"):
        Execution().replace(**{"split.seed": 1})
    cfg = Config().replace(**{"split.seed": 4, "run.backend": "local"})
    assert Config.of(cfg.study, cfg.execution) == cfg


def test_the_classifiers_backend_is_chosen_not_rewritten(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one_machine = Execution().replace(**{"run.classifiers_local": True})
    assert one_machine.backend_for("classifier") == "local" and one_machine.backend_for("simclr") == "ray"
    assert one_machine.run.backend == "ray"  # the setting itself is left as the user wrote it
    cluster = one_machine.replace(**{"ray.address": "ray://head:10001"})
    assert cluster.backend_for("classifier") == "ray"
    local = Execution().replace(**{"run.backend": "local"})
    assert local.backend_for("simclr") == local.backend_for("classifier") == "local"


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
    (data.load_mnist, "download", "run.download"),
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
