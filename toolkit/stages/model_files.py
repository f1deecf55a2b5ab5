"""Model files of the stages: references (a path or an MLflow run id) resolved, files read into
networks, and the model file a stage writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from toolkit.engine import checkpoints
from toolkit.config import ConfigError, Execution, Study
from toolkit.execution.pool_inference import build_classifier, device_for
from toolkit.engine.jobs import ModelWeights
from toolkit.datasets.spec import ImageSpec
from toolkit.datasets.training_data import ImageData
from toolkit.maths.models import Classifier, SimCLRModel


def load_classifier_file(path: str | Path, device: torch.device | None = None) -> Classifier:
    """The classifier of a model file, in eval mode on ``device`` (``inference.build_classifier`` builds it)."""
    payload = checkpoints.load_model_file(path, "classifier")
    return build_classifier(ModelWeights.from_payload(payload), device or device_for())


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load_encoder(path: str | Path, device: torch.device) -> torch.nn.Module:
    """The frozen encoder of a SimCLR checkpoint, in eval mode on ``device``."""
    payload = checkpoints.load_model_file(path, "simclr")
    model = SimCLRModel(checkpoints.model_config_of(payload), ImageSpec.from_dict(payload.get("input")))
    model.load_state_dict(payload["state_dict"])
    return model.encoder.to(device).to(memory_format=torch.channels_last).eval()


def resolve_model_ref(execution: Execution, ref: str, dest: Path) -> Path:
    """A checkpoint path, or the MLflow run id of a stage that logged ``model/model.pt`` (fetched into ``dest``)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p.resolve()
    if _RUN_ID.match(ref):
        import mlflow

        from toolkit.tracking.stores import readable_tracking_uri

        # a store that does not exist cannot hold the run: say so, without creating it
        uri = readable_tracking_uri(execution, f"cannot fetch model/{checkpoints.MODEL_FILE} of MLflow run {ref}")
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=ref, artifact_path=f"model/{checkpoints.MODEL_FILE}", dst_path=str(dest), tracking_uri=uri
            )
        except Exception as e:  # noqa: BLE001 - any MLflow failure means the reference is unusable
            raise ConfigError(f"cannot fetch model/{checkpoints.MODEL_FILE} of MLflow run {ref}: {e}".splitlines()[0]) from None
        return Path(local)
    raise ConfigError(f"model reference {ref!r} is neither an existing checkpoint file nor an MLflow run id")


def check_fits_data(weights: ModelWeights, data: ImageData, path: str | Path) -> ModelWeights:
    """``weights`` if they take ``data``'s images and classes; else one ``CheckpointError`` line naming both."""
    have, want = weights.spec, data.spec
    if (have.channels, have.image_size) != (want.channels, want.image_size) or (
            weights.kind == "classifier" and have.num_classes != want.num_classes):
        raise checkpoints.CheckpointError(
            f"checkpoint {path} takes {have.channels}x{have.image_size}x{have.image_size} images"
            f"{f' of {have.num_classes} classes' if weights.kind == 'classifier' else ''}, but "
            f"data.name={data.name} gives {want.channels}x{want.image_size}x{want.image_size}"
            f"{f' of {want.num_classes}' if weights.kind == 'classifier' else ''}: a model from another dataset")
    return weights


def init_weights(study: Study, execution: Execution, folder: Path, data: ImageData | None = None) -> ModelWeights | None:
    """``model.init`` -> the SimCLR model's weights, read once by the driver (checked against the model and
    ``data`` now, not inside a worker), or None for a start from scratch."""
    if not study.model.init.startswith("simclr:"):
        return None
    path = resolve_model_ref(execution, study.model.init[len("simclr:"):], folder)
    weights = ModelWeights.from_payload(checkpoints.load_model_file(path, "simclr", study.model))
    return check_fits_data(weights, data, path) if data is not None else weights


def save_model_file(path: Path, kind: str, study: Study, state_dict: dict, data: ImageData | None = None,
                    **extra: Any) -> Path:
    """A stage's model file: the weights, the study that made them (``checkpoints.model_payload``), the
    images they take (``input``: ``data``'s ``ImageSpec``) and the names of their classes (without
    ``data``: MNIST's, which is what a file without them is read as)."""
    about = {"input": data.spec.to_dict(), "class_names": list(data.class_names)} if data is not None else {}
    return checkpoints.save(path, checkpoints.model_payload(kind, study.to_dict(), state_dict, **about, **extra))
