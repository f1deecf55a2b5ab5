"""A classifier trained for a stage: the job built from the study, run where the execution puts the
classifier loop (Ray Train's workers or this process), saved as the stage's model file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.engine.jobs import ModelWeights, TrainJob
from toolkit.tracking.runs import MetricsLogger
from toolkit.stages.data_inputs import data_root_for_workers, images_for_workers
from toolkit.stages.model_files import save_model_file
from toolkit.stages.skeleton import StageRun


def _no_images() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ClassifierTraining:
    """What one classifier training starts from and does: ``init`` (a classifier to warm-start from, or a
    SimCLR model whose encoder starts it), the pseudo-labeled images added to the labeled ones, its steps
    (0: ``classifier.steps``), the offset of its MLflow steps (rounds log into one run) and its label."""

    init: ModelWeights | None = None
    encoder_pretrained: bool = False
    pseudo_indices: torch.Tensor = field(default_factory=_no_images)
    pseudo_labels: torch.Tensor = field(default_factory=_no_images)
    steps: int = 0
    step_offset: int = 0
    label: str = "supervised"


def train_classifier(run: StageRun, run_name: str, out_file: str, training: ClassifierTraining = ClassifierTraining(),
                     file_extra: dict[str, Any] | None = None) -> tuple[Path, dict]:
    """Train on the labeled (+ pseudo-labeled) images of ``run.split``; save the last weights as
    ``run.folder / out_file``. Returns (model file, {"state_dict", "val_acc", "step", ...}); ``val_acc``
    is the logged validation accuracy of those weights, which chose nothing. ``run_name`` keys the
    training's checkpoints (Ray storage or ``run.folder``'s backend folder); ``file_extra``: more
    entries for the model file (the student's test-time augmentation)."""
    from toolkit.execution.backends import run_training
    from toolkit.engine.workers import final_model_state

    study, execution, init = run.study, run.execution, training.init
    job = TrainJob.for_classifier(
        study, execution, data_root_for_workers(execution), run.split,
        steps=training.steps or study.classifier.steps, init_kind=init.kind if init else "",
        init_state=init.state_dict if init else None, encoder_pretrained=training.encoder_pretrained,
        label=training.label, pseudo_indices=training.pseudo_indices, pseudo_labels=training.pseudo_labels,
        images=images_for_workers(run.data),
    )
    payload, _ = run_training(execution, job, run_name, MetricsLogger(run.tracker, "step", training.step_offset))
    final = final_model_state(payload)
    path = save_model_file(run.folder / out_file, "classifier", study, final["state_dict"], run.data, val_acc=final["val_acc"],
                           step=final["step"], encoder_pretrained=final["encoder_pretrained"], **(file_extra or {}))
    return path, final
