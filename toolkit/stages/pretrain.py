"""`toolkit pretrain`: SimCLR pretraining of the encoder on Ray Train (or in-process), one MLflow run."""

from __future__ import annotations

from toolkit.engine import checkpoints
from toolkit.execution.backends import run_training
from toolkit.config import Execution, Study, stage_digest
from toolkit.engine.jobs import TrainJob
from toolkit.tracking.runs import MetricsLogger
from toolkit.stages.data_inputs import data_root_for_workers, images_for_workers
from toolkit.stages.model_files import save_model_file
from toolkit.stages.skeleton import Stage, StageOutput, StageResult, StageRun, run_key, run_stage


def pretrain(study: Study, execution: Execution, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    """Train SimCLR; write ``model.pt`` (kind 'simclr') into the stage folder and the MLflow run."""

    def body(run: StageRun) -> StageOutput:
        job = TrainJob.simclr(study, execution, data_root_for_workers(execution), run.split, images_for_workers(run.data))
        state, metrics = run_training(execution, job, run.key, MetricsLogger(run.tracker, "epoch"))
        model_path = save_model_file(run.folder / checkpoints.MODEL_FILE, "simclr", study, state["state_dict"],
                                     run.data, epoch=state["epoch"])
        run.tracker.log_artifact(model_path, "model")
        if run.tracker.enabled and execution.tracking.log_models:
            from toolkit.tracking.logged_models import log_encoder
            from toolkit.maths.models import SimCLRModel

            encoder = SimCLRModel(study.model, run.data.spec)
            encoder.load_state_dict(state["state_dict"])
            uri = log_encoder(run.tracker, run.tracker.run_id, encoder, input_example=run.data.test_images[:4],
                              spec=run.data.spec, class_names=run.data.class_names)
            run.tracker.set_tags({"toolkit.model_uri": uri})
        final = {"final_loss": float(metrics.get("loss", float("nan")))}
        run.tracker.log_metrics(final)
        return StageOutput(model_path, final, str(model_path))

    tags = {
        "toolkit.world_size": execution.ray.num_workers if execution.backend_for("simclr") == "ray" else 1,
        "toolkit.global_batch": study.pretrain.batch_size,
        "toolkit.batchnorm": "sync" if study.model.sync_bn else "per-worker",
    }
    stage = Stage("pretrain", key or run_key(study, execution, "pretrain"), stage_digest(study, "pretrain"),
                  parent_run_id, tags, skipped_line=lambda done: str(done.model_path))
    return run_stage(study, execution, stage, body)
