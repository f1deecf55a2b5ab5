"""The search-space language of `toolkit tune` (``toolkit.config.search_space``): parsing, validation, the point -> config
map, the base point and best.yaml. Pure: no Ray, no MLflow, milliseconds per test."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import yaml

from toolkit.config import search_space as ss
from toolkit.config import (
    EXECUTION_SECTIONS, Config, ConfigError, Execution, Study, all_keys, load_config, result_keys,
)

GAP, FLOOR, START = ss.GAP, "pseudolabel.threshold_floor", "pseudolabel.threshold_start"
EXECUTION_KEYS = set(all_keys(Execution))  # where or how a run executes: exactly the keys of EXECUTION_SECTIONS


def is_execution(key: str) -> bool:
    return key.split(".")[0] in EXECUTION_SECTIONS


def builtin(base: Study = Study(), **kw) -> ss.SearchSpace:
    text, source = ss.read_space(base)
    return ss.parse_space(text, source, base, **kw)


def sample(space: ss.SearchSpace, rng: random.Random) -> dict:
    """A point drawn from the space as Ray Tune draws it (randint's upper end included, as the file says)."""
    point = {}
    for key, (domain, values) in space.entries.items():
        if domain == "choice":
            point[key] = rng.choice(values)
        elif domain == "uniform":
            point[key] = rng.uniform(*values)
        elif domain == "loguniform":
            point[key] = math.exp(rng.uniform(math.log(values[0]), math.log(values[1])))
        else:
            point[key] = rng.randint(*values)
    return point


# --------------------------------------------------------------------------- which keys


def test_tunable_keys_derive_from_the_stage_map():
    tunable = set(ss.tunable_keys())
    decides = set(result_keys("pseudolabel"))
    assert GAP in tunable and FLOOR in tunable and "classifier.lr" in tunable and "augment.strength" in tunable
    # everything else that decides a pseudo-labeling result is tunable, less the shared images, seed and mode
    assert tunable - {GAP} == {k for k in decides if k.split(".")[0] not in ("data", "split")} - set(ss.FIXED_KEYS)
    assert EXECUTION_KEYS and all(is_execution(k) for k in EXECUTION_KEYS)
    assert not {k for k in tunable if k != GAP and is_execution(k)}
    assert not EXECUTION_KEYS & tunable
    assert not {"pretrain.epochs", "probe.knn_k", "tune.num_samples", "model.seed", "split.seed"} & tunable


def test_reproduce_keys_are_the_result_keys_less_the_images():
    keys = ss.reproduce_keys()
    assert set(keys) == {k for k in result_keys("pseudolabel") if not k.startswith("data.")}
    assert "model.seed" in keys and "split.seed" in keys and "pseudolabel.mode" in keys
    assert not any(is_execution(k) for k in keys) and not EXECUTION_KEYS & set(keys)


@pytest.mark.parametrize("key, why", [
    ("split.seed", "same images"),
    ("data.train_subset", "same images"),
    ("model.seed", "seed is noise"),
    ("pseudolabel.mode", "iterative"),
    ("inference.backend", "where or how a run executes"),
    ("run.threads", "where or how a run executes"),
    ("ray.num_workers", "where or how a run executes"),
    ("pretrain.epochs", "does not decide a pseudo-labeling"),
    ("tune.num_samples", "does not decide a pseudo-labeling"),
])
def test_untunable_keys_say_why(key, why):
    default = all_keys()[key].default
    with pytest.raises(ConfigError) as e:
        ss.parse_space(f"{key}: {{choice: [{yaml.safe_dump(default).splitlines()[0]}]}}\n", "t", Study())
    assert f"'{key}' cannot be tuned" in str(e.value) and why in str(e.value)


# --------------------------------------------------------------------------- parsing


def test_builtin_space_parses_and_drops_simclr_without_a_checkpoint():
    space = builtin()
    assert space.source == "built-in"
    assert {"pseudolabel.schedule", START, GAP, "pseudolabel.threshold_rate", "pseudolabel.rounds",
            "pseudolabel.steps_per_round", "classifier.lr", "pseudolabel.per_class_cap",
            "pseudolabel.warm_start"} <= set(space.entries)
    assert FLOOR not in space.entries  # the floor is derived from the gap, never sampled
    assert "model.init" not in space.entries and space.notes  # scratch base config: nothing to choose
    assert ss.CLASS_ADAPTIVE in space.entries["pseudolabel.schedule"][1]
    assert space.max_rounds == 8
    assert builtin(simclr="/ckpt/simclr.pt").entries["model.init"] == ("choice", ["scratch", "simclr"])
    assert "model.init" not in builtin(simclr="/ckpt/simclr.pt", base_model="/m.pt").entries


def test_launch_cpu_space_parses_on_its_profile():
    study = load_config("launch/configs/tune_cpu.yaml").study
    space = ss.parse_space(open(study.tune.space).read(), study.tune.space, study)
    assert GAP in space.entries and FLOOR not in space.entries and space.max_rounds == 4
    # the profile's hand-picked linear 0.99 -> 0.9 is a point of it: the search starts there
    point = ss.base_point(study, space)
    assert point is not None and point[GAP] == pytest.approx(0.09)
    assert ss.trial_config(study, point).pseudolabel == study.pseudolabel


@pytest.mark.parametrize("text, words", [
    ("pseudolabel.treshold_start: {uniform: [0.9, 0.99]}", ["pseudolabel.treshold_start", START]),
    ("pseudolabel.treshold_gap: {uniform: [0.0, 0.1]}", ["pseudolabel.treshold_gap", GAP]),
    ("pseudolabel.rounds: {uniform: [2, 5]}", ["pseudolabel.rounds", "randint"]),
    ("pseudolabel.threshold_start: {uniform: [0.9, 1.5]}", ["pseudolabel.threshold_start=1.5"]),
    ("pseudolabel.schedule: {choice: [linear, quadratic]}", ["pseudolabel.schedule='quadratic'", "class-adaptive"]),
    ("classifier.lr: {loguniform: [0, 0.1]}", ["classifier.lr", "lo > 0"]),
    ("classifier.lr: {normal: [0, 0.1]}", ["classifier.lr", "choice"]),
    ("classifier.lr: {uniform: [0.1, .inf]}", ["must be a finite number"]),
    ("split.seed: {choice: [0, 1]}", ["split.seed", "cannot be tuned"]),
    ("inference.backend: {choice: [ray, local]}", ["inference.backend", "cannot be tuned"]),
    ("augment.strength: {choice: [class-adaptive]}", ["only a value of pseudolabel.schedule"]),
    # the reparametrisation: nothing the file allows may need moving later
    ("pseudolabel.threshold_gap: {uniform: [-0.1, 0.1]}", [GAP, "lo >= 0"]),
    ("pseudolabel.threshold_gap: {choice: [0.1, wide]}", [GAP, "needs numbers"]),
    ("pseudolabel.threshold_start: {choice: [high]}\npseudolabel.threshold_gap: {uniform: [0.0, 0.1]}",
     ["pseudolabel.threshold_start='high'", "expected a number"]),
    ("pseudolabel.threshold_gap: {randint: [0, 1]}", [GAP, "is for integer keys", "takes float: use uniform"]),
    ("pseudolabel.threshold_start: {uniform: [0.5, 0.99]}\npseudolabel.threshold_gap: {uniform: [0.0, 0.6]}",
     [FLOOR, "(0, 1]", "threshold_start=0.5", "threshold_gap=0.6"]),
    ("pseudolabel.threshold_start: {uniform: [0.8, 0.99]}\npseudolabel.threshold_floor: {uniform: [0.5, 0.95]}",
     [FLOOR, "must be <= threshold_start", f"search '{GAP}'"]),
    ("pseudolabel.threshold_gap: {uniform: [0.0, 0.1]}\npseudolabel.threshold_floor: {uniform: [0.5, 0.6]}",
     ["both set the floor"]),
    ("pseudolabel.schedule: {choice: [linear, exponential]}\npseudolabel.threshold_rate: {uniform: [0.05, 1.0]}",
     ["pseudolabel.threshold_rate=1.0", "exponential", "schedule='exponential'"]),
    ("pseudolabel.schedule: {choice: [step, class-adaptive]}\npseudolabel.class_adaptive: {choice: [true, false]}",
     ["pseudolabel.class_adaptive", "search one of them"]),
    ("pseudolabel.rounds: {randint: [1, 2]}\n", ["tune.grace_rounds=3"]),  # fine alone; grace_rounds=3 is not
])
def test_bad_space_is_a_config_error_naming_the_key(text, words):
    cfg = Study().replace(**{"tune.grace_rounds": 3})
    with pytest.raises(ConfigError) as e:
        ss.parse_space(text, "space.yaml", cfg)
    for w in words:
        assert w in str(e.value)


def test_rate_range_checked_against_the_base_schedule_when_the_schedule_is_not_searched():
    text = "pseudolabel.threshold_rate: {uniform: [0.1, 1.0]}\n"
    assert ss.parse_space(text, "t", Study().replace(**{"pseudolabel.schedule": "step"})).entries
    with pytest.raises(ConfigError, match="exponential"):
        ss.parse_space(text, "t", Study().replace(**{"pseudolabel.schedule": "exponential",
                                                      "pseudolabel.threshold_rate": 0.5}))


def test_a_clash_outside_the_threshold_keys_is_left_to_the_trial():
    # each value is valid alone; every pair is not (scale_min > scale_max): the trials fail, readably
    space = ss.parse_space("augment.scale_min: {choice: [1.15]}\naugment.scale_max: {choice: [0.9, 0.95]}\n", "t", Study())
    with pytest.raises(ConfigError, match="augment.scale_min"):
        ss.trial_config(Study(), {"augment.scale_min": 1.15, "augment.scale_max": 0.9})
    assert set(space.entries) == {"augment.scale_min", "augment.scale_max"}


def test_read_space_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="tune.space .*does not exist"):
        ss.read_space(Study().replace(**{"tune.space": str(tmp_path / "nope.yaml")}))
    (tmp_path / "s.yaml").write_text("classifier.lr: {choice: [0.001]}\n")
    text, source = ss.read_space(Study().replace(**{"tune.space": str(tmp_path / "s.yaml")}))
    assert text.startswith("classifier.lr") and source == str(tmp_path / "s.yaml")


# --------------------------------------------------------------------------- a point -> its trial config


def test_every_sampled_point_runs_exactly_as_sampled():
    """The reparametrised built-in space: 1,000 random points, each a valid config holding the sampled values."""
    base = Study()
    space = builtin(simclr="/ckpt/simclr.pt")
    rng = random.Random(0)
    kinds = set()
    for _ in range(1000):
        point = sample(space, rng)
        cfg = ss.trial_config(base, point, simclr="/ckpt/simclr.pt")  # never raises: nothing to repair
        pc = cfg.pseudolabel
        assert pc.threshold_start == point[START]
        assert abs(pc.threshold_floor - (point[START] - point[GAP])) < 1e-15 and 0 < pc.threshold_floor <= pc.threshold_start
        assert pc.threshold_rate == point["pseudolabel.threshold_rate"]
        assert cfg.classifier.lr == point["classifier.lr"] and pc.rounds == point["pseudolabel.rounds"]
        assert ss.schedule_kind(cfg) == point["pseudolabel.schedule"]
        assert cfg.model.init == ("scratch" if point["model.init"] == "scratch" else "simclr:/ckpt/simclr.pt")
        kinds.add(ss.schedule_kind(cfg))
    assert kinds == {"constant", "linear", "exponential", "cosine", "step", ss.CLASS_ADAPTIVE}


def test_point_overrides_map_the_special_values_and_the_gap():
    base = Study()
    ov = ss.point_overrides(base, {"pseudolabel.schedule": ss.CLASS_ADAPTIVE, GAP: 0.25})
    assert ov == {"pseudolabel.schedule": "constant", "pseudolabel.class_adaptive": True, FLOOR: 0.74}  # not 0.7399999999999999
    assert ss.point_overrides(base, {START: 0.95, GAP: 0.0}) == {START: 0.95, FLOOR: 0.95}
    assert ss.trial_config(base, {"model.init": "simclr"}, simclr="/abs/simclr.pt").model.init == "simclr:/abs/simclr.pt"
    with pytest.raises(ConfigError, match="model.init"):
        ss.trial_config(base, {"model.init": "simclr"})


def test_an_invalid_point_is_an_error_never_a_moved_point():
    base = Study()
    with pytest.raises(ConfigError, match="pseudolabel.threshold_floor"):  # a floor above the start
        ss.trial_config(base, {START: 0.9, FLOOR: 0.95})
    with pytest.raises(ConfigError, match="pseudolabel.threshold_rate"):
        ss.trial_config(base, {"pseudolabel.schedule": "exponential", "pseudolabel.threshold_rate": 1.7})
    with pytest.raises(ConfigError, match="pseudolabel.threshold_rate"):
        ss.trial_config(base, {"pseudolabel.schedule": "step", "pseudolabel.threshold_rate": 1.7})


def test_trial_values_hold_the_gap_as_sampled_and_the_floor_it_set():
    space = ss.parse_space("pseudolabel.threshold_start: {uniform: [0.9, 0.99]}\n"
                           "pseudolabel.threshold_gap: {uniform: [0.0, 0.2]}\n"
                           "pseudolabel.schedule: {choice: [linear, class-adaptive]}\n", "t", Study())
    assert space.columns() == [START, GAP, FLOOR, "pseudolabel.schedule"]
    assert space.config_keys() == [START, FLOOR, "pseudolabel.schedule"]
    point = {START: 0.95, GAP: 0.1, "pseudolabel.schedule": ss.CLASS_ADAPTIVE}
    values = ss.trial_values(space, ss.trial_config(Study(), point), point)
    assert values == {START: 0.95, GAP: 0.1, FLOOR: 0.85, "pseudolabel.schedule": "constant"}


def test_param_space_is_the_only_place_ray_is_imported():
    code = ("import sys, toolkit.config.search_space as s; from toolkit.config import Study;"
            "text, src = s.read_space(Study()); s.parse_space(text, src, Study());"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- the base point


def test_base_point_is_the_hand_picked_schedule_when_it_lies_in_the_space():
    space_text = """
pseudolabel.schedule: {choice: [linear, cosine, class-adaptive]}
pseudolabel.threshold_start: {uniform: [0.9, 0.999]}
pseudolabel.rounds: {randint: [2, 4]}
pseudolabel.warm_start: {choice: [true, false]}
"""
    base = Study().replace(**{"pseudolabel.rounds": 3})
    space = ss.parse_space(space_text, "test", base)
    assert ss.base_point(base, space) == {"pseudolabel.schedule": "linear", START: 0.99,
                                          "pseudolabel.rounds": 3, "pseudolabel.warm_start": True}
    adaptive = base.replace(**{"pseudolabel.schedule": "constant", "pseudolabel.class_adaptive": True})
    assert ss.base_point(adaptive, space)["pseudolabel.schedule"] == "class-adaptive"
    # a base value outside the space: no base trial (the sampled trials alone)
    assert ss.base_point(base.replace(**{"pseudolabel.rounds": 5}), space) is None
    assert ss.base_point(base.replace(**{"pseudolabel.schedule": "step"}), space) is None


def test_base_point_gap_gives_the_base_floor_back_exactly():
    space = ss.parse_space("pseudolabel.threshold_gap: {uniform: [0.0, 0.99]}\n", "t", Study().replace(**{START: 1.0}))
    for start in [s / 1000 for s in range(500, 1001, 23)]:  # floors as people write them, far below the start too
        for floor in [f / 1000 for f in range(10, int(start * 1000) + 1, 41)]:
            base = Study().replace(**{START: start, FLOOR: floor})
            point = ss.base_point(base, space)
            assert point is not None and ss.trial_config(base, point) == base, (start, floor)
    rng = random.Random(1)
    for _ in range(200):  # any float: off by at most a float step of the start
        start = rng.uniform(0.5, 1.0)
        base = Study().replace(**{START: start, FLOOR: rng.uniform(0.01, start)})
        floor = ss.trial_config(base, ss.base_point(base, space)).pseudolabel.threshold_floor
        assert abs(floor - base.pseudolabel.threshold_floor) <= math.ulp(start)
    narrow = ss.parse_space("pseudolabel.threshold_gap: {uniform: [0.0, 0.05]}\n", "t", Study())
    assert ss.base_point(Study(), narrow) is None  # the default gap 0.99 - 0.9 lies outside


# --------------------------------------------------------------------------- best.yaml


def test_best_overrides_carry_what_decides_the_result_and_load_on_the_defaults(tmp_path):
    # the base config's floor (0.5) is non-default and the tuned start (0.7) is below the default floor (0.9)
    # the config file also sets where and how it ran (execution keys): the study alone reaches best.yaml
    cfg = Config().replace(**{FLOOR: 0.5, "classifier.steps": 30, "model.width": 8,
                              "data.train_subset": 3000, "run.output_dir": "/elsewhere", "model.seed": 3,
                              "inference.actors": 4, "run.threads": 2, "tracking.experiment": "x"})
    base = cfg.study
    tuned = ss.trial_config(base, {START: 0.7, "pseudolabel.schedule": "linear"})
    ov = ss.best_overrides(base, tuned, [START, "pseudolabel.schedule"])
    # the trial's model and training, not the default ones
    assert ov[FLOOR] == 0.5 and ov["classifier.steps"] == 30 and ov["model.width"] == 8
    assert ov["model.seed"] == 3 and ov["pseudolabel.mode"] == "iterative"
    assert ov["pseudolabel.schedule"] == "linear" and ov["pseudolabel.class_adaptive"] is False
    # never where or how it ran, nor the images
    assert not any(is_execution(k) or k.startswith("data.") for k in ov) and not EXECUTION_KEYS & set(ov)
    p = tmp_path / "best.yaml"
    p.write_text(yaml.safe_dump(ss.nested(ov)))
    loaded = load_config(p)
    assert loaded.pseudolabel.threshold_start == 0.7 and loaded.pseudolabel.threshold_floor == 0.5
    assert loaded.pseudolabel == tuned.pseudolabel
    # the execution the base config set stays behind: best.yaml loads onto the default execution
    assert loaded.execution == Execution() and loaded.inference.actors != cfg.inference.actors
    assert loaded.model == tuned.model and loaded.classifier == tuned.classifier and loaded.split == tuned.split


def test_best_yaml_of_a_gap_space_holds_the_floor_not_the_gap(tmp_path):
    space = ss.parse_space("pseudolabel.threshold_gap: {uniform: [0.0, 0.3]}\n", "t", Study())
    tuned = ss.trial_config(Study(), {GAP: 0.2})
    ov = ss.best_overrides(Study(), tuned, space.config_keys())
    assert GAP not in ov and ov[FLOOR] == 0.79
    p = tmp_path / "best.yaml"
    p.write_text(yaml.safe_dump(ss.nested(ov)))
    assert load_config(p).pseudolabel.threshold_floor == 0.79  # what `toolkit pseudolabel --config` reads
