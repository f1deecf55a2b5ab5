"""`toolkit pretrain`: SimCLR pretraining of the encoder on Ray Train (or in-process), one MLflow run."""

from __future__ import annotations

import time

from .. import checkpoints
from ..backends import run_training
from ..config import Config, stage_digest
from ..jobs import TrainJob
from ..tracking import MetricsLogger, mlflow_run, run_url
from .common import (
    StageResult, data_root_for_workers, finished_result, load_data_and_split, log_config_and_split, run_key,
    save_model_file, stage_dir,
)


def pretrain(cfg: Config, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    """Train SimCLR; write ``model.pt`` (kind 'simclr') into the stage folder and the MLflow run."""
    key = key or run_key(cfg, "pretrain")
    digest = stage_digest(cfg, "pretrain")
    folder = stage_dir(cfg, key)
    done = finished_result(folder, digest)
    if done:
        print(f"[pretrain] {key} already finished: {done.model_path}", flush=True)
        return done
    t0 = time.perf_counter()
    _, split = load_data_and_split(cfg)
    with mlflow_run(cfg, "pretrain", key, parent_run_id, {
        "toolkit.world_size": cfg.ray.num_workers if cfg.run.backend == "ray" else 1,
        "toolkit.global_batch": cfg.pretrain.batch_size,
        "toolkit.batchnorm": "sync" if cfg.model.sync_bn else "per-worker",
    }) as tracker:
        log_config_and_split(tracker, cfg, split, folder)
        job = TrainJob(loop="simclr", config=cfg.to_dict(), data_root=data_root_for_workers(cfg), split=split)
        state, metrics = run_training(cfg, job, key, MetricsLogger(tracker, "epoch"))
        model_path = save_model_file(folder / checkpoints.MODEL_FILE, "simclr", cfg, state["state_dict"], epoch=state["epoch"])
        tracker.log_artifact(model_path, "model")
        seconds = time.perf_counter() - t0
        final = {"final_loss": float(metrics.get("loss", float("nan"))), "stage_seconds": seconds}
        tracker.log_metrics(final)
        result = StageResult("pretrain", key, tracker.run_id, str(model_path), final, seconds, config_digest=digest)
        result.save(folder)
        print(f"[pretrain] done in {seconds:.0f}s: {model_path}  {run_url(cfg, tracker)}", flush=True)
        return result
