"""`toolkit probe`: linear, MLP and kNN probes on a frozen SimCLR encoder, under two named protocols.

"100-labels": probes fitted on the labeled split only. "all-labels": fitted on every
training image outside the validation split. Validation accuracy is logged for
selection; test accuracy is reported once.

With few labels the linear probe's penalty C is chosen twice: on the validation split
(``linear``, the standard protocol) and by cross-validation inside the labeled images
(``linear_cv``, the strict protocol: no label outside the 100 is read).
"""

from __future__ import annotations

import torch

from .. import checkpoints
from ..config import Config, ConfigError, stage_digest
from ..engine import extract_features
from ..inference import device_for
from ..plots import plot_confusion_matrix, plot_embedding_2d
from ..probes import accuracy, predict, run_probes, select_linear_C, select_linear_C_cv, train_linear_probe
from .common import (StageOutput, StageResult, StageRun, load_encoder, resolve_model_ref, run_key, run_stage, stage_dir,
                     with_inputs)

def probe(cfg: Config, parent_run_id: str | None = None, key: str | None = None, checkpoint: str | None = None) -> StageResult:
    ref = checkpoint or cfg.probe.checkpoint
    if not ref:
        raise ConfigError("probe.checkpoint is empty: give a SimCLR checkpoint path or the MLflow run id of a pretrain run")
    key = key or (f"{cfg.run.name}-probe" if cfg.run.name else with_inputs(run_key(cfg, "probe"), [ref]))

    # the encoder is resolved and checked first: a wrong reference opens no folder's MLflow run
    path = resolve_model_ref(cfg, ref, stage_dir(cfg, key))
    checkpoints.load_model_file(path, "simclr")

    def body(run: StageRun) -> StageOutput:
        device = device_for(cfg)
        encoder = load_encoder(path, device)
        data, split, tracker, folder = run.data, run.split, run.tracker, run.folder
        tracker.set_tags({"toolkit.encoder": str(path)})
        feats = extract_features(encoder, data.train_images.to(device))
        test_feats = extract_features(encoder, data.test_images.to(device))
        labels, test_labels = data.train_labels.to(device), data.test_labels.to(device)
        val = split.val.to(device)
        protocols = {"100-labels": split.labeled.to(device)}
        if cfg.probe.all_labels:
            protocols["all-labels"] = torch.cat([split.labeled, split.pool]).to(device)
        metrics: dict[str, float] = {}
        for protocol, idx in protocols.items():
            # with few labels the linear probe's regularisation matters: choose it on the validation
            # split (never the test set); with tens of thousands the penalty is negligible
            best_c = 1.0
            if len(idx) < 10_000:
                best_c, scores = select_linear_C(feats[idx], labels[idx], feats[val], labels[val])
                metrics.update({f"{protocol}/linear/val_acc_C{c:g}": a for c, a in scores.items()})
            out = run_probes(
                feats[idx], labels[idx], test_feats, test_labels, feats[val], labels[val],
                protocol=protocol, seed=cfg.run.seed, knn_kwargs={"k": cfg.probe.knn_k},
                linear_kwargs={"C": best_c},
            )
            metrics.update(out["metrics"])
            tracker.log_params(out["params"])
            if len(idx) < 10_000 and cfg.split.labels_per_class >= 2:
                cv_c, cv_scores = select_linear_C_cv(feats[idx], labels[idx], folds=min(5, cfg.split.labels_per_class))
                cv_probe = train_linear_probe(feats[idx], labels[idx], C=cv_c)
                cv_acc = accuracy(predict(cv_probe, test_feats), test_labels)
                metrics.update({f"{protocol}/linear_cv/test_acc": cv_acc, f"{protocol}/linear_cv/C": cv_c,
                                **{f"{protocol}/linear_cv/cv_acc_C{c:g}": a for c, a in cv_scores.items()}})
                print(f"[probe] {protocol:>10} linear, C={cv_c:g} by cross-validation inside the labels "
                      f"(strict): test acc {cv_acc:.4f}", flush=True)
            for name in ("linear", "mlp", "knn"):
                png = plot_confusion_matrix(out[name]["confusion"], folder / f"confusion_{protocol}_{name}.png",
                                            f"{name} probe, {protocol}: test acc {out[name]['test_acc']:.4f}")
                tracker.log_artifact(png, "plots")
                print(f"[probe] {protocol:>10} {name:>6}: test acc {out[name]['test_acc']:.4f}  val acc {out[name]['val_acc']:.4f}", flush=True)
        if cfg.probe.tsne_points:
            png = plot_embedding_2d(test_feats.cpu(), test_labels.cpu(), folder / "tsne_test.png",
                                    "t-SNE of frozen SimCLR features (test set)", max_points=cfg.probe.tsne_points, seed=cfg.run.seed)
            tracker.log_artifact(png, "plots")
        tracker.log_metrics(metrics)
        return StageOutput(None, metrics, f"{len(protocols)} protocols x linear / MLP / kNN")

    return run_stage(cfg, "probe", key, stage_digest(cfg, "probe"), parent_run_id, {}, body)
