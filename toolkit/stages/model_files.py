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
from toolkit.maths.models import Classifier, SimCLRModel


def load_classifier_file(path: str | Path, device: torch.device | None = None) -> Classifier:
    """The classifier of a model file, in eval mode on ``device`` (``inference.build_classifier`` builds it)."""
    payload = checkpoints.load_model_file(path, "classifier")
    return build_classifier(ModelWeights.from_payload(payload), device or device_for())


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load_encoder(path: str | Path, device: torch.device) -> torch.nn.Module:
    """The frozen encoder of a SimCLR checkpoint, in eval mode on ``device``."""
    payload = checkpoints.load_model_file(path, "simclr")
    model = SimCLRModel(checkpoints.model_config_of(payload))
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


def init_weights(study: Study, execution: Execution, folder: Path) -> ModelWeights | None:
    """``model.init`` -> the SimCLR model's weights, read once by the driver (checked against the model now,
    not inside a worker), or None for a start from scratch."""
    if not study.model.init.startswith("simclr:"):
        return None
    path = resolve_model_ref(execution, study.model.init[len("simclr:"):], folder)
    return ModelWeights.from_payload(checkpoints.load_model_file(path, "simclr", study.model))


def save_model_file(path: Path, kind: str, study: Study, state_dict: dict, **extra: Any) -> Path:
    """A stage's model file: the weights and the study that made them (``checkpoints.model_payload``)."""
    return checkpoints.save(path, checkpoints.model_payload(kind, study.to_dict(), state_dict, **extra))
