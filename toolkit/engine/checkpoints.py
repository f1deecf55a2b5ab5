"""Checkpoint files: one dict per file, loaded with ``weights_only=True``, checked against the model asked for."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from toolkit.config import ModelConfig
from toolkit.maths.models import architecture
from toolkit.redaction import redact_tree

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or from another model; the message names the file."""


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a half checkpoint.

    Credentials in its strings are masked (``ray.storage_path=s3://KEY:SECRET@...`` in the stored
    config): model files are shared and logged to MLflow. Nothing runs with them: a stored config
    gives the model's architecture, and a resumed command takes its settings from its own config.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
    os.close(fd)
    try:
        # serialised in memory, written by Python: a full disk is then OSError(ENOSPC) naming the file, where
        # torch's own writer says only "unexpected pos ..." (the files are a few MB at most)
        buf = io.BytesIO()
        torch.save(redact_tree(payload), buf)
        try:
            Path(tmp).write_bytes(buf.getbuffer())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(p)) from None
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def model_payload(kind: str, config: dict, state_dict: dict, **extra: Any) -> dict[str, Any]:
    """What a model file holds: its kind, architecture, the study sections that made it (``config``:
    ``Study.to_dict()`` from the driver, ``TrainJob.sections()`` from a worker) and the weights."""
    return {
        "kind": kind,
        "architecture": architecture(ModelConfig(**config["model"])),
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        **extra,
    }


def load_plain(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that does not load is one ``CheckpointError`` line.

    torch's own message for a refused file advises loading it with ``weights_only=False``, which
    runs whatever code the file holds: it is not passed on. Its warning about the pickle protocol
    (a file written by plain ``pickle``, not ``torch.save``) would be a second line on stderr.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{what} {path} is not a readable toolkit {what}: not one the toolkit wrote, or "
                              "damaged (it does not load as plain tensors; a file holding other Python objects "
                              "or code is refused)") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, empty file, ...: the same thing to the user
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        if "weights_only" in reason:  # torch's advice again, in another wrapper: not passed on
            reason = type(e).__name__
        raise CheckpointError(f"{what} {path} is not a readable toolkit {what}: not one the toolkit wrote, or "
                              f"damaged ({reason})") from None


def load(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (p / name).is_file():
                p = p / name
                break
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    payload = load_plain(p)
    if not isinstance(payload, dict) or "kind" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"checkpoint {p} is not a toolkit checkpoint (no 'kind'/'state_dict')")
    payload["path"] = str(p)
    return payload


def load_model_file(path: str | os.PathLike, kind: str, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Load a model file and check it holds a ``kind`` model with ``model_cfg``'s architecture."""
    payload = load(path)
    if payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {payload['path']} holds a '{payload['kind']}' model, expected '{kind}'")
    if model_cfg is not None:
        want, got = architecture(model_cfg), payload.get("architecture", {})
        # files written before `pool` existed used global pooling
        got = {"pool": 1, **got}
        diff = {k: (got.get(k), v) for k, v in want.items() if k in ("width", "depth", "convs_per_stage", "pool") and got.get(k) != v}
        if diff:
            desc = ", ".join(f"model.{k}={g} in the checkpoint but {w} here" for k, (g, w) in diff.items())
            raise CheckpointError(f"checkpoint {payload['path']} is from another model: {desc}")
    return payload


def model_config_of(payload: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` a model file's payload (or ``{"config": ModelWeights.config}``) was built with.

    Keys this version does not know are left out (a file from an older version keeps loading:
    its architecture is checked against the network's weights when they are loaded)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in payload.get("config", {}).get("model", {}).items() if k in known}
    if "architecture" in payload:  # the shapes the weights were saved with (files from before `pool`: global pooling)
        fields.update({k: v for k, v in {"pool": 1, **payload["architecture"]}.items() if k in known})
    return ModelConfig(**fields)
