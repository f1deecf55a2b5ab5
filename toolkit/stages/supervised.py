"""`toolkit supervised`: the CNN on the labeled images only, fresh on-device augmentation at every step.

Same engine and backends as pretraining; the model is the last step's weights (the
validation accuracy is logged, not used), and its test accuracy is reported once at the end.
"""

from __future__ import annotations

from toolkit.engine import checkpoints
from toolkit.config import Execution, Study, stage_digest
from toolkit.execution.pool_inference import device_for
from toolkit.stages.classifier_fit import ClassifierTraining, train_classifier
from toolkit.stages.model_files import init_weights, load_classifier_file
from toolkit.stages.skeleton import Stage, StageOutput, StageResult, StageRun, run_key, run_stage
from toolkit.stages.evaluation import log_test_report


def supervised(study: Study, execution: Execution, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    def body(run: StageRun) -> StageOutput:
        init = init_weights(study, execution, run.folder, run.data)
        model_path, final = train_classifier(run, run.key, checkpoints.MODEL_FILE, ClassifierTraining(init=init))
        run.tracker.log_artifact(model_path, "model")
        model = load_classifier_file(model_path, device_for(execution))
        metrics = log_test_report(run, model, "supervised CNN")
        metrics["val_acc"] = final["val_acc"]
        run.tracker.log_metrics({"final/val_acc": final["val_acc"]})
        return StageOutput(model_path, metrics, f"val acc {final['val_acc']:.4f}, test acc {metrics['test_acc']:.4f}")

    stage = Stage("supervised", key or run_key(study, execution, "supervised"), stage_digest(study, "supervised"),
                  parent_run_id, {"toolkit.init": study.model.init},
                  skipped_line=lambda done: f"test acc {done.metrics.get('test_acc', float('nan')):.4f}")
    return run_stage(study, execution, stage, body)
