"""The one config system: defaults, YAML and key=value overrides, coercion, validation, and the CLI's exit code 2."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.config import (
    Config,
    ConfigError,
    all_keys,
    apply_overrides,
    config_from_dict,
    flatten_yaml,
    help_text,
    load_config,
    parse_assignments,
    to_yaml,
)


def _write(path, text):
    path.write_text(text)
    return path


# --- defaults --------------------------------------------------------------------------------


def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert load_config() == cfg


def test_every_key_has_help_and_a_section():
    keys = all_keys()
    sections = {f.name for f in dataclasses.fields(Config)}
    assert len(keys) > 50
    for key, f in keys.items():
        section, name = key.split(".")
        assert section in sections
        assert f.metadata.get("help"), f"{key} has no help text"


def test_list_defaults_are_not_shared():
    a, b = Config(), Config()
    assert a.pipeline.seeds == b.pipeline.seeds
    assert a.pipeline.seeds is not b.pipeline.seeds


# --- YAML and key=value ------------------------------------------------------------------------


def test_yaml_overrides_then_assignments_win(tmp_path):
    f = _write(tmp_path / "c.yaml", "pretrain:\n  epochs: 3\n  lr: 0.01\nmodel:\n  width: 16\n")
    cfg = load_config(f, ["pretrain.epochs=5"])
    assert cfg.pretrain.epochs == 5  # key=value beats the file
    assert cfg.pretrain.lr == 0.01  # the file beats the default
    assert cfg.model.width == 16
    assert cfg.pretrain.temperature == Config().pretrain.temperature  # untouched keys keep defaults


def test_later_assignment_wins():
    assert load_config(None, ["pretrain.epochs=5", "pretrain.epochs=7"]).pretrain.epochs == 7


@pytest.mark.parametrize("text, words", [
    ("pretrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n", "key 'epochs' is given twice (lines 2 and 4)"),
    ("pretrain:\n  epochs: 3\npretrain:\n  lr: 0.1\n", "key 'pretrain' is given twice (lines 1 and 3)"),
    ("pretrain: {epochs: 3, epochs: 4}\n", "key 'epochs' is given twice"),
    ("pretrain:\n  epochs: 3\npretrain.epochs: 4\n", "key 'pretrain.epochs' is given twice"),
])
def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path, text, words):
    f = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert words in str(e.value) and str(f) in str(e.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """Keys a merge (``<<: *base``) brings in are not duplicates: the mapping's own key wins, as in YAML."""
    from toolkit.config.parsing import safe_load_unique

    assert safe_load_unique("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n") == {"a": {"x": 1, "y": 2}, "c": {"x": 5, "y": 2}}
    with pytest.raises(Exception, match="could not determine a constructor"):  # still safe_load's tags only
        safe_load_unique("a: !!python/object/apply:os.system [echo]\n")


@pytest.mark.parametrize("args, words", [
    (["run.backend=gpu", "run.backend=local"], "run.backend='gpu' is not allowed"),
    (["pretrain.epochs=0", "pretrain.epochs=2"], "pretrain.epochs=0 is not allowed"),
    (["pretrain.epochs=abc", "pretrain.epochs=2"], "expected an integer"),
])
def test_every_value_given_is_checked_even_when_a_later_one_wins(args, words):
    with pytest.raises(ConfigError, match="overridden by a later value") as e:
        load_config(None, args)
    assert words in str(e.value)


def test_a_file_value_overridden_on_the_command_line_is_still_checked(tmp_path):
    f = _write(tmp_path / "c.yaml", "run:\n  backend: gpu\n")
    with pytest.raises(ConfigError, match=r"run.backend='gpu' is not allowed.*given in config file"):
        load_config(f, ["run.backend=local"])
    # a valid value overridden later is fine: the later one wins
    assert load_config(_write(tmp_path / "ok.yaml", "run:\n  backend: ray\n"), ["run.backend=local"]).run.backend == "local"


def test_base_config_is_the_starting_point():
    base = Config().replace(**{"model.width": 16})
    cfg = load_config(None, ["model.depth=2"], base=base)
    assert (cfg.model.width, cfg.model.depth) == (16, 2)


def test_yaml_dotted_keys_and_nesting_mix(tmp_path):
    f = _write(tmp_path / "c.yaml", "pretrain.epochs: 4\nsplit:\n  seed: 3\nray.num_workers: 1\n")
    cfg = load_config(f)
    assert (cfg.pretrain.epochs, cfg.split.seed, cfg.ray.num_workers) == (4, 3, 1)


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(_write(tmp_path / "c.yaml", "# nothing\n")) == Config()


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "c.yaml", "- 1\n- 2\n"))


def test_flatten_yaml():
    assert flatten_yaml({"a": {"b": 1, "c": {"d": [1, 2]}}, "e.f": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e.f": "x"}


def test_parse_assignments_splits_on_first_equals():
    assert parse_assignments(["model.init=simclr:a=b", "run.name="]) == {"model.init": "simclr:a=b", "run.name": ""}
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["pretrain.epochs"])


def test_replace_takes_dotted_keys_and_validates():
    cfg = Config().replace(**{"split.seed": 4, "model.width": 8})
    assert (cfg.split.seed, cfg.model.width) == (4, 8)
    assert Config().split.seed == 0  # frozen: the original is untouched
    with pytest.raises(ConfigError, match="model.width"):
        Config().replace(**{"model.width": 4})


# --- coercion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment, key, expected", [
    ("pretrain.epochs=5", "pretrain.epochs", 5),
    ("pretrain.epochs=5.0", "pretrain.epochs", 5),
    ("pretrain.lr=0.01", "pretrain.lr", 0.01),
    ("pretrain.lr=2", "pretrain.lr", 2.0),
    ("pretrain.lr=.5", "pretrain.lr", 0.5),
    ("ray.use_gpu=true", "ray.use_gpu", True),
    ("ray.use_gpu=True", "ray.use_gpu", True),
    ("tracking.enabled=false", "tracking.enabled", False),
    ("pipeline.seeds=[0, 1, 2]", "pipeline.seeds", [0, 1, 2]),
    ("pipeline.seeds=7", "pipeline.seeds", [7]),
    ("pipeline.stages=[pretrain,probe]", "pipeline.stages", ["pretrain", "probe"]),
    ("run.name=123", "run.name", "123"),
    ("run.name=", "run.name", ""),
    ("model.init=simclr:runs/x/model.pt", "model.init", "simclr:runs/x/model.pt"),
])
def test_assignment_coercion(assignment, key, expected):
    cfg = load_config(None, [assignment])
    got = cfg.flat()[key]
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("assignment, key, expected", [
    # PyYAML (YAML 1.1) reads these as strings; they are how everybody writes learning rates
    ("pretrain.lr=1e-3", "pretrain.lr", 1e-3),
    ("classifier.lr=3e-4", "classifier.lr", 3e-4),
    ("pretrain.weight_decay=5E-4", "pretrain.weight_decay", 5e-4),
    ("augment.strength=1.5e0", "augment.strength", 1.5),
])
def test_scientific_notation_floats(assignment, key, expected):
    assert load_config(None, [assignment]).flat()[key] == pytest.approx(expected)


def test_scientific_notation_floats_in_yaml(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", "pretrain:\n  lr: 3e-4\n"))
    assert cfg.pretrain.lr == pytest.approx(3e-4)


def test_yaml_values_are_coerced_like_assignments(tmp_path):
    f = _write(tmp_path / "c.yaml", "pretrain:\n  epochs: 2.0\n  lr: 1\nrun:\n  name: 42\npipeline:\n  seeds: 5\n")
    cfg = load_config(f)
    assert cfg.pretrain.epochs == 2 and type(cfg.pretrain.epochs) is int
    assert cfg.pretrain.lr == 1.0 and type(cfg.pretrain.lr) is float
    assert cfg.run.name == "42"
    assert cfg.pipeline.seeds == [5]


@pytest.mark.parametrize("assignment, key", [
    ("pretrain.epochs=2.5", "pretrain.epochs"),
    ("pretrain.epochs=many", "pretrain.epochs"),
    ("pretrain.epochs=true", "pretrain.epochs"),
    ("pretrain.lr=fast", "pretrain.lr"),
    ("pretrain.lr=false", "pretrain.lr"),
    ("ray.use_gpu=1", "ray.use_gpu"),
    ("ray.use_gpu=maybe", "ray.use_gpu"),
    ("pipeline.seeds=[a]", "pipeline.seeds"),
])
def test_wrong_types_name_the_key(assignment, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [assignment])


# --- unknown keys and impossible values --------------------------------------------------------


@pytest.mark.parametrize("key, suggestion", [
    ("pretrain.epoch", "pretrain.epochs"),
    ("pretrian.epochs", "pretrain.epochs"),
    ("model.widht", "model.width"),
    ("pseudolabel.treshold_start", "pseudolabel.threshold_start"),
])
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=1"])
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_in_yaml_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'pretrain\.epochs'"):
        load_config(_write(tmp_path / "c.yaml", "pretrain:\n  epoch: 3\n"))


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ConfigError, match="--help"):
        load_config(None, ["zzzzzz.qqqqqq=1"])


@pytest.mark.parametrize("overrides, key", [
    ({"pretrain.lr": -0.1}, "pretrain.lr"),
    ({"pretrain.lr": 0}, "pretrain.lr"),
    ({"classifier.lr": -1}, "classifier.lr"),
    ({"pretrain.temperature": 0}, "pretrain.temperature"),
    ({"pretrain.temperature": -0.5}, "pretrain.temperature"),
    ({"pseudolabel.threshold_start": 0}, "pseudolabel.threshold_start"),
    ({"pseudolabel.threshold_start": 1.01}, "pseudolabel.threshold_start"),
    ({"pseudolabel.threshold_floor": 0}, "pseudolabel.threshold_floor"),
    ({"pseudolabel.threshold_floor": 1.5}, "pseudolabel.threshold_floor"),
    ({"pseudolabel.threshold_start": 0.9, "pseudolabel.threshold_floor": 0.95}, "pseudolabel.threshold_floor"),
    ({"pseudolabel.schedule": "sawtooth"}, "pseudolabel.schedule"),
    ({"pseudolabel.schedule": "exponential", "pseudolabel.threshold_rate": 1.0}, "pseudolabel.threshold_rate"),
    # the schedule would raise at round 0: the config checks with the schedule's own rule
    ({"pseudolabel.schedule": "step", "pseudolabel.threshold_rate": 2.0}, "pseudolabel.threshold_rate"),
    ({"pseudolabel.mode": "twice"}, "pseudolabel.mode"),
    ({"run.backend": "slurm"}, "run.backend"),
    ({"run.device": "tpu"}, "run.device"),
    ({"model.depth": 5}, "model.depth"),
    ({"model.init": "imagenet"}, "model.init"),
    ({"augment.erase_prob": 1.5}, "augment.erase_prob"),
    ({"augment.scale_min": 1.3}, "augment.scale_min"),
    ({"split.labels_per_class": 0}, "split.labels_per_class"),
    ({"pipeline.seeds": []}, "pipeline.seeds"),
    ({"pipeline.stages": ["pretrain", "finetune"]}, "pipeline.stages"),
    ({"pipeline.tune": True, "pipeline.stages": ["pretrain", "iterative"]}, "pipeline.tune"),
    ({"tune.search": "grid"}, "tune.search"),
    ({"student.tta_views": -1}, "student.tta_views"),
    ({"student.tta_strength": -0.5}, "student.tta_strength"),
])
def test_impossible_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        Config().replace(**overrides)
    assert str(e.value).startswith(f"{key}=")


@pytest.mark.parametrize("overrides", [
    {"pseudolabel.threshold_start": 1.0, "pseudolabel.threshold_floor": 1.0},
    {"pseudolabel.threshold_start": 0.5, "pseudolabel.threshold_floor": 0.5},
    {"pseudolabel.schedule": "step", "pseudolabel.threshold_rate": 1.0},
    {"augment.strength": 0},
    {"run.backend": "local"},
])
def test_edge_values_are_allowed(overrides):
    Config().replace(**overrides)


# --- round trips and digests --------------------------------------------------------------------


def _changed() -> Config:
    return Config().replace(**{
        "pipeline.seeds": [0, 1, 2], "pipeline.stages": ["pretrain", "probe"], "pretrain.lr": 0.005,
        "model.init": "simclr:abc", "run.name": "exp", "ray.use_gpu": True, "tracking.enabled": False,
    })


@pytest.mark.parametrize("make", [Config, _changed])
def test_config_from_dict_round_trip(make):
    cfg = make()
    assert config_from_dict(cfg.to_dict()) == cfg
    # and through JSON, as stored in checkpoints and MLflow artifacts
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_yaml_round_trip(tmp_path):
    cfg = _changed()
    assert load_config(_write(tmp_path / "full.yaml", to_yaml(cfg))) == cfg
    assert load_config(_write(tmp_path / "diff.yaml", to_yaml(cfg, only_changed=True))) == cfg


def test_to_yaml_only_changed_lists_the_changes():
    import yaml

    assert yaml.safe_load(to_yaml(Config(), only_changed=True)) == {}
    assert yaml.safe_load(to_yaml(Config().replace(**{"model.width": 16}), only_changed=True)) == {"model": {"width": 16}}


def test_flat_has_every_key():
    assert set(Config().flat()) == set(all_keys())


def test_digest_matches_a_slow_reference():
    cfg = _changed()
    ref = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    assert cfg.digest() == ref
    part = {"data": dataclasses.asdict(cfg.data), "model": dataclasses.asdict(cfg.model)}
    assert cfg.digest("data", "model") == hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:10]


def test_digest_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert a.digest() == b.digest() == Config().replace().digest()
    assert len(a.digest()) == 10
    assert config_from_dict(a.to_dict()).digest() == a.digest()
    seen = {a.digest()}
    for overrides in ({"split.seed": 1}, {"pretrain.lr": 0.0021}, {"run.name": "x"}, {"pipeline.seeds": [0, 1]},
                      {"ray.use_gpu": True}):
        d = a.replace(**overrides).digest()
        assert d not in seen, overrides
        seen.add(d)


def test_section_digest_ignores_other_sections():
    a = Config()
    b = a.replace(**{"run.name": "other", "ray.num_workers": 4})
    assert a.digest("data", "split", "model") == b.digest("data", "split", "model")
    assert a.digest() != b.digest()
    assert a.digest("split") != a.replace(**{"split.seed": 1}).digest("split")


# --- help ------------------------------------------------------------------------------------------


def test_help_text_lists_every_key_with_its_default():
    text = help_text()
    defaults = Config().flat()
    assert set(defaults) == set(all_keys())
    for key, value in defaults.items():
        assert f"  {key}={json.dumps(value)}\n" in text, key
        assert all_keys()[key].metadata["help"] in text


def test_help_text_of_some_sections():
    text = help_text(("pretrain", "ray"))
    assert "[pretrain]" in text and "[ray]" in text
    assert "pretrain.epochs=20" in text and "ray.num_workers=2" in text
    assert "classifier.steps" not in text and "[data]" not in text


def test_cli_help_lists_the_command_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "pretrain.temperature=0.2" in out and "split.labels_per_class=10" in out
    assert "pseudolabel.rounds" not in out


# --- CLI: bad input is one line on stderr and exit code 2 ----------------------------------------


def _one_error_line(capsys, command="pretrain") -> str:
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"toolkit {command}: error: ")
    return lines[0]


def _safe_args(tmp_path, data_root=None) -> list[str]:
    # keep anything a command might write inside tmp_path, and MLflow off unless a test wants it
    args = [f"run.output_dir={tmp_path / 'runs'}", "tracking.enabled=false"]
    if data_root:
        args.append(f"run.data_root={data_root}")
    return args


def test_cli_no_command_is_exit_2(capsys):
    assert main([]) == 2


def test_cli_unknown_key(tmp_path, capsys):
    assert main(["pretrain", "--backend", "local", "pretrain.epoch=3", *_safe_args(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert "'pretrain.epoch'" in line and "did you mean 'pretrain.epochs'" in line


def test_cli_impossible_value(tmp_path, capsys):
    assert main(["pretrain", "--backend", "local", "pretrain.temperature=0", *_safe_args(tmp_path)]) == 2
    assert "pretrain.temperature=0" in _one_error_line(capsys)


def test_cli_assignment_without_equals(tmp_path, capsys):
    assert main(["pretrain", "pretrain.epochs", *_safe_args(tmp_path)]) == 2
    assert "key=value" in _one_error_line(capsys)


def test_cli_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["pretrain", "--config", str(missing), *_safe_args(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert str(missing) in line and "does not exist" in line


def test_cli_invalid_yaml(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", "pretrain:\n  epochs: [1, 2\n  lr: {\n")
    assert main(["probe", "-c", str(bad), *_safe_args(tmp_path)]) == 2
    line = _one_error_line(capsys, "probe")
    assert str(bad) in line and "not valid YAML" in line


def test_cli_unknown_key_in_config_file(tmp_path, capsys):
    f = _write(tmp_path / "c.yaml", "model:\n  widht: 16\n")
    assert main(["pretrain", "-c", str(f), *_safe_args(tmp_path)]) == 2
    assert "did you mean 'model.width'" in _one_error_line(capsys)


def test_cli_labels_per_class_larger_than_a_class(tmp_path, data_root, capsys):
    argv = ["pretrain", "--backend", "local", "data.train_subset=3000", "split.labels_per_class=1000",
            *_safe_args(tmp_path, data_root)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "split.labels_per_class=1000" in line and "training images" in line


def test_cli_missing_data_on_the_ray_backend_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    import toolkit.execution.backends as backends

    def no_ray(cfg):
        raise RuntimeError("Ray was started before the data was checked")

    monkeypatch.setattr(backends, "init_ray", no_ray)
    assert main(["pretrain", f"run.data_root={tmp_path / 'nodata'}", *_safe_args(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert "MNIST file missing" in line and str(tmp_path / "nodata") in line


def test_cli_use_gpu_without_gpu(tmp_path, data_root, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    argv = ["pretrain", "--backend", "local", "ray.use_gpu=true", "data.train_subset=3000", "data.test_subset=500",
            "split.val_size=200", "model.width=8", *_safe_args(tmp_path, data_root)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "ray.use_gpu" in line and "GPU" in line


def test_cli_in_process_classifiers_asked_for_a_gpu_without_one_fail_before_anything_runs(tmp_path, data_root, capsys,
                                                                                           monkeypatch):
    """run.classifiers_local with ray.use_gpu=true: the classifiers would train on this process's CPU.
    The pipeline fails in one line naming the switch, before Ray starts (not after pretraining);
    pretrain alone trains no classifier, so there the switch does not matter."""
    import torch

    import toolkit.execution.backends as backends
    import toolkit.cli as cli

    def no_ray(cfg):
        raise RuntimeError("Ray was started before the GPU was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(backends, "init_ray", no_ray)
    argv = ["ray.use_gpu=true", "run.classifiers_local=true", "data.train_subset=3000", "data.test_subset=500",
            "split.val_size=200", "model.width=8", *_safe_args(tmp_path, data_root)]
    assert main(["pipeline", *argv]) == 2
    line = _one_error_line(capsys, "pipeline")
    # an embedded Ray has this machine's GPUs: none here, none there, whatever trains where
    assert "ray.use_gpu=true is not allowed" in line and "GPU" in line
    assert main(["pretrain", *argv]) == 2
    assert "ray.use_gpu=true is not allowed" in _one_error_line(capsys, "pretrain")
    # the in-process switch with a GPU asked of the driver's own device
    device_argv = [a for a in argv if a != "ray.use_gpu=true"] + ["run.device=cuda"]
    assert main(["pipeline", *device_argv]) == 2
    assert "run.classifiers_local=true is not allowed" in _one_error_line(capsys, "pipeline")
    # on a Ray cluster the GPUs are its nodes': pretraining goes ahead (Ray is asked once it is up)
    seen = []
    monkeypatch.setattr(cli, "_dispatch", lambda command: lambda study, execution: seen.append((study, execution)))
    import toolkit.preflight as preflight

    monkeypatch.setattr(preflight, "check_ray_address_reachable", lambda cfg: None)  # no head here
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert cli.main(["pretrain", *argv]) == 0 and len(seen) == 1


def test_cli_hands_the_study_and_the_execution_to_the_command(tmp_path, monkeypatch):
    import toolkit.cli as cli
    from toolkit.config import Execution, Study

    seen = []
    monkeypatch.setattr(cli, "_dispatch", lambda command: lambda study, execution: seen.append((study, execution)))
    f = _write(tmp_path / "c.yaml", "run:\n  backend: ray\npretrain:\n  epochs: 3\n")
    assert cli.main(["pretrain", "-c", str(f), "--backend", "local", "pretrain.epochs=4", "run.backend=ray"]) == 0
    ((study, execution),) = seen
    assert type(study) is Study and type(execution) is Execution  # two objects, never the whole config
    assert execution.run.backend == "local"  # --backend is the last override
    assert study.pretrain.epochs == 4
    assert Path(execution.run.output_dir).is_absolute()  # resolved once, at the CLI


def test_apply_overrides_reports_the_first_bad_key_only():
    with pytest.raises(ConfigError, match=r"pretrain\.epoch'"):
        apply_overrides(Config(), {"pretrain.epoch": 1, "model.widht": 2})
