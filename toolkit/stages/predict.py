"""`toolkit predict`: a trained classifier's label and confidence for each image.

    toolkit predict predict.model=runs/stages/<key>/model.pt predict.input=images/ predict.output=labels.csv

``predict.model`` is a toolkit model file (``model.pt``, or the stage folder holding it), an
MLflow run id (the run's logged MLflow model, else its ``model/model.pt`` artifact), an MLflow
model URI (``runs:/<run id>/model``, ``models:/<name>/<version>``, ``models:/<name>@best``,
``models:/<model id>``) or a downloaded MLflow model folder. ``predict.input`` is an idx3 image
file (``.gz`` too), a ``.npy`` uint8 array, or one image file or a folder of them, of any size and
mode: each image is converted to the model's input (its ``ImageSpec``) exactly as training
converted its data (``toolkit.stages.predict_input``). Rows are written as CSV
(``image,label,confidence``) to ``predict.output``, or printed; the label is the model's class
name where it records them (a model file's ``class_names``, an MLflow model's description or
metadata), else the class index.

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
import io
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from toolkit.engine import checkpoints
from toolkit.engine.checkpoints import CheckpointError
from toolkit.config import ConfigError, Execution, Study
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec
from toolkit.stages.predict_input import load_images, read_images

__all__ = ["Model", "Predictions", "load_images", "load_predictor", "predict", "predict_images", "read_images",
           "write_csv"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # runs:/, models:/, file://, s3://, ...

Predictor = Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, C, S, S) on CPU -> probabilities (B, K)


@dataclass
class Model:
    """A classifier ready to predict: its function, the images it takes and the names of its classes."""

    predict: Predictor
    spec: ImageSpec
    class_names: tuple[str, ...] | None  # label i is class_names[i]; None: the index is the label
    what: str = ""  # what was loaded, for the summary line


@dataclass
class Predictions:
    """One row per image: its name, the predicted class and the probability the model gave it."""

    names: list[str]
    labels: np.ndarray  # (N,) int64 class indices
    confidences: np.ndarray  # (N,) float32
    probs: np.ndarray  # (N, K) float32
    model: str  # what was loaded, for the summary line
    class_names: tuple[str, ...] | None = None

    def rows(self) -> list[tuple[str, int | str, float]]:
        """(image, label, confidence); the label is the class name when the model has names."""
        named = self.class_names
        return [(n, named[int(y)] if named else int(y), float(c))
                for n, y, c in zip(self.names, self.labels, self.confidences)]


# ----------------------------------------------------------------------------- models


def _toolkit_predictor(path: Path, device: torch.device, batch_size: int) -> Model:
    from toolkit.engine.loops import predict_probs, read_tta_recipe
    from toolkit.execution.pool_inference import build_classifier
    from toolkit.engine.jobs import ModelWeights
    from toolkit.tracking.model_package import read_class_names, read_spec

    try:
        payload = checkpoints.load_model_file(path, "classifier")
    except CheckpointError as e:
        if "holds a 'simclr' model" in str(e):
            raise CheckpointError(f"{e}: a SimCLR encoder gives features, not labels; predict with a classifier "
                                  "(supervised or pseudolabel stage; model.init=simclr:<path> starts one from it)") from None
        raise
    try:  # a file without "input" / "class_names" is from before other datasets: MNIST, labels are indices
        spec = read_spec(payload.get("input"))
        names = read_class_names(payload.get("class_names"), spec.num_classes)
        model = build_classifier(replace(ModelWeights.from_payload(payload), spec=spec), device)
    except (RuntimeError, TypeError, KeyError, ValueError, ConfigError) as e:
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

    return Model(run, spec, names)


def _signature_spec(sig) -> tuple[ImageSpec, bool] | None:
    """The images and classes an MLflow signature says, uint8 (-1, S, S) or (-1, C, S, S) -> (-1, K), and
    whether its batches have no channel axis (the 3-D form); None for any other signature.

    Only channels, side and classes matter (the model standardises its input itself)."""
    ins = sig.inputs.inputs if sig is not None and sig.inputs is not None else []
    outs = sig.outputs.inputs if sig is not None and sig.outputs is not None else []
    if len(ins) != 1 or len(outs) != 1:
        return None
    shape, out = tuple(getattr(ins[0], "shape", None) or ()), tuple(getattr(outs[0], "shape", None) or ())
    flat = len(shape) == 3
    if flat:
        shape = (-1, 1, *shape[1:])
    if not (len(shape) == 4 and shape[0] == -1 and shape[1] in (1, 3) and shape[2] == shape[3] and shape[2] >= 1
            and len(out) == 2 and out[0] == -1 and out[1] >= 1):
        return None
    c = shape[1]
    return ImageSpec(c, shape[2], out[1], (0.5,) * c, (0.5,) * c), flat


def _trusted_predictor(uri: str, model_uri: str) -> Model:
    """Any MLflow model shaped uint8 (N, S, S) or (N, C, S, S) -> (N, K), loaded by MLflow: it runs the model's code."""
    from toolkit.tracking.logged_models import CLASSIFIER, ENCODER, KIND_KEY, load_trusted_model
    from toolkit.tracking.model_package import CLASS_NAMES_KEY, read_class_names

    try:
        model, meta = load_trusted_model(uri, model_uri)
    except Exception as e:  # noqa: BLE001 - any MLflow failure means "no model there"
        raise CheckpointError(f"predict.model={model_uri}: not a loadable MLflow model "
                              f"({type(e).__name__}: {e})".splitlines()[0]) from None
    kind = meta.get(KIND_KEY)
    if kind == ENCODER:
        raise CheckpointError(f"predict.model={model_uri} is a SimCLR encoder (features out), not a classifier")
    found = _signature_spec(meta.get("_signature"))
    if found is None and kind == CLASSIFIER:
        found = MNIST_SPEC, True  # a toolkit classifier from before its models were plain files: MNIST's
    if found is None:
        raise CheckpointError(f"predict.model={model_uri} is not a toolkit classifier "
                              "(expected uint8 (-1, S, S) or (-1, C, S, S) -> (-1, K) in its signature)")
    spec, flat = found
    try:
        names = read_class_names(meta.get(CLASS_NAMES_KEY), spec.num_classes)
    except ValueError:
        names = None  # names that do not fit its outputs name nothing: labels stay indices

    def run(images: torch.Tensor) -> torch.Tensor:
        x = images[:, 0] if flat else images  # the batch in its signature's own shape
        return torch.as_tensor(np.asarray(model.predict(x.cpu().numpy())), dtype=torch.float32)

    return Model(run, spec, names)


def _mlflow_predictor(uri: str, model_uri: str, device: torch.device, batch_size: int,
                      trust_pickled: bool = False) -> Model:
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

    return Model(run, model.spec, model.class_names)


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
                   batch_size: int = 1024, trust_pickled: bool = False) -> Model:
    """The classifier named by ``ref``: a function of uint8 image batches of its spec, and what was loaded.

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
            return replace(_mlflow_predictor(tracking_uri, folder, device, batch_size, trust_pickled), what=folder)
        return replace(_toolkit_predictor(p, device, batch_size), what=str(p.resolve()))
    if _URI.match(ref):
        return replace(_mlflow_predictor(tracking_uri, ref, device, batch_size, trust_pickled), what=ref)
    if _RUN_ID.match(ref):
        model_uri = _run_model_uri(tracking_uri, ref)
        if model_uri:
            return replace(_mlflow_predictor(tracking_uri, model_uri, device, batch_size, trust_pickled),
                           what=f"{model_uri} (run {ref})")
        import mlflow

        dest = tempfile.mkdtemp(prefix="toolkit-predict-")
        try:
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=f"model/{checkpoints.MODEL_FILE}",
                                                        dst_path=dest, tracking_uri=tracking_uri)
            return replace(_toolkit_predictor(Path(local), device, batch_size),
                           what=f"run {ref} model/{checkpoints.MODEL_FILE}")
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
    """Load ``model``, read the images at ``input_path``, convert them to the model's input, predict; write
    CSV to ``output`` (if given)."""
    found = load_images(input_path)  # first: a bad path should not wait for a model download
    loaded = load_predictor(model, tracking_uri, device, batch_size, trust_pickled)
    images = found.to_spec(loaded.spec)
    probs = torch.cat([loaded.predict(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])
    k = loaded.spec.num_classes
    if probs.ndim != 2 or probs.shape[1] != k:
        raise CheckpointError(f"predict.model={model} gives outputs of shape {tuple(probs.shape)}, expected (N, {k})")
    conf, labels = probs.max(1)
    result = Predictions(found.names, labels.numpy().astype(np.int64), conf.numpy().astype(np.float32),
                         probs.numpy().astype(np.float32), loaded.what, loaded.class_names)
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
        raise ConfigError("predict.input is empty: give an idx3 file (.gz ok), a .npy uint8 (N, H, W) / (N, C, H, W) "
                          "array, or a PNG/JPEG image or folder of them")
    from toolkit.execution.pool_inference import device_for

    uri = ""
    if not Path(pc.model).expanduser().exists() and (_URI.match(pc.model) or _RUN_ID.match(pc.model)):
        uri = _store_of(execution)
    result = predict_images(pc.model, pc.input, pc.output, pc.batch_size, device_for(execution), uri,
                            pc.trust_pickled_model)
    if not pc.output:
        write_csv(result, sys.stdout)
    counts = np.bincount(result.labels, minlength=result.probs.shape[1]).tolist()
    per_class = dict(zip(result.class_names, counts)) if result.class_names else counts
    where = f" -> {Path(pc.output).expanduser().resolve()}" if pc.output else ""
    print(f"[predict] {len(result.names)} images{where}; model {result.model}; "
          f"mean confidence {float(result.confidences.mean()):.3f}; per class {per_class}",
          file=sys.stderr, flush=True)
    return result
