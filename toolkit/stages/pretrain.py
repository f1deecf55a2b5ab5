"""`toolkit pretrain`: SimCLR pretraining of the encoder on Ray Train (or in-process), one MLflow run."""

from __future__ import annotations

from .. import checkpoints
from ..backends import run_training
from ..config import Config, stage_digest
from ..jobs import TrainJob
from ..tracking import MetricsLogger
from .common import StageOutput, StageResult, StageRun, data_root_for_workers, run_key, run_stage, save_model_file


def pretrain(cfg: Config, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    """Train SimCLR; write ``model.pt`` (kind 'simclr') into the stage folder and the MLflow run."""

    def body(run: StageRun) -> StageOutput:
        job = TrainJob(loop="simclr", config=cfg.to_dict(), data_root=data_root_for_workers(cfg), split=run.split)
        state, metrics = run_training(cfg, job, run.key, MetricsLogger(run.tracker, "epoch"))
        model_path = save_model_file(run.folder / checkpoints.MODEL_FILE, "simclr", cfg, state["state_dict"],
                                     epoch=state["epoch"])
        run.tracker.log_artifact(model_path, "model")
        if run.tracker.enabled and cfg.tracking.log_models:
            from ..mlflow_models import log_encoder
            from ..models import SimCLRModel

            encoder = SimCLRModel(cfg.model)
            encoder.load_state_dict(state["state_dict"])
            uri = log_encoder(run.tracker, run.tracker.run_id, encoder, input_example=run.data.test_images[:4])
            run.tracker.set_tags({"toolkit.model_uri": uri})
        final = {"final_loss": float(metrics.get("loss", float("nan")))}
        run.tracker.log_metrics(final)
        return StageOutput(model_path, final, str(model_path))

    tags = {
        "toolkit.world_size": cfg.ray.num_workers if cfg.run.backend == "ray" else 1,
        "toolkit.global_batch": cfg.pretrain.batch_size,
        "toolkit.batchnorm": "sync" if cfg.model.sync_bn else "per-worker",
    }
    return run_stage(cfg, "pretrain", key or run_key(cfg, "pretrain"), stage_digest(cfg, "pretrain"), parent_run_id,
                     tags, body, lambda done: str(done.model_path))
