"""The stages end to end on the in-process ``local`` backend: probe, pseudo-labeling, Ctrl-C and resume, pipeline, report.

Everything runs on a small slice of the real MNIST with a width-8 CNN and local
pool inference (Ray Train and Ray Data have their own test files). One sqlite MLflow
store serves the module (creating one costs ~7 s of migrations); every test uses its
own run name and output folder. Ctrl-C is tested for real: ``toolkit`` runs as a
subprocess, gets SIGINT mid-run, and the same command is run again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolkit.engine import checkpoints
from toolkit.execution.backends import local_checkpoint_root
from toolkit.stages.pseudolabel_rounds import STATE_FILE, load_state
from toolkit.engine.checkpoints import CheckpointError
from toolkit.config import Config, ConfigError
from toolkit.tracking.runs import RUN_KEY_TAG

POOL = 1500 - 100 - 200  # train_subset - labeled - validation

# subprocess commands run single-threaded too (see conftest.one_thread)
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """The module's sqlite MLflow store (absolute URI)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def overrides(data_root: str, tracking_uri: str, output_dir: Path, **over) -> dict:
    """Dotted overrides of a tiny local study: 1,500 images, width 8, 40 + 20-step rounds."""
    base = {
        "run.data_root": data_root,
        "data.train_subset": 1500,
        "data.test_subset": 500,
        "split.val_size": 200,
        "model.width": 8,
        "pretrain.epochs": 1,
        "pretrain.batch_size": 128,
        "pretrain.warmup_epochs": 0.0,
        "tracking.tsne_points": 0,
        "classifier.steps": 40,
        "classifier.eval_every": 20,
        "classifier.batch_size": 64,
        "classifier.warmup_steps": 5,
        # a higher lr and low thresholds: 40-step models are unconfident, and rounds should pick something
        "classifier.lr": 0.01,
        "pseudolabel.mode": "iterative",
        "pseudolabel.rounds": 3,
        "pseudolabel.schedule": "linear",
        "pseudolabel.threshold_start": 0.6,
        "pseudolabel.threshold_floor": 0.3,
        "pseudolabel.steps_per_round": 20,
        "inference.backend": "local",
        "run.backend": "local",
        "run.threads": 1,
        "run.output_dir": str(output_dir),
        "tracking.uri": tracking_uri,
    }
    base.update(over)
    return base


@pytest.fixture
def make_cfg(data_root, tracking, tmp_path):
    def make(**over) -> Config:
        return Config().replace(**overrides(data_root, tracking, tmp_path / "runs", **over))

    return make


def client_for(cfg: Config):
    import mlflow
    from mlflow.tracking import MlflowClient

    # listing a run's artifacts resolves its logged models through MLflow's global URI
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=cfg.tracking.uri)


def runs_with_key(cfg: Config, key: str) -> list:
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")


def steps_of(cfg: Config, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client_for(cfg).get_metric_history(run_id, metric))


def round_history(cfg: Config, run_id: str, metric: str) -> list[float]:
    """Per-round values of ``metric`` (steps 1, 2, ...) in round order.

    Round-level series live under ``round/`` (the final summary under ``final/``).
    """
    ms = sorted(client_for(cfg).get_metric_history(run_id, metric), key=lambda m: m.step)
    return [m.value for m in ms if m.step >= 1]


def artifact_paths(cfg: Config, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client_for(cfg).list_artifacts(run_id, folder)}


# ------------------------------------------------------------------ subprocess helpers


def cli_command(command: str, over: dict) -> list[str]:
    return [sys.executable, "-m", "toolkit.cli", command, *(f"{k}={v}" for k, v in over.items())]


def cli_env(data_root: str) -> dict:
    return {**os.environ, "TOOLKIT_DATA_DIR": data_root, "PYTHONUNBUFFERED": "1", **THREADS_ENV}


def interrupt_when(cmd: list[str], env: dict, log: Path, ready, what: str, timeout: float = 120.0) -> tuple[int, str]:
    """Start ``cmd``, send SIGINT once ``ready()`` is true; return (exit code, output)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, log.read_text()


def run_to_completion(cmd: list[str], env: dict, timeout: float = 300.0) -> str:
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


# ------------------------------------------------------------------ a tiny SimCLR encoder, shared


@pytest.fixture(scope="module")
def simclr(data_root, tracking, tmp_path_factory):
    """One epoch of SimCLR on 1,500 images: (config, StageResult)."""
    from toolkit.stages.pretrain import pretrain

    out = tmp_path_factory.mktemp("simclr") / "runs"
    cfg = Config().replace(**overrides(data_root, tracking, out, **{"run.name": "encoder"}))
    result = pretrain(cfg.study, cfg.execution)
    assert Path(result.model_path).is_file()
    return cfg, result


# ------------------------------------------------------------------ probe

PROBES = ("linear", "mlp", "knn")


def test_probe_logs_both_protocols_confusion_matrices_and_tsne(simclr, make_cfg):
    from toolkit.stages.probe import probe

    _, pre = simclr
    cfg = make_cfg(**{"probe.checkpoint": pre.model_path, "tracking.tsne_points": 100, "run.name": "probe-path"})
    result = probe(cfg.study, cfg.execution)
    run = client_for(cfg).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # The probes learn even from a one-epoch encoder, well above chance (10%). Seen on this
    # setting (two encoder seeds): 100 labels linear 0.74-0.77, mlp 0.76, knn 0.50-0.51; all
    # labels linear 0.93-0.94, mlp 0.94, knn 0.79. Floors ~0.2 below that: probes fitted on
    # misaligned labels or features stay near 0.1.
    floors = {"100-labels": {"linear": 0.5, "mlp": 0.5, "knn": 0.3}, "all-labels": {"linear": 0.7, "mlp": 0.7, "knn": 0.5}}
    for protocol in ("100-labels", "all-labels"):
        for name in PROBES:
            key = f"{protocol}/{name}/test_acc"
            assert floors[protocol][name] < run.data.metrics[key] <= 1.0, (key, run.data.metrics[key])
            assert run.data.metrics[key] == pytest.approx(result.metrics[key])
    # and more labels help (seen +0.17 for the linear probe)
    assert run.data.metrics["all-labels/linear/test_acc"] > run.data.metrics["100-labels/linear/test_acc"]
    plots = artifact_paths(cfg, result.run_id, "plots")
    assert {f"plots/confusion_{p}_{n}.png" for p in ("100-labels", "all-labels") for n in PROBES} <= plots
    assert "plots/tsne_test.png" in plots
    assert {"config.yaml", "split.json"} <= artifact_paths(cfg, result.run_id)
    assert run.data.params["probe.checkpoint"] == pre.model_path


def test_probe_fetches_the_encoder_from_a_pretrain_run_id(simclr, make_cfg):
    from toolkit.stages.probe import probe

    _, pre = simclr
    cfg = make_cfg(**{"probe.checkpoint": pre.run_id, "probe.all_labels": False, "run.name": "probe-runid"})
    result = probe(cfg.study, cfg.execution)
    run = client_for(cfg).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert {f"100-labels/{n}/test_acc" for n in PROBES} <= set(run.data.metrics)
    assert not any(k.startswith("all-labels/") for k in run.data.metrics)  # probe.all_labels=false
    assert "plots/tsne_test.png" not in artifact_paths(cfg, result.run_id, "plots")  # tracking.tsne_points=0
    # the model came from the pretrain run's artifacts, into the probe's stage folder
    fetched = Path(run.data.tags["toolkit.encoder"])
    assert fetched.is_file() and fetched != Path(pre.model_path)
    assert fetched.is_relative_to(Path(cfg.run.output_dir).resolve() / "stages" / "probe-runid-probe")
    assert fetched.read_bytes() == Path(pre.model_path).read_bytes()


def test_probe_rejects_an_empty_reference_and_a_classifier_checkpoint(simclr, make_cfg, tmp_path, capsys):
    from toolkit.cli import main
    from toolkit.maths.models import Classifier
    from toolkit.stages.model_files import save_model_file
    from toolkit.stages.probe import probe

    cfg = make_cfg(**{"run.name": "probe-bad"})
    with pytest.raises(ConfigError, match="probe.checkpoint"):
        probe(cfg.study, cfg.execution)
    # the CLI turns it into one line on stderr and exit code 2
    assert main(["probe", *(f"{k}={v}" for k, v in overrides(cfg.run.data_root, cfg.tracking.uri, tmp_path / "cli").items())]) == 2
    assert "probe.checkpoint is empty" in capsys.readouterr().err

    clf = save_model_file(tmp_path / "classifier.pt", "classifier", cfg.study, Classifier(cfg.model).state_dict())
    with_clf = cfg.replace(**{"probe.checkpoint": str(clf)})
    with pytest.raises(CheckpointError, match="'classifier' model, expected 'simclr'"):
        probe(with_clf.study, with_clf.execution)
    # neither got as far as an MLflow run
    assert runs_with_key(cfg, "probe-bad-probe") == []


# ------------------------------------------------------------------ the test report


class _RecordingTracker:
    """What ``log_test_report`` uses of a Tracker, recording every ``log_metrics`` call."""

    enabled, run_id = True, "run-0"

    def __init__(self):
        self.calls: list[tuple[dict, str | None]] = []

    def log_metrics(self, metrics, step=None, model_id=None):
        self.calls.append((dict(metrics), model_id))

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass


class _CountingClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(28 * 28, 10)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.lin(x.flatten(1))


def test_the_test_report_runs_the_plain_pass_once_and_gives_the_models_page_the_plain_figure_alone(tmp_path, monkeypatch):

    import toolkit.tracking.logged_models
    from toolkit.engine.loops import tta_recipe
    from toolkit.stages.skeleton import StageRun
    from toolkit.stages.evaluation import log_test_report

    monkeypatch.setattr(toolkit.tracking.logged_models, "log_classifier", lambda *a, **k: "models:/m-0123")
    torch.manual_seed(0)
    from toolkit.datasets.training_data import ImageData

    data = ImageData(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                     torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (40,)))
    cfg, model, tracker = Config(), _CountingClassifier(), _RecordingTracker()
    # the report reads the run's tracker, execution (tracking.log_models), data and folder; no split
    run = StageRun(cfg.study, cfg.execution, "t-key", tmp_path, tracker, data, split=None)
    metrics = log_test_report(run, model, "t", tta=tta_recipe(cfg.study.augment, 2, 0.5))
    assert model.images == 40 * 3  # one plain pass and two views, not a second plain pass
    (run_metrics, run_model), (page_metrics, page_model) = tracker.calls
    assert run_model is None and "test_acc_plain" not in run_metrics and "test_acc" in run_metrics
    assert page_model == "m-0123" and page_metrics == {"test_acc_plain": metrics["test_acc_plain"]}
    # without views: one pass, every figure on the run and on the model's page
    model.images, tracker.calls = 0, []
    plain = log_test_report(run, model, "t")
    assert model.images == 40 and tracker.calls == [(plain, "m-0123")] and "test_acc_plain" not in plain


# ------------------------------------------------------------------ pseudo-labeling


def test_iterative_pseudolabel_logs_each_round_and_the_final_model(make_cfg):
    from toolkit.stages.pseudolabel import pseudolabel

    cfg = make_cfg(**{"run.name": "iter"})
    result = pseudolabel(cfg.study, cfg.execution)
    client = client_for(cfg)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for metric in ("threshold", "added", "train_size", "pool_left", "val_acc", "diagnostic/pseudo_precision_round"):
        assert steps_of(cfg, result.run_id, f"round/{metric}") == [1, 2, 3], metric
    assert steps_of(cfg, result.run_id, "final/pool_left") == [0]
    thresholds = round_history(cfg, result.run_id, "round/threshold")
    assert thresholds[0] == pytest.approx(0.6) and thresholds[-1] == pytest.approx(0.3)
    assert all(a >= b for a, b in zip(thresholds, thresholds[1:]))
    pool_left, added = round_history(cfg, result.run_id, "round/pool_left"), round_history(cfg, result.run_id, "round/added")
    assert all(a >= b for a, b in zip([POOL, *pool_left], pool_left))
    assert [POOL - p for p in pool_left] == [sum(added[: i + 1]) for i in range(3)]
    assert pool_left[-1] < POOL, "no round selected any pseudo-label: the thresholds are too high for this model"

    folder = Path(cfg.run.output_dir).resolve() / "stages" / "iter-pseudolabel-iterative"
    state = load_state(folder / STATE_FILE)
    assert state["rounds_done"] == 3 and [h["round"] for h in state["history"]] == [1, 2, 3]
    assert len(state["pool"]) == pool_left[-1] == result.metrics["pool_left"]
    assert len(state["pseudo_indices"]) == len(state["pseudo_labels"]) == POOL - pool_left[-1]
    # the final model is the last round's, logged once with its test accuracy
    final, last = (torch.load(folder / n, weights_only=True)["state_dict"] for n in ("model.pt", "round3.pt"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert "model/model.pt" in artifact_paths(cfg, result.run_id, "model")
    assert "plots/confusion_test.png" in artifact_paths(cfg, result.run_id, "plots")
    test_acc = client.get_metric_history(result.run_id, "test_acc")
    # 40 + 3 x 20 steps of a width-8 CNN: seen 0.41-0.44 over three seeds (chance 0.1); a model
    # trained on misaligned pseudo-labels or evaluated on the wrong images stays near 0.1
    assert len(test_acc) == 1 and 0.25 < test_acc[0].value <= 1.0, test_acc[0].value
    assert test_acc[0].value == pytest.approx(result.metrics["test_acc"])


def test_oneshot_trains_exactly_one_round_at_threshold_start(make_cfg):
    from toolkit.stages.pseudolabel import pseudolabel

    cfg = make_cfg(**{"run.name": "once", "pseudolabel.mode": "oneshot", "pseudolabel.threshold_start": 0.4})
    result = pseudolabel(cfg.study, cfg.execution)
    assert result.stage == "pseudolabel-oneshot"
    folder = Path(cfg.run.output_dir).resolve() / "stages" / "once-pseudolabel-oneshot"
    state = load_state(folder / STATE_FILE)
    assert state["rounds_done"] == 1 and len(state["history"]) == 1
    assert sorted(p.name for p in folder.glob("round[0-9]*.pt")) == ["round0.pt", "round1.pt"]
    assert steps_of(cfg, result.run_id, "round/threshold") == [1]
    assert round_history(cfg, result.run_id, "round/threshold") == [pytest.approx(0.4)]
    assert client_for(cfg).get_run(result.run_id).data.tags["toolkit.mode"] == "oneshot"


def test_classifiers_local_trains_classifiers_in_process_while_pretraining_stays_on_ray_train(make_cfg, monkeypatch):
    """run.classifiers_local (the cpu profile): under run.backend=ray with an embedded Ray, a classifier
    stage never starts Ray and trains in this process (its checkpoints in the local folder);
    pretraining still goes to Ray Train, and so does the classifier without the switch or on a cluster."""
    from toolkit.execution import backends
    from toolkit.stages.pretrain import pretrain
    from toolkit.stages.supervised import supervised

    class RayStarted(Exception):
        pass

    def refuse(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(backends, "init_ray", refuse)
    ray_run = {"run.backend": "ray", "tracking.enabled": False}
    cfg = make_cfg(**{"run.name": "inproc", "run.classifiers_local": True, **ray_run})
    done = supervised(cfg.study, cfg.execution)
    assert Path(done.model_path).is_file() and 0.0 < done.metrics["test_acc"] <= 1.0
    assert local_checkpoint_root(cfg.execution, "inproc-supervised").is_dir()
    with pytest.raises(RayStarted):
        pretrain(cfg.study, cfg.execution)
    onray = make_cfg(**{"run.name": "onray", **ray_run})
    with pytest.raises(RayStarted):
        supervised(onray.study, onray.execution)
    # on a Ray cluster (an address, as in a Ray Job) the classifiers stay on Ray Train's workers
    cluster = make_cfg(**{"run.name": "cluster", "run.classifiers_local": True, "ray.address": "10.0.0.1:6379",
                          **ray_run})
    with pytest.raises(RayStarted):
        supervised(cluster.study, cluster.execution)


def test_iterative_takes_round_1_from_a_matching_oneshot_run(make_cfg):
    from toolkit.stages.pseudolabel import pseudolabel
    from toolkit.stages.supervised import supervised

    base_cfg = make_cfg(**{"run.name": "base"})
    base = supervised(base_cfg.study, base_cfg.execution).model_path
    once_cfg = make_cfg(**{"run.name": "r1", "pseudolabel.mode": "oneshot"})
    once = pseudolabel(once_cfg.study, once_cfg.execution, base_model=base)
    cfg = make_cfg(**{"run.name": "r1it"})
    it = pseudolabel(cfg.study, cfg.execution, base_model=base, first_round_from=once)
    stages = Path(cfg.run.output_dir).resolve() / "stages"
    once_state = load_state(stages / "r1-pseudolabel-oneshot" / STATE_FILE)
    it_state = load_state(stages / "r1it-pseudolabel-iterative" / STATE_FILE)
    assert it_state["rounds_done"] == 3 and it_state["history"][0] == once_state["history"][0]
    assert it_state["pseudo_indices"][: len(once_state["pseudo_indices"])] == once_state["pseudo_indices"]
    assert not (stages / "r1it-pseudolabel-iterative" / "round1.pt").exists()  # taken, not trained
    assert steps_of(cfg, it.run_id, "round/val_acc") == [1, 2, 3]  # round 1 logged in this run too
    assert client_for(cfg).get_run(it.run_id).data.tags["toolkit.round1_from"] == str(stages / "r1-pseudolabel-oneshot")
    # round 1 was not trained again (local training leaves a checkpoint folder per trained round)
    assert not local_checkpoint_root(cfg.execution, "r1it-pseudolabel-iterative-round1").exists()
    assert local_checkpoint_root(cfg.execution, "r1it-pseudolabel-iterative-round2").is_dir()

    # another training config, another start model, or none: round 1 is trained, not taken
    other_base = Path(cfg.run.output_dir) / "other-base.pt"
    shutil.copyfile(base, other_base)
    for name, over, start in (("r1steps", {"pseudolabel.steps_per_round": 10}, base),
                              ("r1other", {}, str(other_base)), ("r1none", {}, None)):
        other = make_cfg(**{"run.name": name, **over})
        pseudolabel(other.study, other.execution, base_model=start, first_round_from=once)
        state = load_state(stages / f"{name}-pseudolabel-iterative" / STATE_FILE)
        assert "adopted_from" not in state and state["rounds_done"] == 3, name
        assert local_checkpoint_root(other.execution, f"{name}-pseudolabel-iterative-round1").is_dir(), name


# ------------------------------------------------------------------ Ctrl-C and resume (subprocesses)


def test_pseudolabel_interrupted_in_round_2_resumes_after_round_1(data_root, tracking, tmp_path, make_cfg):
    """Acceptance: SIGINT during round 2 -> exit 130, run KILLED; the same command resumes after round 1."""
    over = overrides(data_root, tracking, tmp_path / "runs", **{
        "run.name": "resume",
        "pseudolabel.steps_per_round": 60,  # slow enough that the signal lands inside round 2
    })
    cfg = make_cfg(**over)
    cmd, env = cli_command("pseudolabel", over), cli_env(data_root)
    folder = Path(cfg.run.output_dir).resolve() / "stages" / "resume-pseudolabel-iterative"
    state_file = folder / STATE_FILE

    def rounds_done() -> int:
        try:
            return (load_state(state_file) or {"rounds_done": -1})["rounds_done"]
        except Exception:  # noqa: BLE001 - being written
            return -1

    rc, out = interrupt_when(cmd, env, tmp_path / "first.log", lambda: rounds_done() >= 1, "round 1")
    assert rc == 130, out[-3000:]
    assert "interrupted; re-run the same command to resume" in out
    assert rounds_done() == 1, f"the signal did not land in round 2:\n{out[-3000:]}"
    (killed,) = runs_with_key(cfg, "resume-pseudolabel-iterative")
    assert killed.info.status == "KILLED"
    finished = {name: (folder / name).stat().st_mtime_ns for name in ("round0.pt", "round1.pt")}

    out = run_to_completion(cmd, env)
    assert "resuming after round 1" in out, out[-3000:]
    assert {name: (folder / name).stat().st_mtime_ns for name in finished} == finished  # not trained again
    state = load_state(state_file)
    assert state["rounds_done"] == 3 and [h["round"] for h in state["history"]] == [1, 2, 3]
    (run,) = runs_with_key(cfg, "resume-pseudolabel-iterative")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["toolkit.resumed"] == "True"
    for metric in ("round/threshold", "round/pool_left", "round/diagnostic/pseudo_precision_round"):
        steps = steps_of(cfg, run.info.run_id, metric)
        # each round logs after it finishes; only a kill between logging and saving the state could repeat one
        assert set(steps) == {1, 2, 3} and len(steps) <= 4, (metric, steps)
    assert len(client_for(cfg).get_metric_history(run.info.run_id, "test_acc")) == 1


def test_pretrain_interrupted_after_an_epoch_resumes_in_the_same_mlflow_run(data_root, tracking, tmp_path, make_cfg):
    over = overrides(data_root, tracking, tmp_path / "runs", **{
        "run.name": "ctrlc",
        "pretrain.epochs": 3,
        "data.train_subset": 3000,  # ~2 s epochs: the signal lands well before the third one ends
    })
    cfg = make_cfg(**over)
    cmd, env = cli_command("pretrain", over), cli_env(data_root)
    ckpts = Path(cfg.run.output_dir).resolve() / "local" / "ctrlc-pretrain"

    def checkpointed() -> bool:
        return any(re.fullmatch(r"checkpoint_\d{6}", p.name) for p in ckpts.glob("checkpoint_*"))

    rc, out = interrupt_when(cmd, env, tmp_path / "first.log", checkpointed, "epoch checkpoint")
    assert rc == 130, out[-3000:]
    (killed,) = runs_with_key(cfg, "ctrlc-pretrain")
    assert killed.info.status == "KILLED"
    assert not (Path(cfg.run.output_dir).resolve() / "stages" / "ctrlc-pretrain" / "result.json").exists()

    out = run_to_completion(cmd, env)
    assert "resuming after epoch" in out, out[-3000:]
    (run,) = runs_with_key(cfg, "ctrlc-pretrain")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert set(steps_of(cfg, run.info.run_id, "loss")) == {1, 2, 3}
    model = Path(cfg.run.output_dir).resolve() / "stages" / "ctrlc-pretrain" / "model.pt"
    assert checkpoints.load(model)["epoch"] == 3


# ------------------------------------------------------------------ pipeline and report

STAGES = ("probe", "supervised", "oneshot", "iterative", "simclr_iterative", "student")
EXPERIMENT = "pipeline-test"


@pytest.fixture(scope="module")
def study(data_root, tracking, tmp_path_factory):
    """The whole pipeline, two seeds, every stage: (config, parent run id, printed output)."""
    from toolkit.stages.pipeline import pipeline

    out = tmp_path_factory.mktemp("pipeline") / "runs"
    cfg = Config().replace(**overrides(data_root, tracking, out, **{
        "run.name": "study",
        "tracking.experiment": EXPERIMENT,
        "pipeline.seeds": [0, 1],
        "pretrain.max_images": 512,
        "probe.all_labels": False,
        "classifier.steps": 20,
        "classifier.eval_every": 10,
        "pseudolabel.rounds": 2,
    }))
    results = pipeline(cfg.study, cfg.execution)
    assert sorted(results) == [0, 1]
    (parent,) = runs_with_key(cfg, "study-pipeline")
    return cfg, parent.info.run_id


def children(cfg: Config, parent_id: str) -> list:
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_pipeline_nests_a_run_per_stage_and_seed_and_reports(study):
    cfg, parent_id = study
    client = client_for(cfg)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    kids = children(cfg, parent_id)
    tagged = sorted((r.data.tags["toolkit.stage"], int(r.data.tags["toolkit.seed"])) for r in kids)
    # one encoder for all seeds (pretrained once, tagged with the first seed), every other stage per seed
    assert tagged == sorted([("pretrain", 0)] + [(s, seed) for s in STAGES for seed in (0, 1)])
    assert all(r.info.status == "FINISHED" for r in kids)

    assert {"report/results.md", "report/results.csv", "report/error_by_stage.png"} <= artifact_paths(cfg, parent_id, "report")
    md = Path(client.download_artifacts(parent_id, "report/results.md")).read_text()
    for row in ("SimCLR linear probe, 100 labels", "CNN + augmentation, 100 labels", "one-shot pseudo-labeling",
                "| iterative pseudo-labeling", "SimCLR-initialised iterative pseudo-labeling",
                "student of the iterative models", "student, one view (no test-time augmentation)", "final model (standard: best on validation; strict: the last stage)"):
        assert row in md, row
    assert "±" in md and "| standard | 95% interval | strict | 95% interval |" in md and "200 validation labels decided" in md
    assert {"summary/cnn_augmentation_100_labels/standard_mean",
            "summary/cnn_augmentation_100_labels/strict_mean"} <= set(parent.data.metrics)
    # the one-view row is the students' own network: the test_acc_plain each logged, averaged over the seeds
    students = [r for r in kids if r.data.tags["toolkit.stage"] == "student"]
    plain = [r.data.metrics["test_acc_plain"] for r in students]
    assert len(plain) == 2 and all("test_acc" in r.data.metrics for r in students)
    one_view = parent.data.metrics["summary/student_one_view_no_test_time_augmentation/standard_mean"]
    assert one_view == pytest.approx(sum(plain) / 2)
    # the iterative stage took its round 1 from the one-shot stage (same config and start model)
    iterative = [r for r in kids if r.data.tags["toolkit.stage"] == "iterative"]
    assert len(iterative) == 2 and all("toolkit.round1_from" in r.data.tags for r in iterative)


@pytest.mark.slow
def test_report_command_prints_and_logs_the_table_of_the_newest_pipeline(study, tmp_path, capsys):
    from toolkit.cli import main

    cfg, parent_id = study
    capsys.readouterr()
    args = [f"tracking.uri={cfg.tracking.uri}", f"tracking.experiment={EXPERIMENT}", f"run.output_dir={tmp_path / 'runs'}"]
    assert main(["report", *args]) == 0
    out = capsys.readouterr().out
    assert "| CNN + augmentation, 100 labels |" in out and "±" in out
    assert (tmp_path / "runs" / "stages" / f"report-{parent_id}" / "results.md").read_text() in out


@pytest.mark.slow
def test_rerunning_the_pipeline_skips_every_finished_stage(study, capsys):
    from toolkit.stages.pipeline import pipeline

    cfg, first_id = study
    client = client_for(cfg)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    stage_runs = client.search_runs([exp], filter_string="tags.`toolkit.command` != 'pipeline'")
    capsys.readouterr()
    results = pipeline(cfg.study, cfg.execution)
    out = capsys.readouterr().out
    assert all(r.skipped for by_stage in results.values() for r in by_stage.values())
    assert out.count("already finished") == 1 + len(STAGES) * 2, out
    assert len(client.search_runs([exp], filter_string="tags.`toolkit.command` != 'pipeline'")) == len(stage_runs)
    assert len(children(cfg, first_id)) == 1 + len(STAGES) * 2
    # the re-run's summary still holds every row, from the saved results
    newest = client.search_runs([exp], "tags.`toolkit.command` = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
    assert newest.info.status == "FINISHED"
    md = Path(client.download_artifacts(newest.info.run_id, "report/results.md")).read_text()
    assert "| CNN + augmentation, 100 labels |" in md and "±" in md


@pytest.mark.slow
def test_report_after_a_rerun_still_has_every_stage(study, tmp_path, capsys):
    from toolkit.cli import main
    from toolkit.stages.pipeline import pipeline

    cfg, _ = study
    pipeline(cfg.study, cfg.execution)  # a no-op re-run (all stages finished); a no-op again if the test above ran first
    capsys.readouterr()
    args = [f"tracking.uri={cfg.tracking.uri}", f"tracking.experiment={EXPERIMENT}", f"run.output_dir={tmp_path / 'runs'}"]
    assert main(["report", *args]) == 0
    assert "| CNN + augmentation, 100 labels |" in capsys.readouterr().out
