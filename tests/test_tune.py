"""`toolkit tune`: the driver's pieces (searchers, execution settings, pool subset), and real Ray Tune searches on
3,000 real MNIST images. The space language itself is tested without Ray in ``test_search_space.py``.

One Ray session for the module. The main search (4 trials, 2..3 rounds, ASHA with
grace 1 and reduction factor 2) runs once and several tests read it; a second small
search checks that an interrupted search is restored without redoing finished trials,
a third that crashing trials are recorded without stopping the search.
"""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from toolkit.config import search_space
from toolkit.config import Config, ConfigError, flatten_yaml, load_config, to_yaml
from toolkit.engine.loops import predict_logits
from toolkit.stages import tune as tune_stage
from toolkit.stages.model_files import load_classifier_file
from toolkit.stages.skeleton import RESULT_FILE
from toolkit.stages.tune_trial import reproduce_args, trial_execution
from toolkit.tracking.machine import device_label

# learning rates from 1e-5 (barely moves) to 1e-2: trials differ clearly, so ASHA has something to stop;
# the floor is threshold_start - threshold_gap (a derived key), so it never lies above the start
SPACE = """
pseudolabel.schedule: {choice: [linear, exponential, class-adaptive]}
pseudolabel.threshold_start: {uniform: [0.8, 0.99]}
pseudolabel.threshold_gap: {uniform: [0.0, 0.3]}
pseudolabel.rounds: {randint: [2, 3]}
classifier.lr: {loguniform: [1e-5, 1e-2]}
"""
CONFIG_KEYS = {"pseudolabel.schedule", "pseudolabel.threshold_start", "pseudolabel.threshold_floor",
               "pseudolabel.rounds", "classifier.lr"}  # what best.yaml holds for SPACE: the floor, not the gap
MAX_ROUNDS = 3
POOL_SUBSET = 1500  # trials split the first 100 + 200 + 1,500 images


def tiny(root: Path, data_root: str, space: str = SPACE, **over) -> Config:
    """3,000 images, width 8, 30 + 20-step rounds, sqlite MLflow under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "space.yaml").write_text(space)
    return Config().replace(**{
        "run.data_root": data_root,
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
        "trials.max_concurrent": 2,
        "tune.grace_rounds": 1,
        "tune.reduction_factor": 2,
        "trials.max_failures": 0,
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


# --------------------------------------------------------------------------- the driver's pieces, no search


def test_unknown_key_in_space_file_fails_before_any_search(tmp_path, data_root):
    cfg = tiny(tmp_path, data_root, space="pseudolabel.threshold_strat: {uniform: [0.9, 0.99]}\n")
    with pytest.raises(ConfigError, match="pseudolabel.threshold_strat"):
        tune_stage.tune(cfg.study, cfg.execution)
    assert not (tmp_path / "runs" / "stages").exists()  # no stage folder, no MLflow run


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_the_first_trial_of_either_searcher_is_the_base_point(search):
    if search == "optuna":
        pytest.importorskip("optuna")
    base = Config().replace(**{"pseudolabel.rounds": 3, "tune.search": search})
    space = search_space.parse_space("pseudolabel.schedule: {choice: [linear, cosine]}\n"
                                     "pseudolabel.threshold_start: {uniform: [0.9, 0.999]}\n"
                                     "pseudolabel.rounds: {randint: [2, 4]}\n", "test", base.study)
    start = search_space.base_point(base.study, space)
    searcher = tune_stage._searcher(base.study, base.execution, start)
    if search == "optuna":
        searcher.set_search_properties(tune_stage.METRIC, "max", space.param_space())
        first, second = searcher.suggest("a"), searcher.suggest("b")
    else:
        searcher.add_configurations({"x": {"run": lambda config: None, "config": space.param_space(), "num_samples": 2}})
        first, second = searcher.next_trial().config, searcher.next_trial().config
    assert first == start == {"pseudolabel.schedule": "linear", "pseudolabel.threshold_start": 0.99, "pseudolabel.rounds": 3}
    assert second != start  # then the search samples


def test_reproduce_args_name_how_the_trial_ran():
    ex = trial_execution(Config().replace(**{"run.data_root": "/d"}).execution)
    assert reproduce_args(ex, train_subset=1800) == ("run.data_root=/d data.train_subset=1800 run.backend=local "
                                                     "inference.backend=local run.threads=1")
    # the user's own thread count is how the trial ran too (best.yaml carries no execution key to hold it)
    ex = trial_execution(Config().replace(**{"run.data_root": "/d", "run.threads": 4}).execution)
    assert reproduce_args(ex, train_subset=0) == ("run.data_root=/d run.backend=local inference.backend=local "
                                                  "run.threads=4")


def test_pool_subset_shrinks_the_images_the_split_is_drawn_from(mnist_small):
    from toolkit.datasets.mnist import make_split
    from toolkit.datasets.training_data import ImageData

    m = mnist_small
    mnist_small = ImageData(m.train_images.unsqueeze(1), m.train_labels, m.test_images.unsqueeze(1), m.test_labels)
    cfg = Config().replace(**{"split.val_size": 200, "tune.pool_subset": 500})
    full = make_split(mnist_small.train_labels, 10, 200, 0)
    n, split = tune_stage._trial_split(cfg.study, mnist_small, full)
    assert n == 100 + 200 + 500 and len(split.pool) == 500 and int(torch.cat([split.labeled, split.val]).max()) < n
    assert tune_stage._trial_split(cfg.study.replace(**{"tune.pool_subset": 0}), mnist_small, full) == (0, full)
    # the pool is smaller than that: the study's split, whole
    assert tune_stage._trial_split(cfg.study.replace(**{"tune.pool_subset": 5000}), mnist_small, full) == (0, full)
    # 100 labels per digit from the first 1,011 images: digit 3 has only 94 there
    cfg = Config().replace(**{"split.labels_per_class": 100, "split.val_size": 10, "tune.pool_subset": 1})
    with pytest.raises(ConfigError, match="tune.pool_subset=1"):
        tune_stage._trial_split(cfg.study, mnist_small, full)


def test_a_label_folds_search_refuses_what_would_let_other_labels_choose():
    cfg = Config().replace(**{"tune.objective": "label_folds"})
    tune_stage.check_search(cfg.study)
    with pytest.raises(ConfigError, match="tune.pool_subset is not allowed with tune.objective=label_folds"):
        tune_stage.check_search(cfg.study.replace(**{"tune.pool_subset": 500}))
    with pytest.raises(ConfigError, match="a base model is not allowed with tune.objective=label_folds"):
        tune_stage.check_search(cfg.study, base_model="/runs/supervised/model.pt")
    tune_stage.check_search(Config().study.replace(**{"tune.pool_subset": 500}), base_model="/runs/m.pt")  # validation


def test_optuna_searcher():
    pytest.importorskip("optuna")  # the dev extra installs it; a bare install may not have it
    from ray.tune.search import ConcurrencyLimiter

    cfg = Config().replace(**{"tune.search": "optuna", "trials.max_concurrent": 3})
    searcher = tune_stage._searcher(cfg.study, cfg.execution, {"pseudolabel.rounds": 3})
    assert isinstance(searcher, ConcurrencyLimiter) and searcher.max_concurrent == 3
    assert type(searcher.searcher).__name__ == "OptunaSearch"


def test_missing_optuna_is_one_config_error(monkeypatch):
    cfg = Config().replace(**{"tune.search": "optuna"})
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(ConfigError, match="optuna is not installed"):
        tune_stage.tune(cfg.study, cfg.execution)


def test_a_trials_run_logs_the_device_the_trial_reported_not_the_drivers_guess(tmp_path):
    """The driver cannot know where Ray places a trial: run.device is what the trial's first report says."""
    from types import SimpleNamespace

    from toolkit.tracking.runs import mlflow_run
    from toolkit.tracking.tune_runs import trial_runs_callback

    cfg = Config().replace(**{"run.output_dir": str(tmp_path / "runs"), "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    with mlflow_run(cfg.study, cfg.execution, "tune", "search") as parent:
        callback = trial_runs_callback(cfg.execution, "search", parent.run_id, lambda point: cfg.study, {})
        trial = SimpleNamespace(trial_id="t1", config={})
        callback.on_trial_start(0, [], trial)
        for r in (1, 2):
            callback.on_trial_result(0, [], trial, {"val_acc": 0.5, "round": r, "device": "cuda",
                                                    "device_name": "NVIDIA H100 80GB HBM3"})
    (run,) = child_runs(cfg, parent.run_id)
    assert run.data.tags["execution.run.device"] == "cuda" and run.data.tags["toolkit.device"] == "NVIDIA H100 80GB HBM3"
    assert "run.device" not in run.data.params  # params are the study alone
    # the rest of the trial's record, as before: its study as params, where and how it ran as execution.* tags
    assert run.data.params["model.seed"] == str(cfg.model.seed) and "run.backend" not in run.data.params
    assert run.data.tags["execution.run.backend"] == cfg.run.backend


# --------------------------------------------------------------------------- real searches


@pytest.fixture(scope="module")
def search(ray_session, tmp_path_factory, data_root):
    """The main search: 4 trials of 2..3 rounds, run once for the tests below."""
    cfg = tiny(tmp_path_factory.mktemp("tune"), data_root, **{"tune.pool_subset": POOL_SUBSET})
    result = tune_stage.tune(cfg.study, cfg.execution)
    return cfg, result, Path(result.model_path).parent


@pytest.mark.slow
def test_search_result_and_files(search, mnist_small):
    cfg, result, folder = search
    assert result.stage == "tune" and not result.skipped
    m = result.metrics
    assert m["trials"] == 4 and m["trials_failed"] == 0
    # the best trial learned (chance: 0.1; it reaches ~0.37); test_acc is its saved model's accuracy on the test set
    assert m["best_val_acc"] > 0.2
    model = load_classifier_file(result.model_path, torch.device("cpu"))
    test_acc = float((predict_logits(model, mnist_small.test_images).argmax(1) == mnist_small.test_labels).float().mean())
    assert test_acc == pytest.approx(m["test_acc"], abs=1e-6) and m["test_acc"] > 0.2
    for name in (tune_stage.BEST_FILE, tune_stage.RESULTS_FILE, tune_stage.PLOT_FILE, RESULT_FILE):
        assert (folder / name).is_file(), name
    assert tune_stage.best_config_path(result) == folder / tune_stage.BEST_FILE
    # Tune's storage is <ray.storage_path>/tune/<key> (default storage: <run.output_dir>/ray)
    assert (Path(cfg.run.output_dir).resolve() / "ray" / "tune" / result.run_key).is_dir()


@pytest.mark.slow
def test_best_yaml_reproduces_the_best_trial_config(search):
    cfg, result, folder = search
    best = tune_stage.best_config_path(result)
    text = best.read_text()
    keys = set(flatten_yaml(yaml.safe_load(text)))
    assert CONFIG_KEYS <= keys and "pseudolabel.threshold_gap" not in keys  # config keys only: pseudolabel reads it
    assert "data.train_subset" not in keys and "run.data_root" not in keys
    assert f"data.train_subset={100 + 200 + POOL_SUBSET}" in text  # the header's command for the trial as it ran
    loaded = load_config(best)  # what `toolkit pseudolabel --config best.yaml` does
    assert loaded.model.width == 8 and loaded.classifier.steps == 30 and loaded.split.val_size == 200
    rows = {r["trial_id"]: r for r in read_rows(folder)}
    best_row = max((r for r in rows.values() if r["status"] == "completed"), key=lambda r: float(r["val_acc"]))
    assert math.isclose(float(best_row["val_acc"]), result.metrics["best_val_acc"])
    assert math.isclose(loaded.pseudolabel.threshold_start, float(best_row["pseudolabel.threshold_start"]))
    assert loaded.pseudolabel.rounds == int(best_row["pseudolabel.rounds"])
    # the floor the trial ran is the sampled start less the sampled gap, as trials.csv shows it
    assert loaded.pseudolabel.threshold_floor == float(best_row["pseudolabel.threshold_floor"])
    assert loaded.pseudolabel.threshold_floor == pytest.approx(
        float(best_row["pseudolabel.threshold_start"]) - float(best_row["pseudolabel.threshold_gap"]), abs=1e-12)


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
        # params are the trial's study (the sampled values); its in-process execution is in execution.* tags
        assert float(run.data.params["classifier.lr"]) == pytest.approx(float(rows[tid]["classifier.lr"]))
        assert run.data.tags["execution.run.backend"] == "local" and run.data.tags["execution.inference.backend"] == "local"
        assert "run.backend" not in run.data.params and "inference.backend" not in run.data.params
        # where the trial ran, as it read it in its own process (this CPU: no GPU was asked for)
        assert run.data.tags["execution.run.device"] == "cpu" and run.data.tags["toolkit.device"] == device_label("cpu")
        assert "run.device" not in run.data.params  # params are the study alone
        assert run.data.params["data.train_subset"] == str(100 + 200 + POOL_SUBSET)
        assert run.data.params["split.pool_size"] == str(POOL_SUBSET)
        rounds = list(range(1, int(rows[tid]["rounds_done"]) + 1))
        for name in ("round/val_acc", "round/threshold"):  # one point per round the trial ran
            assert sorted(h.step for h in client.get_metric_history(run.info.run_id, name)) == rounds, name
        # the trial ran its sampled point, not a repaired one: round 1 at the sampled start, never below the floor
        thresholds = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, "round/threshold"))
        start, floor = float(rows[tid]["pseudolabel.threshold_start"]), float(rows[tid]["pseudolabel.threshold_floor"])
        assert thresholds[0][1] == pytest.approx(start, abs=1e-9)
        assert all(floor - 1e-9 <= v <= start + 1e-9 for _, v in thresholds)
        assert run.data.params["pseudolabel.threshold_floor"] == rows[tid]["pseudolabel.threshold_floor"]
        assert not any(k.startswith("test_") for k in run.data.metrics)  # the objective is validation accuracy only
    assert "test_acc" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"best.yaml", "trials.csv", "space.yaml", "plots", "model"} <= artifacts
    assert "plots/search.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}


@pytest.mark.slow
def test_rerun_of_a_finished_search_skips(search):
    cfg, result, folder = search
    again = tune_stage.tune(cfg.study, cfg.execution)
    assert again.skipped and again.run_key == result.run_key
    assert again.metrics["best_val_acc"] == result.metrics["best_val_acc"]
    assert len(trial_runs(cfg)) == 4


@pytest.mark.slow
def test_interrupted_search_is_restored_without_redoing_finished_trials(ray_session, tmp_path, data_root, monkeypatch):
    """Ctrl-C a real `toolkit tune` while its second trial runs; the same search, re-run, restores Tune's state."""
    from ray import tune as ray_tune

    cfg = tiny(tmp_path, data_root, **{"tune.num_samples": 2, "trials.max_concurrent": 1})
    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg, only_changed=True))
    key = tune_stage.search_key(cfg.study, cfg.execution, SPACE)
    trials = Path(cfg.run.output_dir).resolve() / "ray" / "tune" / key  # Tune's storage: a folder per trial
    gcs = ray_session.get_runtime_context().gcs_address  # the CLI joins this module's Ray
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "tune", "--config", str(tmp_path / "cfg.yaml"),
                             f"ray.address={gcs}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240

    def running_trial_runs() -> list:
        try:
            return [r for r in trial_runs(cfg) if r.info.status == "RUNNING"]
        except Exception:  # noqa: BLE001 - the CLI has not created the store or experiment yet
            return []

    # trial 2 starts once Tune has recorded trial 1 as ended; its MLflow run is open (RUNNING) when Ctrl-C comes
    while len([p for p in trials.glob("*") if p.is_dir()]) < 2 or not running_trial_runs():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "re-run the same command to resume" in out
    client, exp = client_for(cfg)
    (parent,) = client.search_runs([exp], filter_string="tags.`toolkit.command` = 'tune'")
    assert parent.info.status == "KILLED"
    # no trial run outlives its parent: the one Ctrl-C stopped mid-trial is KILLED too
    children = {r.data.tags["toolkit.tune.trial_id"]: r.info.status for r in child_runs(cfg, parent.info.run_id)}
    assert len(children) == 2 and "RUNNING" not in children.values() and "KILLED" in children.values(), children
    first = sorted(p for p in trials.glob("*") if p.is_dir())[0]  # the trial that ended before the signal
    done_before = {p: p.stat().st_mtime_ns for p in first.glob("checkpoint_*/rounds.pt")}
    assert done_before

    restored = []
    original = ray_tune.Tuner.restore
    monkeypatch.setattr(ray_tune.Tuner, "restore",
                        classmethod(lambda cls, *a, **k: restored.append(a[0]) or original(*a, **k)))
    result = tune_stage.tune(cfg.study, cfg.execution)
    assert restored == [str(trials)]
    assert result.run_id == parent.info.run_id  # the same parent run, resumed
    m = result.metrics
    assert m["trials"] == 2 and m["trials_failed"] == 0
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # the finished trial did not run again
    assert len(trial_runs(cfg)) == 2 and len(child_runs(cfg, parent.info.run_id)) == 2  # nor got a second run
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    # the resumed trial reopened its KILLED run and ended it as it ended
    rows = {r["trial_id"]: r["status"] for r in read_rows(Path(result.model_path).parent)}
    for run in child_runs(cfg, parent.info.run_id):
        tid = run.data.tags["toolkit.tune.trial_id"]
        assert run.info.status == {"completed": "FINISHED", "stopped_early": "KILLED"}[rows[tid]], (tid, rows)


@pytest.mark.slow
def test_crashing_trials_are_recorded_as_failed_and_the_search_goes_on(ray_session, tmp_path, data_root):
    # each value is valid on the base config, but every pair is not (scale_min > scale_max):
    # each trial fails when it builds its config
    space = "augment.scale_min: {choice: [1.15]}\naugment.scale_max: {choice: [0.9, 0.95]}\n"
    cfg = tiny(tmp_path, data_root, space=space, **{"tune.num_samples": 2})
    with pytest.raises(RuntimeError, match="no trial ran all its rounds"):
        tune_stage.tune(cfg.study, cfg.execution)
    key = tune_stage.search_key(cfg.study, cfg.execution, space)
    folder = Path(cfg.run.output_dir).resolve() / "stages" / key
    rows = read_rows(folder)
    assert len(rows) == 2 and all(r["status"] == "failed" and "augment.scale_min" in r["error"] for r in rows)
    runs = trial_runs(cfg)
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert not (folder / RESULT_FILE).exists()
