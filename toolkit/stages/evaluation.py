"""A stage's test report: accuracy of its final model on the test set (once), per class, a confusion
matrix, and the model itself as an MLflow Model. The test set reports; it never decides anything."""

from __future__ import annotations

from typing import Any

import torch

from toolkit.engine.loops import predict_probs
from toolkit.stages.skeleton import StageRun


def log_test_report(run: StageRun, model: torch.nn.Module, title: str, tta: dict[str, Any] | None = None) -> dict[str, float]:
    """Test accuracy of the final model (once), per-digit accuracy and a confusion matrix plot; the model
    itself as an MLflow Model (``tracking.log_models``), whose URI is the run's tag ``toolkit.model_uri``.

    ``model``: the classifier, loaded (``load_classifier_file``). With ``tta`` (an ``engine.tta_recipe``)
    the figures are those of the test-time augmented predictions, and ``test_acc_plain`` is the
    network's own accuracy without it. The test set reports; it never decides anything."""
    from toolkit.tracking.plots import plot_confusion_matrix
    from toolkit.maths.probes import confusion_matrix

    model_id = None
    tracker, data, folder = run.tracker, run.data, run.folder
    if tracker.enabled and run.execution.tracking.log_models:
        from toolkit.tracking.logged_models import log_classifier

        uri = log_classifier(tracker, tracker.run_id, model, input_example=data.test_images[:4], spec=data.spec,
                             class_names=data.class_names)
        tracker.set_tags({"toolkit.model_uri": uri})
        model_id = uri[len("models:/"):] if uri.startswith("models:/m-") else None
    if not data.has_test:  # a real dataset without a test/ folder: nothing to report, nothing invented
        return {"test_acc": float("nan"), **({"test_acc_plain": float("nan")} if tta else {})}
    dev = next(model.parameters()).device
    images = data.test_images.to(dev)
    plain = predict_probs(model, images)  # once: the views' mean starts from it
    probs = predict_probs(model, images, tta, plain=plain) if tta else plain
    metrics, pred = accuracy_metrics(probs, data.test_labels)
    cm = confusion_matrix(pred, data.test_labels, data.spec.num_classes)
    png = plot_confusion_matrix(cm, folder / "confusion_test.png", f"{title}: test acc {metrics['test_acc']:.4f}",
                                class_names=data.class_names)
    tracker.log_artifact(png, "plots")
    if not tta:
        tracker.log_metrics(metrics, model_id=model_id)  # on the run, and on the logged model's page
        return metrics
    tracker.log_metrics(metrics)
    # the logged MLflow Model is the plain network: its page gets the plain figure alone
    plain_acc = accuracy_metrics(plain, data.test_labels)[0]["test_acc"]
    tracker.log_metrics({"test_acc_plain": plain_acc}, model_id=model_id)
    return {**metrics, "test_acc_plain": plain_acc}

def accuracy_metrics(probs: torch.Tensor, labels: torch.Tensor, prefix: str = "test_") -> tuple[dict[str, float], torch.Tensor]:
    """Accuracy and per-class accuracy (``acc_digit<c>``: the class index) of predicted probabilities (N, C) against ``labels``, and the
    predicted classes (on the CPU, wherever the two came from)."""
    pred, labels = probs.argmax(1).cpu(), labels.cpu()
    acc = float((pred == labels).float().mean())
    per_class = {f"{prefix}acc_digit{c}": float((pred[labels == c] == c).float().mean())
                 for c in range(probs.shape[1]) if (labels == c).any()}
    return {f"{prefix}acc": acc, **per_class}, pred
