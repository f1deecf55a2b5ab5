"""`toolkit predict`: a trained classifier's label and confidence for each image.

    toolkit predict predict.model=runs/stages/<key>/model.pt predict.input=digits/ predict.output=labels.csv

``predict.model`` is a toolkit model file (``model.pt``, or the stage folder holding it), an
MLflow run id (the run's logged MLflow model, else its ``model/model.pt`` artifact), an MLflow
model URI (``runs:/<run id>/model``, ``models:/<name>/<version>``, ``models:/<name>@best``,
``models:/<model id>``) or a downloaded MLflow model folder. ``predict.input`` is an idx3 image
file as MNIST ships it (``.gz`` too), a ``.npy`` uint8 array ``(N, 28, 28)``, or one PNG/JPEG
image or a folder of them (28x28, white digit on black like MNIST; colour is turned to grey).
Rows are written as CSV (``image,label,confidence``) to ``predict.output``, or printed.

Nothing here trains or logs: no MLflow run is opened, and MLflow is only touched when the
model comes from it. Bad input is a DataError / CheckpointError / ConfigError of one line.

No model runs code here. A model file loads with ``torch.load(weights_only=True)``; an MLflow
model is downloaded as files and only its ``weights.pt`` (tensors) and ``toolkit_model.json``
are read (``toolkit.tracking.model_package``), the network built by the toolkit's own classes. MLflow's
loaders import the model's ``code/`` and unpickle what it holds: they are used only for a model
the toolkit did not log, and only with ``predict.trust_pickled_model=true``.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from toolkit.engine import checkpoints
from toolkit.engine.checkpoints import CheckpointError
from toolkit.config import ConfigError, Execution, Study
from toolkit.datasets.mnist import IMAGE_SIZE, NUM_CLASSES, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IDX3_MAGIC, IDX1_MAGIC = 2051, 2049
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # runs:/, models:/, file://, s3://, ...

Predictor = Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, 28, 28) on CPU -> probabilities (B, 10)


@dataclass
class Predictions:
    """One row per image: its name, the predicted digit and the probability the model gave it."""

    names: list[str]
    labels: np.ndarray  # (N,) int64
    confidences: np.ndarray  # (N,) float32
    probs: np.ndarray  # (N, 10) float32
    model: str  # what was loaded, for the summary line

    def rows(self) -> list[tuple[str, int, float]]:
        return [(n, int(y), float(c)) for n, y, c in zip(self.names, self.labels, self.confidences)]


# ----------------------------------------------------------------------------- images


def _idx3_images(raw: bytes, path: Path) -> np.ndarray:
    """The images of an idx3 file (magic 2051, dims N x 28 x 28, then N*784 bytes): the one idx reader."""
    from toolkit.datasets.idx import parse_idx

    if int.from_bytes(raw[:4], "big") == IDX1_MAGIC:
        raise DataError(f"predict.input {path} is an idx1 (labels) file; give the images (idx3) file")
    images = parse_idx(raw, path, 3, "predict.input")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        rows, cols = images.shape[1:]
        raise DataError(f"predict.input {path}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE} (MNIST format)")
    return images


def _npy_images(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain .npy array"
        raise DataError(f"predict.input {path}: not a readable .npy array ({type(e).__name__}: {e})".splitlines()[0]) from None
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]  # (N, 1, 28, 28)
    if x.ndim == 2:
        x = x[None]  # one image
    if x.dtype != np.uint8:
        raise DataError(f"predict.input {path}: dtype {x.dtype}, expected uint8 images with values 0..255 "
                        "(from floats in [0, 1]: (x * 255).round().astype(np.uint8))")
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"predict.input {path}: shape {tuple(x.shape)}, expected (N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    return x


def _picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                w, h = im.size
                raise DataError(f"predict.input {path}: image is {w}x{h} pixels, expected {IMAGE_SIZE}x{IMAGE_SIZE} "
                                "(MNIST format: 28x28 grayscale, white digit on black)")
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"predict.input {path}: not a readable PNG/JPEG image ({e})".splitlines()[0]) from None


def read_images(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """uint8 images ``(N, 28, 28)`` and a name per image (file name, or ``<file>:<index>``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"predict.input {p}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"predict.input {p}: no PNG/JPEG images in this folder")
        images = np.stack([_picture(f) for f in files])
        return torch.from_numpy(images), [f.name for f in files]
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return torch.from_numpy(_picture(p)[None].copy()), [p.name]
    if suffix == ".npy":
        images = _npy_images(p)
    else:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise DataError(f"predict.input {p}: broken gzip file ({e})") from None
        elif int.from_bytes(raw[:4], "big") not in (IDX3_MAGIC, IDX1_MAGIC):
            raise DataError(f"predict.input {p}: unknown format; expected an idx3 image file (.gz too), "
                            "a .npy uint8 array (N, 28, 28), or PNG/JPEG images")
        images = _idx3_images(raw, p)
    if len(images) == 0:
        raise DataError(f"predict.input {p}: holds no images")
    return torch.from_numpy(np.ascontiguousarray(images)), [f"{p.name}:{i}" for i in range(len(images))]


# ----------------------------------------------------------------------------- models


def _toolkit_predictor(path: Path, device: torch.device, batch_size: int) -> Predictor:
    from toolkit.engine.loops import predict_probs, read_tta_recipe
    from toolkit.execution.pool_inference import build_classifier
    from toolkit.engine.jobs import ModelWeights

    try:
        payload = checkpoints.load_model_file(path, "classifier")
    except CheckpointError as e:
        if "holds a 'simclr' model" in str(e):
            raise CheckpointError(f"{e}: a SimCLR encoder gives features, not labels; predict with a classifier "
                                  "(supervised or pseudolabel stage; model.init=simclr:<path> starts one from it)") from None
        raise
    try:
        model = build_classifier(ModelWeights.from_payload(payload), device)
    except (RuntimeError, TypeError, KeyError, ConfigError) as e:
        raise CheckpointError(f"checkpoint {payload['path']} does not fit a classifier: {e}".splitlines()[0]) from None
    tta = payload.get("tta")  # a student predicts as the mean over augmented views: its file says how
    if tta is not None:
        try:
            read_tta_recipe(tta)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {payload['path']} has an unreadable test-time augmentation recipe "
                                  f"({e})") from None

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict_probs(model, images.to(device), tta, batch_size).cpu()

    return run


def _trusted_predictor(uri: str, model_uri: str) -> Predictor:
    """Any MLflow model shaped uint8 (N, 28, 28) -> (N, 10), loaded by MLflow: it runs the model's code."""
    from toolkit.tracking.logged_models import CLASSIFIER, ENCODER, KIND_KEY, load_trusted_model

    try:
        model, meta = load_trusted_model(uri, model_uri)
    except Exception as e:  # noqa: BLE001 - any MLflow failure means "no model there"
        raise CheckpointError(f"predict.model={model_uri}: not a loadable MLflow model "
                              f"({type(e).__name__}: {e})".splitlines()[0]) from None
    kind = meta.get(KIND_KEY)
    if kind == ENCODER:
        raise CheckpointError(f"predict.model={model_uri} is a SimCLR encoder (features out), not a classifier")
    sig = meta.get("_signature")
    if kind != CLASSIFIER:
        ins = sig.inputs.inputs if sig is not None and sig.inputs is not None else []
        outs = sig.outputs.inputs if sig is not None and sig.outputs is not None else []
        ok = (len(ins) == 1 and getattr(ins[0], "shape", None) == (-1, IMAGE_SIZE, IMAGE_SIZE)
              and len(outs) == 1 and getattr(outs[0], "shape", None) == (-1, NUM_CLASSES))
        if not ok:
            raise CheckpointError(f"predict.model={model_uri} is not a toolkit classifier "
                                  "(expected uint8 (-1, 28, 28) -> (-1, 10) in its signature)")

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(model.predict(images.cpu().numpy())), dtype=torch.float32)

    return run


def _mlflow_predictor(uri: str, model_uri: str, device: torch.device, batch_size: int,
                      trust_pickled: bool = False) -> Predictor:
    """A classifier the toolkit logged as an MLflow model (a local folder or a URI), from its plain files."""
    from toolkit.tracking.logged_models import download_model
    from toolkit.tracking.model_package import ENCODER, NotAToolkitModel, read_mlflow_model

    local, tmp = Path(model_uri), None
    try:
        if not local.is_dir():
            tmp = tempfile.mkdtemp(prefix="toolkit-predict-")
            try:
                local = download_model(uri, model_uri, tmp)  # files only: nothing in them is loaded
            except Exception as e:  # noqa: BLE001 - any MLflow failure means "no model there"
                raise CheckpointError(f"predict.model={model_uri}: not a loadable MLflow model "
                                      f"({type(e).__name__}: {e})".splitlines()[0]) from None
        try:
            model, _ = read_mlflow_model(local)
        except NotAToolkitModel as e:
            if trust_pickled:
                return _trusted_predictor(uri, model_uri)
            raise CheckpointError(f"predict.model={model_uri}: {e}; loading it would run code it holds, so it is "
                                  "refused (predict.trust_pickled_model=true loads it with MLflow: only for a "
                                  "model from a source you trust)") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if model.kind == ENCODER:
        raise CheckpointError(f"predict.model={model_uri} is a SimCLR encoder (features out), not a classifier")
    model.to(device)

    def run(images: torch.Tensor) -> torch.Tensor:
        return model(images, batch_size).cpu()

    return run


def _run_model_uri(uri: str, run_id: str) -> str | None:
    """``models:/<id>`` of the classifier an MLflow run logged as an MLflow model, if any."""
    from mlflow.tracking import MlflowClient

    from toolkit.tracking.logged_models import CLASSIFIER, KIND_KEY
    from toolkit.tracking.model_package import FORMAT, FORMAT_KEY

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - reported by the caller as "no such run"
        raise CheckpointError(f"predict.model={run_id}: no MLflow run with this id in {uri}") from None
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    for out in sorted(outputs, key=lambda o: o.step, reverse=True):
        try:
            logged = client.get_logged_model(out.model_id)
        except Exception:  # noqa: BLE001 - a deleted model is no candidate
            continue
        # a model logged before the toolkit's models were plain files is passed over: the run's
        # model/model.pt artifact is the same network, readable without running anything
        if logged.tags.get(KIND_KEY) == CLASSIFIER and logged.tags.get(FORMAT_KEY) == FORMAT:
            return f"models:/{logged.model_id}"
    return None


def load_predictor(ref: str, tracking_uri: str = "", device: torch.device | str = "cpu",
                   batch_size: int = 1024, trust_pickled: bool = False) -> tuple[Predictor, str]:
    """The classifier named by ``ref`` as a function of uint8 image batches, and what was loaded.

    ``trust_pickled``: an MLflow model the toolkit did not log is loaded by MLflow (running its
    code) instead of being refused."""
    if not ref:
        raise ConfigError("predict.model is empty: give a toolkit model.pt path, an MLflow run id or an MLflow "
                          "model URI (runs:/<run id>/model, models:/<name>/<version>)")
    device = torch.device(device)
    p = Path(ref).expanduser()
    if p.exists():
        if p.is_dir() and (p / "MLmodel").is_file():
            folder = str(p.resolve())
            return _mlflow_predictor(tracking_uri, folder, device, batch_size, trust_pickled), folder
        return _toolkit_predictor(p, device, batch_size), str(p.resolve())
    if _URI.match(ref):
        return _mlflow_predictor(tracking_uri, ref, device, batch_size, trust_pickled), ref
    if _RUN_ID.match(ref):
        model_uri = _run_model_uri(tracking_uri, ref)
        if model_uri:
            return (_mlflow_predictor(tracking_uri, model_uri, device, batch_size, trust_pickled),
                    f"{model_uri} (run {ref})")
        import mlflow

        dest = tempfile.mkdtemp(prefix="toolkit-predict-")
        try:
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=f"model/{checkpoints.MODEL_FILE}",
                                                        dst_path=dest, tracking_uri=tracking_uri)
            return _toolkit_predictor(Path(local), device, batch_size), f"run {ref} model/{checkpoints.MODEL_FILE}"
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001 - any MLflow failure means the run has no model
            raise CheckpointError(f"predict.model={ref}: MLflow run {ref} has no classifier (neither a logged MLflow "
                                  f"model nor a model/{checkpoints.MODEL_FILE} artifact)") from None
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    raise CheckpointError(f"predict.model={ref}: no such file, and not an MLflow run id or model URI "
                          "(runs:/<run id>/model, models:/<name>/<version>)")


# ----------------------------------------------------------------------------- the command


def predict_images(model: str, input_path: str, output: str = "", batch_size: int = 1024, device: torch.device | str = "cpu",
                   tracking_uri: str = "", trust_pickled: bool = False) -> Predictions:
    """Load ``model``, read the images at ``input_path``, predict; write CSV to ``output`` (if given)."""
    images, names = read_images(input_path)  # first: a bad path should not wait for a model download
    predictor, what = load_predictor(model, tracking_uri, device, batch_size, trust_pickled)
    probs = torch.cat([predictor(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise CheckpointError(f"predict.model={model} gives outputs of shape {tuple(probs.shape)}, expected (N, 10)")
    conf, labels = probs.max(1)
    result = Predictions(names, labels.numpy().astype(np.int64), conf.numpy().astype(np.float32),
                         probs.numpy().astype(np.float32), what)
    if output:
        write_csv(result, output)
    return result


def write_csv(result: Predictions, out: str | os.PathLike | io.TextIOBase) -> None:
    """``image,label,confidence`` rows; ``out`` is a path or an open text stream."""
    if isinstance(out, (str, os.PathLike)):
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            write_csv(result, f)
        return
    w = csv.writer(out, lineterminator="\n")
    w.writerow(("image", "label", "confidence"))
    for name, label, conf in result.rows():
        w.writerow((name, label, f"{conf:.4f}"))


def _store_of(execution: Execution) -> str:
    """The tracking URI a run id or MLflow URI is looked up in; a missing store is an error, not created.

    Without ``tracking.uri`` (or ``$MLFLOW_TRACKING_URI``) that is ``<run.output_dir>/mlflow.db``: a
    model the pipeline registered under another output folder (a profile's ``runs/cpu``) is not
    there, and an empty store made here would only say "not found".
    """
    from toolkit.tracking.stores import readable_tracking_uri  # no store is created for a path

    try:
        return readable_tracking_uri(execution, f"predict.model={execution.predict.model}")
    except ConfigError as e:
        raise CheckpointError(f"{e}; give the tracking.uri=... the pipeline printed with the model, or the "
                              "--config it ran with") from None


def predict(study: Study, execution: Execution) -> Predictions:
    """``toolkit predict``: CSV rows to ``predict.output`` (or stdout), a summary line on stderr.

    It reads the execution alone (the model, the images, the device, the store): what decided
    the model is in its file."""
    pc = execution.predict
    if not pc.model:
        load_predictor(pc.model)  # raises the ConfigError that names the key
    if not pc.input:
        raise ConfigError("predict.input is empty: give an idx3 file (.gz ok), a .npy uint8 (N, 28, 28) array, "
                          "or a PNG/JPEG image or folder of them")
    from toolkit.execution.pool_inference import device_for

    uri = ""
    if not Path(pc.model).expanduser().exists() and (_URI.match(pc.model) or _RUN_ID.match(pc.model)):
        uri = _store_of(execution)
    result = predict_images(pc.model, pc.input, pc.output, pc.batch_size, device_for(execution), uri,
                            pc.trust_pickled_model)
    if not pc.output:
        write_csv(result, sys.stdout)
    counts = np.bincount(result.labels, minlength=NUM_CLASSES)
    where = f" -> {Path(pc.output).expanduser().resolve()}" if pc.output else ""
    print(f"[predict] {len(result.names)} images{where}; model {result.model}; "
          f"mean confidence {float(result.confidences.mean()):.3f}; per digit {counts.tolist()}",
          file=sys.stderr, flush=True)
    return result
