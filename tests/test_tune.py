"""`toolkit tune`: the search space rules, and real Ray Tune searches on 3,000 real MNIST images.

One Ray session for the module. The main search (4 trials, 2..3 rounds, ASHA with
grace 1 and reduction factor 2) runs once and several tests read it; a second small
search checks that an interrupted search is restored without redoing finished trials,
a third that crashing trials are recorded without stopping the search.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from toolkit.config import Config, ConfigError, flatten_yaml, load_config, to_yaml
from toolkit.stages import tune as tune_stage
from toolkit.stages.common import RESULT_FILE

# learning rates from 1e-5 (barely moves) to 1e-2: trials differ clearly, so ASHA has something to stop
SPACE = """
pseudolabel.schedule: {choice: [linear, exponential, class-adaptive]}
pseudolabel.threshold_start: {uniform: [0.8, 0.99]}
pseudolabel.threshold_floor: {uniform: [0.5, 0.95]}
pseudolabel.rounds: {randint: [2, 3]}
classifier.lr: {loguniform: [1e-5, 1e-2]}
"""
SPACE_KEYS = set(yaml.safe_load(SPACE))
MAX_ROUNDS = 3
POOL_SUBSET = 1500  # trials split the first 100 + 200 + 1,500 images


def tiny(root: Path, data_root: str, space: str = SPACE, **over) -> Config:
    """3,000 images, width 8, 30 + 20-step rounds, sqlite MLflow under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "space.yaml").write_text(space)
    return Config().replace(**{
        "data.root": data_root,
        "data.train_subset": 3000,
        "data.test_subset": 500,
        "split.val_size": 200,
        "model.width": 8,
        "classifier.steps": 30,
        "classifier.eval_every": 30,
        "classifier.warmup_steps": 5,
        "pseudolabel.steps_per_round": 20,
        "tune.space": str(root / "space.yaml"),
        "tune.num_samples": 4,
        "tune.max_concurrent": 2,
        "tune.grace_rounds": 1,
        "tune.reduction_factor": 2,
        "tune.max_failures": 0,
        "run.output_dir": str(root / "runs"),
        "tracking.uri": f"sqlite:///{root}/mlflow.db",
        **over,
    })


def client_for(cfg: Config):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    return client, client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def child_runs(cfg: Config, parent_run_id: str):
    client, exp = client_for(cfg)
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def trial_runs(cfg: Config):
    client, exp = client_for(cfg)
    return client.search_runs([exp], filter_string="tags.`toolkit.command` = 'tune-trial'")


def read_rows(folder: Path) -> list[dict]:
    with (folder / tune_stage.RESULTS_FILE).open() as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- the space, no Ray


def test_builtin_space_parses_and_drops_simclr_without_a_checkpoint():
    text, source = tune_stage.read_space(Config())
    space = tune_stage.parse_space(text, source, Config())
    assert source == "built-in"
    assert {"pseudolabel.schedule", "pseudolabel.threshold_start", "pseudolabel.threshold_floor",
            "pseudolabel.threshold_rate", "pseudolabel.rounds", "pseudolabel.steps_per_round", "classifier.lr",
            "pseudolabel.per_class_cap", "pseudolabel.warm_start"} <= set(space.entries)
    assert "model.init" not in space.entries and space.notes  # scratch base config: nothing to choose
    assert tune_stage.CLASS_ADAPTIVE in space.entries["pseudolabel.schedule"][1]
    assert space.max_rounds == 8
    with_simclr = tune_stage.parse_space(text, source, Config(), simclr="/ckpt/simclr.pt")
    assert with_simclr.entries["model.init"] == ("choice", ["scratch", "simclr"])
    assert "model.init" not in tune_stage.parse_space(text, source, Config(), "/ckpt/simclr.pt", base_model="/m.pt").entries


@pytest.mark.parametrize("text, words", [
    ("pseudolabel.treshold_start: {uniform: [0.9, 0.99]}", ["pseudolabel.treshold_start", "pseudolabel.threshold_start"]),
    ("pseudolabel.rounds: {uniform: [2, 5]}", ["pseudolabel.rounds", "randint"]),
    ("pseudolabel.threshold_start: {uniform: [0.9, 1.5]}", ["pseudolabel.threshold_start=1.5"]),
    ("pseudolabel.schedule: {choice: [linear, quadratic]}", ["pseudolabel.schedule='quadratic'"]),
    ("classifier.lr: {loguniform: [0, 0.1]}", ["classifier.lr", "lo > 0"]),
    ("classifier.lr: {normal: [0, 0.1]}", ["classifier.lr", "choice"]),
    ("split.seed: {choice: [0, 1]}", ["split.seed", "cannot be tuned"]),
    ("pseudolabel.inference: {choice: [ray, local]}", ["pseudolabel.inference", "cannot be tuned"]),
    ("pseudolabel.rounds: {randint: [1, 2]}\n", None),  # fine on its own; grace_rounds=3 makes it fail below
])
def test_bad_space_is_a_config_error_naming_the_key(text, words):
    cfg = Config().replace(**{"tune.grace_rounds": 3})
    with pytest.raises(ConfigError) as e:
        tune_stage.parse_space(text, "space.yaml", cfg)
    for w in words or ["tune.grace_rounds=3"]:
        assert w in str(e.value)


def test_unknown_key_in_space_file_fails_before_any_search(tmp_path, data_root):
    cfg = tiny(tmp_path, data_root, space="pseudolabel.threshold_strat: {uniform: [0.9, 0.99]}\n")
    with pytest.raises(ConfigError, match="pseudolabel.threshold_strat"):
        tune_stage.tune(cfg)
    assert not (tmp_path / "runs" / "tune").exists()


def test_sampled_combinations_are_repaired_into_valid_configs():
    base = Config()
    cfg = tune_stage.trial_config(base, {"pseudolabel.threshold_start": 0.9, "pseudolabel.threshold_floor": 0.95})
    assert cfg.pseudolabel.threshold_floor == 0.9  # floor clipped to start
    cfg = tune_stage.trial_config(base, {"pseudolabel.schedule": "class-adaptive"})
    assert (cfg.pseudolabel.schedule, cfg.pseudolabel.class_adaptive) == ("constant", True)
    cfg = tune_stage.trial_config(base, {"pseudolabel.schedule": "exponential", "pseudolabel.threshold_rate": 1.7})
    assert cfg.pseudolabel.threshold_rate < 1
    cfg = tune_stage.trial_config(base, {"pseudolabel.schedule": "step", "pseudolabel.threshold_rate": 1.7})
    assert cfg.pseudolabel.threshold_rate == 1.0
    cfg = tune_stage.trial_config(base, {"model.init": "simclr"}, simclr="/abs/simclr.pt")
    assert cfg.model.init == "simclr:/abs/simclr.pt"
    with pytest.raises(ConfigError, match="model.init"):
        tune_stage.trial_config(base, {"model.init": "simclr"})


def test_best_overrides_carry_what_decides_the_result_and_load_on_the_defaults(tmp_path):
    # the base config's floor (0.5) is non-default and the tuned start (0.7) is below the default floor (0.9)
    base = Config().replace(**{"pseudolabel.threshold_floor": 0.5, "classifier.steps": 30, "model.width": 8,
                               "data.train_subset": 3000, "run.output_dir": "/elsewhere", "run.seed": 3,
                               "pseudolabel.inference_actors": 4})
    tuned = tune_stage.trial_config(base, {"pseudolabel.threshold_start": 0.7, "pseudolabel.schedule": "linear"})
    ov = tune_stage.best_overrides(base, tuned, ["pseudolabel.threshold_start", "pseudolabel.schedule"])
    # the trial's model and training, not the default ones
    assert ov["pseudolabel.threshold_floor"] == 0.5 and ov["classifier.steps"] == 30 and ov["model.width"] == 8
    assert ov["run.seed"] == 3 and ov["pseudolabel.mode"] == "iterative"
    # never where or how it ran
    assert not {"data.train_subset", "run.output_dir", "pseudolabel.inference_actors"} & set(ov)
    p = tmp_path / "best.yaml"
    p.write_text(yaml.safe_dump(tune_stage._nested(ov)))
    loaded = load_config(p)
    assert loaded.pseudolabel.threshold_start == 0.7 and loaded.pseudolabel.threshold_floor == 0.5
    assert loaded.model == tuned.model and loaded.classifier == tuned.classifier and loaded.split == tuned.split


def test_base_point_is_the_hand_picked_schedule_when_it_lies_in_the_space():
    space_text = """
pseudolabel.schedule: {choice: [linear, cosine, class-adaptive]}
pseudolabel.threshold_start: {uniform: [0.9, 0.999]}
pseudolabel.rounds: {randint: [2, 4]}
pseudolabel.warm_start: {choice: [true, false]}
"""
    base = Config().replace(**{"pseudolabel.rounds": 3})
    space = tune_stage.parse_space(space_text, "test", base)
    assert tune_stage.base_point(base, space) == {"pseudolabel.schedule": "linear", "pseudolabel.threshold_start": 0.99,
                                                  "pseudolabel.rounds": 3, "pseudolabel.warm_start": True}
    adaptive = base.replace(**{"pseudolabel.schedule": "constant", "pseudolabel.class_adaptive": True})
    assert tune_stage.base_point(adaptive, space)["pseudolabel.schedule"] == "class-adaptive"
    # a base value outside the space: no base trial (the sampled trials alone)
    assert tune_stage.base_point(base.replace(**{"pseudolabel.rounds": 5}), space) is None
    assert tune_stage.base_point(base.replace(**{"pseudolabel.schedule": "step"}), space) is None


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_the_first_trial_of_either_searcher_is_the_base_point(search):
    if search == "optuna":
        pytest.importorskip("optuna")
    base = Config().replace(**{"pseudolabel.rounds": 3, "tune.search": search})
    space = tune_stage.parse_space("pseudolabel.schedule: {choice: [linear, cosine]}\n"
                                   "pseudolabel.threshold_start: {uniform: [0.9, 0.999]}\n"
                                   "pseudolabel.rounds: {randint: [2, 4]}\n", "test", base)
    start = tune_stage.base_point(base, space)
    searcher = tune_stage._searcher(base, start)
    if search == "optuna":
        searcher.set_search_properties(tune_stage.METRIC, "max", space.param_space())
        first, second = searcher.suggest("a"), searcher.suggest("b")
    else:
        searcher.add_configurations({"x": {"run": lambda config: None, "config": space.param_space(), "num_samples": 2}})
        first, second = searcher.next_trial().config, searcher.next_trial().config
    assert first == start == {"pseudolabel.schedule": "linear", "pseudolabel.threshold_start": 0.99, "pseudolabel.rounds": 3}
    assert second != start  # then the search samples


def test_reproduce_args_name_how_the_trial_ran():
    ov = tune_stage._execution_overrides(Config().replace(**{"data.root": "/d"}), train_subset=1800)
    assert tune_stage.reproduce_args(ov) == ("data.root=/d data.train_subset=1800 run.backend=local "
                                             "pseudolabel.inference=local run.threads=1")
    ov = tune_stage._execution_overrides(Config().replace(**{"data.root": "/d", "run.threads": 4}), train_subset=0)
    assert tune_stage.reproduce_args(ov) == "data.root=/d run.backend=local pseudolabel.inference=local"


def test_pool_subset_shrinks_the_images_the_split_is_drawn_from(mnist_small):
    cfg = Config().replace(**{"split.val_size": 200, "tune.pool_subset": 500})
    assert tune_stage._pool_train_subset(cfg, mnist_small) == 100 + 200 + 500
    assert tune_stage._pool_train_subset(cfg.replace(**{"tune.pool_subset": 0}), mnist_small) == 0
    assert tune_stage._pool_train_subset(cfg.replace(**{"tune.pool_subset": 5000}), mnist_small) == 0  # pool is smaller
    # 100 labels per digit from the first 1,011 images: digit 3 has only 94 there
    cfg = Config().replace(**{"split.labels_per_class": 100, "split.val_size": 10, "tune.pool_subset": 1})
    with pytest.raises(ConfigError, match="tune.pool_subset=1"):
        tune_stage._pool_train_subset(cfg, mnist_small)


def test_optuna_searcher():
    pytest.importorskip("optuna")  # the dev extra installs it; a bare install may not have it
    from ray.tune.search import ConcurrencyLimiter

    cfg = Config().replace(**{"tune.search": "optuna", "tune.max_concurrent": 3})
    searcher = tune_stage._searcher(cfg, {"pseudolabel.rounds": 3})
    assert isinstance(searcher, ConcurrencyLimiter) and searcher.max_concurrent == 3
    assert type(searcher.searcher).__name__ == "OptunaSearch"


def test_missing_optuna_is_one_config_error(monkeypatch):
    cfg = Config().replace(**{"tune.search": "optuna"})
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(ConfigError, match="optuna is not installed"):
        tune_stage.tune(cfg)


# --------------------------------------------------------------------------- real searches


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def search(ray_session, tmp_path_factory, data_root):
    """The main search: 4 trials of 2..3 rounds, run once for the tests below."""
    cfg = tiny(tmp_path_factory.mktemp("tune"), data_root, **{"tune.pool_subset": POOL_SUBSET})
    result = tune_stage.tune(cfg)
    return cfg, result, Path(result.model_path).parent


@pytest.mark.slow
def test_search_result_and_files(search):
    cfg, result, folder = search
    assert result.stage == "tune" and not result.skipped
    m = result.metrics
    assert m["trials"] == 4 and m["trials_failed"] == 0
    assert 0.0 <= m["best_val_acc"] <= 1.0 and 0.0 <= m["test_acc"] <= 1.0
    assert Path(result.model_path).is_file()
    for name in (tune_stage.BEST_FILE, tune_stage.RESULTS_FILE, tune_stage.PLOT_FILE, RESULT_FILE):
        assert (folder / name).is_file(), name
    assert tune_stage.best_config_path(result) == folder / tune_stage.BEST_FILE
    # Tune's storage is <run.output_dir>/tune/<key>
    assert (Path(cfg.run.output_dir).resolve() / "tune" / result.run_key).is_dir()


@pytest.mark.slow
def test_best_yaml_reproduces_the_best_trial_config(search):
    cfg, result, folder = search
    best = tune_stage.best_config_path(result)
    text = best.read_text()
    keys = set(flatten_yaml(yaml.safe_load(text)))
    assert SPACE_KEYS <= keys and "data.train_subset" not in keys and "data.root" not in keys
    assert f"data.train_subset={100 + 200 + POOL_SUBSET}" in text  # the header's command for the trial as it ran
    loaded = load_config(best)  # what `toolkit pseudolabel --config best.yaml` does
    assert loaded.model.width == 8 and loaded.classifier.steps == 30 and loaded.split.val_size == 200
    rows = {r["trial_id"]: r for r in read_rows(folder)}
    best_row = max((r for r in rows.values() if r["status"] == "completed"), key=lambda r: float(r["val_acc"]))
    assert math.isclose(float(best_row["val_acc"]), result.metrics["best_val_acc"])
    assert math.isclose(loaded.pseudolabel.threshold_start, float(best_row["pseudolabel.threshold_start"]))
    assert loaded.pseudolabel.rounds == int(best_row["pseudolabel.rounds"])
    assert loaded.pseudolabel.threshold_floor <= loaded.pseudolabel.threshold_start


@pytest.mark.slow
def test_asha_stops_trials_early_and_rounds_stay_within_max_t(search):
    cfg, result, folder = search
    rows = read_rows(folder)
    assert len(rows) == 4
    assert all(1 <= int(r["rounds_done"]) <= min(int(r["rounds"]), MAX_ROUNDS) for r in rows)
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    assert all(int(r["rounds_done"]) < int(r["rounds"]) for r in stopped)
    assert result.metrics["trials_stopped_early"] == len(stopped) >= 1


@pytest.mark.slow
def test_one_nested_mlflow_run_per_trial_with_round_metrics(search):
    cfg, result, folder = search
    client, _ = client_for(cfg)
    parent = client.get_run(result.run_id)
    assert parent.data.tags["toolkit.command"] == "tune" and parent.info.status == "FINISHED"
    children = child_runs(cfg, result.run_id)
    assert len(children) == 4
    rows = {r["trial_id"]: r for r in read_rows(folder)}
    for run in children:
        tid = run.data.tags["toolkit.tune.trial_id"]
        assert run.data.tags["toolkit.tune.status"] == rows[tid]["status"]
        assert run.info.status == {"completed": "FINISHED", "stopped_early": "KILLED"}[rows[tid]["status"]]
        # params are the trial's config: the sampled values, in-process execution
        assert float(run.data.params["classifier.lr"]) == pytest.approx(float(rows[tid]["classifier.lr"]))
        assert run.data.params["run.backend"] == "local" and run.data.params["pseudolabel.inference"] == "local"
        assert run.data.params["data.train_subset"] == str(100 + 200 + POOL_SUBSET)
        assert run.data.params["split.pool_size"] == str(POOL_SUBSET)
        rounds = list(range(1, int(rows[tid]["rounds_done"]) + 1))
        for name in ("round/val_acc", "round/threshold"):  # one point per round the trial ran
            assert sorted(h.step for h in client.get_metric_history(run.info.run_id, name)) == rounds, name
        assert not any(k.startswith("test_") for k in run.data.metrics)  # the objective is validation accuracy only
    assert "test_acc" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"best.yaml", "trials.csv", "space.yaml", "plots", "model"} <= artifacts
    assert "plots/search.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}


@pytest.mark.slow
def test_rerun_of_a_finished_search_skips(search):
    cfg, result, folder = search
    again = tune_stage.tune(cfg)
    assert again.skipped and again.run_key == result.run_key
    assert again.metrics["best_val_acc"] == result.metrics["best_val_acc"]
    assert len(trial_runs(cfg)) == 4


@pytest.mark.slow
def test_interrupted_search_is_restored_without_redoing_finished_trials(ray_session, tmp_path, data_root, monkeypatch):
    """Ctrl-C a real `toolkit tune` while its second trial runs; the same search, re-run, restores Tune's state."""
    from ray import tune as ray_tune

    cfg = tiny(tmp_path, data_root, **{"tune.num_samples": 2, "tune.max_concurrent": 1})
    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg, only_changed=True))
    key = tune_stage.search_key(cfg, SPACE)
    trials = Path(cfg.run.output_dir).resolve() / "stages" / key / "trials"
    gcs = ray_session.get_runtime_context().gcs_address  # the CLI joins this module's Ray
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "tune", "--config", str(tmp_path / "cfg.yaml"),
                             f"ray.address={gcs}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(list(trials.glob("*"))) < 2:  # trial 2 starts once Tune has recorded trial 1 as ended
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "re-run the same command to resume" in out
    client, exp = client_for(cfg)
    (parent,) = client.search_runs([exp], filter_string="tags.`toolkit.command` = 'tune'")
    assert parent.info.status == "KILLED"
    first = sorted(trials.iterdir())[0]
    done_before = {p: p.stat().st_mtime_ns for p in first.glob("*.pt")}
    assert done_before

    restored = []
    original = ray_tune.Tuner.restore
    monkeypatch.setattr(ray_tune.Tuner, "restore",
                        classmethod(lambda cls, *a, **k: restored.append(a[0]) or original(*a, **k)))
    result = tune_stage.tune(cfg)
    assert restored == [str(Path(cfg.run.output_dir).resolve() / "tune" / key)]
    assert result.run_id == parent.info.run_id  # the same parent run, resumed
    m = result.metrics
    assert m["trials"] == 2 and m["trials_failed"] == 0
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # the finished trial did not run again
    assert len(trial_runs(cfg)) == 2 and len(child_runs(cfg, parent.info.run_id)) == 2  # nor got a second run
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_crashing_trials_are_recorded_as_failed_and_the_search_goes_on(ray_session, tmp_path, data_root):
    # each value is valid on the base config, but every pair is not (scale_min > scale_max):
    # each trial fails when it builds its config
    space = "augment.scale_min: {choice: [1.15]}\naugment.scale_max: {choice: [0.9, 0.95]}\n"
    cfg = tiny(tmp_path, data_root, space=space, **{"tune.num_samples": 2})
    with pytest.raises(RuntimeError, match="no trial ran all its rounds"):
        tune_stage.tune(cfg)
    key = tune_stage.search_key(cfg, space)
    folder = Path(cfg.run.output_dir).resolve() / "stages" / key
    rows = read_rows(folder)
    assert len(rows) == 2 and all(r["status"] == "failed" and "augment.scale_min" in r["error"] for r in rows)
    runs = trial_runs(cfg)
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert not (folder / RESULT_FILE).exists()
