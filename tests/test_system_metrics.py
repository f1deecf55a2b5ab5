"""A training run's MLflow page shows system metrics (CPU and memory; GPU where the driver has one),
and a run that only reads (report, predict) starts no sampler."""

from __future__ import annotations

import pytest

from toolkit.config import Config
from toolkit.tracking.runs import TRAINING_COMMANDS, mlflow_run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded


def _metric_keys(uri: str, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    return set(MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics)


def test_a_training_stage_logs_cpu_and_memory_utilisation(data_root, tmp_path, monkeypatch, capsys):
    from toolkit.stages.supervised import supervised

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # 10 s by default: a tiny run is shorter
    cfg = Config().replace(**{
        "run.data_root": data_root, "data.train_subset": 1500, "data.test_subset": 200, "split.val_size": 200,
        "model.width": 8, "classifier.steps": 60, "classifier.eval_every": 30, "classifier.batch_size": 64,
        "run.backend": "local", "run.threads": 1, "run.output_dir": str(tmp_path / "runs"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.log_models": False,
    })
    result = supervised(cfg.study, cfg.execution)
    keys = _metric_keys(cfg.tracking.uri, result.run_id)
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_percentage" in keys, keys
    assert "system" not in capsys.readouterr().err  # the sampler's own lines stay off the console


def test_commands_that_only_read_start_no_sampler(tmp_path, monkeypatch):
    import toolkit.tracking.runs as tracking

    started = []
    monkeypatch.setattr(tracking, "_system_metrics", lambda uri, run_id: started.append(run_id))
    cfg = Config().replace(**{"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run.output_dir": str(tmp_path)})
    for command in ("report", "predict"):
        with mlflow_run(cfg.study, cfg.execution, command, f"key-{command}"):
            pass
    assert not started and {"pretrain", "supervised", "student", "pipeline"} <= TRAINING_COMMANDS
    with mlflow_run(cfg.study, cfg.execution, "pretrain", "key-pretrain"):
        pass
    assert len(started) == 1
