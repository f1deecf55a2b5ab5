"""A stage run again, on the in-process ``local`` backend with a real sqlite MLflow store: one MLflow run per
stage key, each step logged once, and a console line when training starts over.

* A finished stage whose model file is damaged runs again in its own (reopened) MLflow run, which keeps
  its training curve; a changed study under the same ``run.name`` gets a new run.
* A command stopped after a step's metrics went out but before its checkpoint was written re-trains that
  step on the re-run; the step is not logged a second time.
* When every checkpoint is damaged, training starts over from step 0, says so, and logs no step twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.execution.backends import LocalSession, local_checkpoint_root
from toolkit.config import Config
from toolkit.stages.skeleton import run_key
from toolkit.tracking.runs import RUN_KEY_TAG

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded


@pytest.fixture
def make_cfg(data_root, tmp_path):
    def make(name: str, **over) -> Config:
        return Config().replace(**{
            "run.data_root": data_root, "data.train_subset": 1500, "data.test_subset": 200, "split.val_size": 200,
            "model.width": 8, "pretrain.epochs": 2, "pretrain.batch_size": 128, "pretrain.warmup_epochs": 0.0,
            "classifier.steps": 40, "classifier.eval_every": 10, "classifier.batch_size": 64,
            "classifier.warmup_steps": 5, "run.backend": "local", "run.threads": 1, "run.name": name,
            "run.output_dir": str(tmp_path / "runs"), "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.log_models": False, **over,
        })

    return make


def runs_with_key(cfg: Config, key: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")


def steps_of(cfg: Config, run_id: str, metric: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(run_id, metric))


def stop_after_logging_step(monkeypatch, step: int) -> None:
    """The first report of ``step`` sends its metrics, then the command is interrupted before the
    checkpoint is written (as a Ctrl-C landing between the two would)."""
    report, fired = LocalSession.report, []

    def report_then_stop(self, metrics, payload):
        if metrics.get("step") == step and not fired:
            fired.append(step)
            self.sink(metrics)
            raise KeyboardInterrupt("stopped between the metrics and the checkpoint")
        report(self, metrics, payload)

    monkeypatch.setattr(LocalSession, "report", report_then_stop)


def test_a_redone_finished_stage_reopens_its_run_which_keeps_its_training_curve(make_cfg, capsys):
    from toolkit.stages.pretrain import pretrain

    cfg = make_cfg("redo")
    first = pretrain(cfg.study, cfg.execution)
    model = Path(first.model_path)
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # damaged, as by a full disk
    again = pretrain(cfg.study, cfg.execution)
    assert "already finished" not in capsys.readouterr().out
    (run,) = runs_with_key(cfg, first.run_key)
    assert again.run_id == first.run_id == run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["toolkit.resumed"] == "True"
    assert steps_of(cfg, run.info.run_id, "loss") == [1, 2]
    from toolkit.engine import checkpoints

    assert checkpoints.load_model_file(again.model_path, "simclr")  # the damaged model file was written anew


def test_a_changed_config_under_the_same_run_name_gets_a_new_run(make_cfg):
    """MLflow params (the study) cannot change: more epochs under the same ``run.name`` continue the
    training from its checkpoint, in a run of their own."""
    from toolkit.stages.pretrain import pretrain

    one, two = make_cfg("more", **{"pretrain.epochs": 1}), make_cfg("more", **{"pretrain.epochs": 2})
    first = pretrain(one.study, one.execution)
    second = pretrain(two.study, two.execution)
    cfg = make_cfg("more")
    assert second.run_id != first.run_id and len(runs_with_key(cfg, first.run_key)) == 2
    assert steps_of(cfg, second.run_id, "loss") == [2]


def test_a_step_logged_before_its_checkpoint_is_not_logged_again_on_resume(make_cfg, monkeypatch, capsys):
    from toolkit.stages.supervised import supervised

    cfg = make_cfg("between")
    stop_after_logging_step(monkeypatch, 30)
    with pytest.raises(KeyboardInterrupt):
        supervised(cfg.study, cfg.execution)
    monkeypatch.undo()
    result = supervised(cfg.study, cfg.execution)
    assert "[supervised] resuming at step 20" in capsys.readouterr().out
    (run,) = runs_with_key(cfg, result.run_key)
    for metric in ("train_loss", "val_acc", "lr"):
        assert steps_of(cfg, run.info.run_id, metric) == [10, 20, 30, 40], metric


def test_every_checkpoint_damaged_starts_over_with_a_line_and_logs_no_step_twice(make_cfg, monkeypatch, capsys):
    from toolkit.stages.supervised import supervised

    cfg = make_cfg("damaged")
    stop_after_logging_step(monkeypatch, 30)
    with pytest.raises(KeyboardInterrupt):
        supervised(cfg.study, cfg.execution)
    monkeypatch.undo()
    folder = local_checkpoint_root(cfg.execution, run_key(cfg.study, cfg.execution, "supervised"))
    saved = LocalSession(folder).checkpoints()
    assert len(saved) == 2
    for ckpt in saved:
        f = ckpt / "checkpoint.pt"
        f.write_bytes(f.read_bytes()[:100])
    capsys.readouterr()
    result = supervised(cfg.study, cfg.execution)
    out = capsys.readouterr().out
    assert f"[supervised] none of the 2 checkpoints in {folder} could be read: training starts over from step 0" \
        in out, out
    assert "resuming at step" not in out
    (run,) = runs_with_key(cfg, result.run_key)
    assert steps_of(cfg, run.info.run_id, "train_loss") == [10, 20, 30, 40]


def test_a_report_of_the_step_alone_logs_nothing_and_does_not_fail(tmp_path):
    """MetricsLogger with a report that holds only its step key: nothing to log, no error."""
    from toolkit.config import Config
    from toolkit.tracking.runs import MetricsLogger, mlflow_run

    cfg = Config().replace(**{"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run.output_dir": str(tmp_path)})
    with mlflow_run(cfg.study, cfg.execution, "report", "steps-only") as tracker:
        log = MetricsLogger(tracker, "step")
        log({"step": 5})
        log({"step": 6, "loss": 1.0})
        assert steps_of(cfg, tracker.run_id, "loss") == [6]
