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

from toolkit.engine import checkpoints
from toolkit.config import ConfigError, Execution, Study, stage_digest
from toolkit.engine.loops import extract_features
from toolkit.execution.pool_inference import device_for
from toolkit.tracking.plots import TSNESettings, plot_confusion_matrix, plot_embedding_2d
from toolkit.maths.probes import (LabeledFeatures, ProbeSettings, accuracy, nested_cv_accuracy, predict, run_probes,
                                  select_linear_C, select_linear_C_cv, train_linear_probe)
from toolkit.stages.model_files import load_encoder, resolve_model_ref
from toolkit.stages.skeleton import Stage, StageOutput, StageResult, StageRun, run_key, run_stage, stage_dir, with_inputs


def _real_probe(run: StageRun, encoder: torch.nn.Module, device: torch.device) -> StageOutput:
    """A real dataset's probe: the accuracy its own labels support, estimated by nested cross-validation
    of the linear probe inside them (``estimate/linear_cv_acc`` with a 95% Wilson interval), and its test
    accuracy where a test/ folder exists. No pool label exists to read or log."""
    data, split, tracker = run.data, run.split, run.tracker
    n_classes = data.spec.num_classes
    feats = extract_features(encoder, data.train_images[split.labeled].to(device))
    labels = data.train_labels[split.labeled].to(device)
    folds = max(2, min(5, int(torch.bincount(labels, minlength=n_classes).min())))
    acc, n = nested_cv_accuracy(feats, labels, folds=folds, num_classes=n_classes)
    low, high = wilson_interval(acc, n)
    metrics = {"estimate/linear_cv_acc": acc, "estimate/linear_cv_low95": low, "estimate/linear_cv_high95": high,
               "estimate/labeled_images": float(n)}
    line = f"linear probe, nested {folds}-fold cross-validation inside the {n} labels: {acc:.4f} [{low:.4f}, {high:.4f}]"
    if data.has_test:
        c, _ = select_linear_C_cv(feats, labels, folds=folds, num_classes=n_classes)
        probe = train_linear_probe(feats, labels, n_classes, C=c)
        test_feats = extract_features(encoder, data.test_images.to(device))
        metrics["linear_cv/test_acc"] = accuracy(predict(probe, test_feats), data.test_labels.to(device))
        line += f"; test acc {metrics['linear_cv/test_acc']:.4f}"
    print(f"[probe] {line}", flush=True)
    tracker.log_metrics(metrics)
    return StageOutput(None, metrics, line)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` observed over ``n`` trials."""
    if n == 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def probe(study: Study, execution: Execution, parent_run_id: str | None = None, checkpoint: str | None = None) -> StageResult:
    """Fit the probes on the frozen encoder of ``checkpoint`` (else ``probe.checkpoint``): a path or a pretrain run id."""
    ref = checkpoint or study.probe.checkpoint
    if not ref:
        raise ConfigError("probe.checkpoint is empty: give a SimCLR checkpoint path or the MLflow run id of a pretrain run")
    key = f"{execution.run.name}-probe" if execution.run.name else with_inputs(run_key(study, execution, "probe"), [ref])

    # the encoder is resolved and checked first: a wrong reference opens no folder's MLflow run
    path = resolve_model_ref(execution, ref, stage_dir(execution, key))
    checkpoints.load_model_file(path, "simclr")

    def body(run: StageRun) -> StageOutput:
        device = device_for(execution)
        encoder = load_encoder(path, device)
        data, split, tracker, folder = run.data, run.split, run.tracker, run.folder
        tracker.set_tags({"toolkit.encoder": str(path)})
        if data.kind == "real":
            return _real_probe(run, encoder, device)
        feats = extract_features(encoder, data.train_images.to(device))
        test_feats = extract_features(encoder, data.test_images.to(device))
        labels, test_labels = data.train_labels.to(device), data.test_labels.to(device)
        val = split.val.to(device)
        protocols = {"100-labels": split.labeled.to(device)}
        if study.probe.all_labels:
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
                LabeledFeatures(feats[idx], labels[idx]), LabeledFeatures(test_feats, test_labels),
                LabeledFeatures(feats[val], labels[val]),
                protocol=protocol, seed=study.model.seed, num_classes=data.spec.num_classes,
                settings=ProbeSettings(linear={"C": best_c}, knn={"k": study.probe.knn_k}),
            )
            metrics.update(out["metrics"])
            tracker.log_params(out["params"])
            if len(idx) < 10_000 and study.split.labels_per_class >= 2:
                cv_c, cv_scores = select_linear_C_cv(feats[idx], labels[idx], folds=min(5, study.split.labels_per_class),
                                                       num_classes=data.spec.num_classes)
                cv_probe = train_linear_probe(feats[idx], labels[idx], data.spec.num_classes, C=cv_c)
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
        if execution.tracking.tsne_points:
            png = plot_embedding_2d(test_feats.cpu(), test_labels.cpu(), folder / "tsne_test.png",
                                    "t-SNE of frozen SimCLR features (test set)",
                                    TSNESettings(max_points=execution.tracking.tsne_points, seed=study.model.seed))
            tracker.log_artifact(png, "plots")
        tracker.log_metrics(metrics)
        return StageOutput(None, metrics, f"{len(protocols)} protocols x linear / MLP / kNN")

    return run_stage(study, execution, Stage("probe", key, stage_digest(study, "probe"), parent_run_id), body)
