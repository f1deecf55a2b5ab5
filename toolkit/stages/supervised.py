"""`toolkit supervised`: the CNN on the labeled images only, fresh on-device augmentation at every step.

Same engine and backends as pretraining; the model is the last step's weights (the
validation accuracy is logged, not used), and its test accuracy is reported once at the end.
"""

from __future__ import annotations

from .. import checkpoints
from ..config import Config, stage_digest
from ..inference import device_for
from .common import (StageOutput, StageResult, StageRun, init_weights, load_classifier_file, log_test_report, run_key,
                     run_stage, train_classifier)


def supervised(cfg: Config, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    def body(run: StageRun) -> StageOutput:
        init = init_weights(cfg, run.folder)
        model_path, final = train_classifier(cfg, run.tracker, run.key, run.folder, checkpoints.MODEL_FILE, run.split,
                                            init=init)
        run.tracker.log_artifact(model_path, "model")
        model = load_classifier_file(model_path, device_for(cfg))
        metrics = log_test_report(run.tracker, cfg, model, run.data, run.folder, "supervised CNN")
        metrics["val_acc"] = final["val_acc"]
        run.tracker.log_metrics({"final/val_acc": final["val_acc"]})
        return StageOutput(model_path, metrics, f"val acc {final['val_acc']:.4f}, test acc {metrics['test_acc']:.4f}")

    return run_stage(cfg, "supervised", key or run_key(cfg, "supervised"), stage_digest(cfg, "supervised"),
                     parent_run_id, {"toolkit.init": cfg.model.init}, body,
                     lambda done: f"test acc {done.metrics.get('test_acc', float('nan')):.4f}")
