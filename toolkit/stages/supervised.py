"""`toolkit supervised`: the CNN on the labeled images only, fresh on-device augmentation at every step.

Same engine and backends as pretraining; the model with the best validation accuracy
is kept, and its test accuracy is reported once at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import checkpoints
from ..backends import run_training
from ..config import Config
from ..plots import plot_confusion_matrix
from ..probes import confusion_matrix
from ..tracking import Tracker, mlflow_run, run_url, tracking_uri
from ..train_loops import best_model_state
from .common import (
    StageResult, eval_device, finished_result, load_classifier_file, load_data_and_split, log_config_and_split,
    report_test_metrics, run_key, save_model_file, stage_dir,
)
from .probe import resolve_model_ref

SECTIONS = ("data", "split", "model", "augment", "classifier")


def init_params(cfg: Config, folder: Path) -> dict:
    """``model.init`` -> the worker's ``init`` params (a SimCLR encoder checkpoint path, or nothing)."""
    if cfg.model.init.startswith("simclr:"):
        path = resolve_model_ref(cfg, cfg.model.init[len("simclr:"):], folder)
        checkpoints.load_model_file(path, "simclr", cfg.model)  # fail now, not inside a worker
        return {"simclr": str(path)}
    return {}


def train_classifier(cfg: Config, tracker: Tracker, run_name: str, folder: Path, out_file: str, *,
                     init: dict, pseudo: dict | None = None, steps: int | None = None,
                     step_offset: int = 0, label: str = "supervised") -> tuple[Path, dict]:
    """Train on the labeled (+ pseudo-labeled) images; save the best-validation weights as a model file."""
    params = {
        "config": cfg.to_dict(),
        "tracking": {"uri": tracking_uri(cfg), "run_id": tracker.run_id},
        "init": init,
        "pseudo": pseudo,
        "steps": steps,
        "step_offset": step_offset,
        "label": label,
    }
    ckpt_dir, _ = run_training(cfg, "classifier", params, run_name)
    best = best_model_state(ckpt_dir)
    path = save_model_file(folder / out_file, "classifier", cfg, best["state_dict"],
                           best_val_acc=best["best_val_acc"], best_step=best["best_step"],
                           encoder_pretrained=best["encoder_pretrained"])
    return path, best


def log_test_report(tracker: Tracker, cfg: Config, model_path: Path, data, folder: Path, title: str) -> dict[str, float]:
    """Test accuracy of the final model (once), per-digit accuracy and a confusion matrix plot."""
    model = load_classifier_file(model_path, eval_device())
    metrics, pred = report_test_metrics(model, data)
    cm = confusion_matrix(pred, data.test_labels, 10)
    png = plot_confusion_matrix(cm, folder / "confusion_test.png", f"{title}: test acc {metrics['test_acc']:.4f}")
    tracker.log_artifact(png, "plots")
    tracker.log_metrics(metrics)
    return metrics


def supervised(cfg: Config, parent_run_id: str | None = None, key: str | None = None) -> StageResult:
    key = key or run_key(cfg, "supervised", *SECTIONS)
    folder = stage_dir(cfg, key)
    done = finished_result(folder, cfg.digest(*SECTIONS))
    if done:
        print(f"[supervised] {key} already finished: test acc {done.metrics.get('test_acc', float('nan')):.4f}", flush=True)
        return done
    t0 = time.perf_counter()
    data, split = load_data_and_split(cfg)
    with mlflow_run(cfg, "supervised", key, parent_run_id, {"toolkit.init": cfg.model.init}) as tracker:
        log_config_and_split(tracker, cfg, split, folder)
        model_path, best = train_classifier(cfg, tracker, key, folder, checkpoints.MODEL_FILE, init=init_params(cfg, folder))
        tracker.log_artifact(model_path, "model")
        metrics = log_test_report(tracker, cfg, model_path, data, folder, "supervised CNN")
        seconds = time.perf_counter() - t0
        metrics.update({"val_acc": best["best_val_acc"], "stage_seconds": seconds})
        tracker.log_metrics({"val_acc_selected": best["best_val_acc"], "stage_seconds": seconds})
        result = StageResult("supervised", key, tracker.run_id, str(model_path), metrics, seconds, config_digest=cfg.digest(*SECTIONS))
        result.save(folder)
        print(f"[supervised] done in {seconds:.0f}s: val acc {best['best_val_acc']:.4f}, "
              f"test acc {metrics['test_acc']:.4f}  {run_url(cfg, tracker)}", flush=True)
        return result
