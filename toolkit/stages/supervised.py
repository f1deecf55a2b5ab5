"""`toolkit supervised`: the CNN on the labeled images only, fresh on-device augmentation at every step.

Same engine and backends as pretraining; the model with the best validation accuracy
is kept, and its test accuracy is reported once at the end.
"""

from __future__ import annotations

import time

from .. import checkpoints
from ..config import Config, stage_digest
from ..tracking import mlflow_run, run_url
from .common import (
    StageResult, finished_result, init_weights, load_data_and_split, log_config_and_split, log_test_report, run_key,
    stage_dir, train_classifier,
)


def supervised(cfg: Config, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    key = key or run_key(cfg, "supervised")
    digest = stage_digest(cfg, "supervised")
    folder = stage_dir(cfg, key)
    done = finished_result(folder, digest)
    if done:
        print(f"[supervised] {key} already finished: test acc {done.metrics.get('test_acc', float('nan')):.4f}", flush=True)
        return done
    t0 = time.perf_counter()
    data, split = load_data_and_split(cfg)
    init = init_weights(cfg, folder)
    with mlflow_run(cfg, "supervised", key, parent_run_id, {"toolkit.init": cfg.model.init}) as tracker:
        log_config_and_split(tracker, cfg, split, folder)
        model_path, best = train_classifier(cfg, tracker, key, folder, checkpoints.MODEL_FILE, split, init=init)
        tracker.log_artifact(model_path, "model")
        metrics = log_test_report(tracker, cfg, model_path, data, folder, "supervised CNN")
        seconds = time.perf_counter() - t0
        metrics.update({"val_acc": best["best_val_acc"], "stage_seconds": seconds})
        tracker.log_metrics({"val_acc_selected": best["best_val_acc"], "stage_seconds": seconds})
        result = StageResult("supervised", key, tracker.run_id, str(model_path), metrics, seconds, config_digest=digest)
        result.save(folder)
        print(f"[supervised] done in {seconds:.0f}s: val acc {best['best_val_acc']:.4f}, "
              f"test acc {metrics['test_acc']:.4f}  {run_url(cfg, tracker)}", flush=True)
        return result
