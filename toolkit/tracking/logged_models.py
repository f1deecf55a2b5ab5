"""MLflow Models, dataset inputs and the Model Registry, for runs the toolkit opened by id.

What a logged model takes and gives (its signature says the same), for the ``ImageSpec`` of the
data it was trained on (``spec``: C channels, S x S pixels, K classes):

* classifier: uint8 images ``(N, C, S, S)`` -> float32 class probabilities ``(N, K)``;
* encoder:    uint8 images ``(N, C, S, S)`` -> float32 features ``(N, feature_dim)``;
* MNIST-shaped models (1 channel, 28 px) take ``(N, 28, 28)``, as they always did, so existing
  clients keep working; other one-channel models take ``(N, 1, S, S)`` (and ``(N, S, S)`` when called).

Raw uint8 in, converted to C x S x S as training converted them (``toolkit.datasets.convert``): a
model's user needs no knowledge of the toolkit's scaling. Label ``i`` is ``class_names[i]``, stored
in the description and the MLmodel metadata (``toolkit.class_names``). A logged model is a
``python_function`` MLflow model whose network is two plain files (``toolkit.tracking.model_package``):
``weights.pt`` (tensors only) and ``toolkit_model.json`` (kind, architecture, input spec, class names,
test-time recipe). MLflow's own loaders (``mlflow.pyfunc.load_model``, ``mlflow models serve``) run
``toolkit/tracking/pyfunc.py`` ("models from code", with a copy of the ``toolkit`` package as the
model's ``code/``), which rebuilds the network from those files; nothing in the model is pickled. ``toolkit predict``
calls no MLflow loader at all: it downloads the model's files (``download_model``) and reads
the two files itself, so a model from elsewhere cannot run code in it.

The toolkit logs through ``MlflowClient`` with explicit run ids (runs are opened by id, and
there is no fluent active run). MLflow's ``Model.log`` accepts ``run_id=`` but finishes
its logged model through MLflow's *global* tracking URI, so each call here sets that URI (and
the registry URI) for its own duration, under a lock, and restores both afterwards, including
the ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` environment variables MLflow writes.

A stage calls, in the driver and on rank 0 only (``tracker`` may be passed where a URI is
asked for; a disabled tracker makes every call a no-op)::

    log_split_dataset(tracker, tracker.run_id, split, source=str(resolve_root(execution.run.data_root)))
    uri = log_classifier(tracker, tracker.run_id, model, input_example=data.test_images[:4], step=steps,
                         spec=data.spec, class_names=data.class_names)
    log_encoder(tracker, tracker.run_id, simclr_model, input_example=data.test_images[:4], spec=data.spec,
                class_names=data.class_names)
    register_best(tracker, uri, name)   # the pipeline, for its best model
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from toolkit.tracking import model_package
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# What the toolkit writes into each MLmodel's metadata; `toolkit predict` reads it back.
KIND_KEY = "toolkit.kind"
CLASSIFIER, ENCODER = model_package.CLASSIFIER, model_package.ENCODER
DEFAULT_REGISTERED_NAME = "toolkit-mnist-classifier"

_GLOBAL_URI_LOCK = threading.RLock()


# ----------------------------------------------------------------------------- tracking URI plumbing


def _disabled(target: Any) -> bool:
    """A ``Tracker.disabled()`` (tracking.enabled=false, non-zero ranks): every helper is then a no-op."""
    return getattr(target, "enabled", True) is False


def _uri_of(target: Any) -> str:
    """A tracking URI from a URI string, a ``toolkit.tracking.runs.Tracker`` or an ``MlflowClient``."""
    if isinstance(target, str) and target:
        return target
    uri = getattr(target, "uri", None) or getattr(target, "tracking_uri", None)
    if uri is None and hasattr(target, "_tracking_client"):
        uri = target._tracking_client.tracking_uri
    if not uri:
        raise ValueError(f"no MLflow tracking URI in {target!r} (tracking disabled?)")
    return str(uri)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking and registry URIs at ``uri`` for the block, then restore them.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (and
    unsets it when reset to None), which Ray workers and subprocesses inherit: both the module
    globals and the environment variables are put back exactly as they were.
    """
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    tracking_mod = _tracking_service.utils
    registry_mod = _model_registry.utils
    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    with _GLOBAL_URI_LOCK:
        saved_env = {k: os.environ.get(k) for k in env_keys}
        saved_tracking = getattr(tracking_mod, "_tracking_uri", None)
        saved_registry = getattr(registry_mod, "_registry_uri", None)
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            yield
        finally:
            # the setters have side effects (env, tracer reset); put the raw state back
            mlflow.set_tracking_uri(saved_tracking)
            mlflow.set_registry_uri(saved_registry)
            tracking_mod._tracking_uri = saved_tracking
            registry_mod._registry_uri = saved_registry
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ----------------------------------------------------------------------------- models


def pip_requirements() -> list[str]:
    """What serving a logged model needs (given explicitly: MLflow's inference of it costs ~6 s)."""
    import mlflow

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
    ]


def _example_images(input_example: Any, spec: ImageSpec = MNIST_SPEC, most: int = 8) -> np.ndarray:
    """uint8 ``(2..most, *signature shape)``: at most ``most`` images (it is stored in the model as JSON).

    ``input_example``: None, or uint8 ``(N, C, S, S)`` of ``spec`` (``(N, S, S)`` for one channel); blank
    images stand in for missing ones (a dataset without a test set gives an empty example)."""
    shape = model_package.signature_shape(spec)[1:]
    x = np.zeros((0, *shape), np.uint8) if input_example is None else (
        input_example.detach().cpu().numpy() if isinstance(input_example, torch.Tensor) else np.asarray(input_example))
    c, s = spec.channels, spec.image_size
    if x.dtype == np.uint8 and x.ndim == 3 and c == 1 and x.shape[1:] == (s, s):
        x = x[:, None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != spec.input_shape():
        want = f"(N, {c}, {s}, {s})" + (f" or (N, {s}, {s})" if c == 1 else "")
        raise ValueError(f"input_example must be uint8 {want} images (the model's input spec), got {x.dtype} {x.shape}")
    x = x[:most].reshape(-1, *shape)  # MNIST-shaped models keep their (N, 28, 28) example
    if len(x) < 2:
        x = np.concatenate([x, np.zeros((2 - len(x), *shape), np.uint8)])
    return np.ascontiguousarray(x)


def _signature(spec: ImageSpec, out_dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), model_package.signature_shape(spec))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out_dim))]),
    )


def _input_meaning(spec: ImageSpec) -> str:
    """The MLmodel's ``toolkit.input``: what a caller sends, in words."""
    shape = ", ".join(["N", *(str(d) for d in model_package.signature_shape(spec)[1:])])
    if spec == MNIST_SPEC:
        return f"uint8 ({shape}), MNIST format: 0 background, 255 ink"
    return f"uint8 ({shape}): {spec.channels}-channel {spec.image_size}x{spec.image_size} images, pixels 0..255"


@dataclass(frozen=True)
class LogOptions:
    """How ``log_classifier`` / ``log_encoder`` log a model, beyond the model itself.

    ``input_example``: uint8 images ``(N, C, S, S)`` of ``spec`` stored with the model and shown in the UI
    (a few test images are best; without one, or with an empty one, two blank images). ``metadata``:
    extra MLmodel metadata. ``step``: the run's step the model belongs to. ``tta``: the classifier's
    test-time augmentation recipe (``engine.tta_recipe``), stored in its description: the model then
    predicts, in MLflow and in ``toolkit predict``, as the mean over the augmented views, as its model
    file does. ``spec``: the images the network was built for (``data.spec``; it decides the signature).
    ``class_names``: the dataset's class names (``data.class_names``), one per class.
    """

    input_example: Any = None
    metadata: dict | None = None
    step: int = 0
    tta: dict | None = None
    spec: ImageSpec = MNIST_SPEC
    class_names: tuple | list | None = None


def _toolkit_code(dest: Path) -> str:
    """A copy of the ``toolkit`` package (sources only) at ``dest / "toolkit"``: the model's ``code/``."""
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, dest / "toolkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest / "toolkit")


def _log_model(uri: str, run_id: str, model: nn.Module, name: str, kind: str, opts: LogOptions) -> str:
    """Log ``model``, a toolkit network of ``kind``, as an MLflow model of run ``run_id``: its ``models:/<id>`` URI."""
    import mlflow
    from mlflow.models import Model

    import logging

    # logging a model validates its input example (INFO) and copies files with progress bars: a command's
    # console shows toolkit's lines only
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = _client(uri)
    run = client.get_run(run_id)
    example = _example_images(opts.input_example, opts.spec)
    with tempfile.TemporaryDirectory(prefix="toolkit-model-") as tmp:
        got, weights, description = model_package.write(Path(tmp) / "files", model, opts.tta, opts.spec,
                                                        opts.class_names)
        if got != kind:
            raise ValueError(f"log_{kind} was given a {got} ({type(model).__name__})")
        doc = json.loads(description.read_text())
        out_dim = doc["output"]["shape"][-1]
        meta = {
            KIND_KEY: kind,
            model_package.FORMAT_KEY: model_package.FORMAT,
            "toolkit.input": _input_meaning(opts.spec),
            "toolkit.output": f"float32 (N, {out_dim}) " + ("class probabilities" if kind == CLASSIFIER else "features"),
            **({model_package.CLASS_NAMES_KEY: doc["class_names"]} if doc["class_names"] is not None else {}),
            **(opts.metadata or {}),
        }
        with using_tracking_uri(uri):
            # created here with the run's experiment: left to MLflow, an MLFLOW_EXPERIMENT_NAME in
            # the environment would decide where the model goes
            logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
                                                tags={KIND_KEY: kind, model_package.FORMAT_KEY: model_package.FORMAT},
                                                params=dict(run.data.params))
            # mlflow.pyfunc.log_model is this call without run_id= (it would need a fluent active run)
            info = Model.log(
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(Path(__file__).resolve().with_name("pyfunc.py")),  # models from code
                artifacts={model_package.WEIGHTS: str(weights), model_package.DESCRIPTION: str(description)},
                code_paths=[_toolkit_code(Path(tmp) / "code")],
                signature=_signature(opts.spec, out_dim),
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata=meta,
                step=opts.step,
                flavor_name="pyfunc.ModelFromCode",
            )
    return info.model_uri


def log_classifier(target: Any, run_id: str, model: nn.Module, name: str = "model",
                   registered_name: str | None = None, **options: Any) -> str:
    """Log ``model`` (a ``toolkit.maths.models.Classifier``) as an MLflow model of run ``run_id``.

    ``target``: the tracking URI, a ``Tracker`` or an ``MlflowClient``. The logged model maps uint8
    ``(N, C, S, S)`` images of ``spec`` (``(N, 28, 28)`` for MNIST) to ``(N, K)`` probabilities.
    ``options``: ``LogOptions``'s fields (``input_example``, ``metadata``, ``step``, ``tta``, ``spec``,
    ``class_names``). ``registered_name`` also registers it (see
    ``register_best``). Returns the model URI (``models:/<model id>``), which ``toolkit predict``,
    ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` accept.
    """
    if _disabled(target):
        return ""
    model_uri = _log_model(_uri_of(target), run_id, model, name, CLASSIFIER, LogOptions(**options))
    if registered_name:
        register_best(target, model_uri, registered_name)
    return model_uri


def log_encoder(target: Any, run_id: str, model: nn.Module, name: str = "encoder", **options: Any) -> str:
    """Log a SimCLR encoder (a ``SimCLRModel``, whose ``.encoder`` is used, or an ``Encoder``).

    The logged model maps uint8 images of ``spec`` to the encoder's features (what the
    probes use; the projection head is left out). ``options`` as for ``log_classifier``.
    Returns the model URI.
    """
    if _disabled(target):
        return ""
    return _log_model(_uri_of(target), run_id, model, name, ENCODER, LogOptions(**options))


def register_best(target: Any, model_uri: str, name: str = DEFAULT_REGISTERED_NAME, *,
                  alias: str | None = "best", tags: dict[str, Any] | None = None,
                  description: str | None = None) -> str:
    """Register ``model_uri`` (as returned by ``log_classifier``) as a new version of ``name``.

    The registered model is created on first use; ``alias`` (default ``best``) is moved to the
    new version, so ``models:/<name>@best`` always names the latest best model. Returns the
    version's URI ``models:/<name>/<version>``.
    """
    from mlflow.exceptions import MlflowException

    if _disabled(target):
        return ""
    uri = _uri_of(target)
    client = _client(uri)
    # the sqlite registry resolves a models:/<id> source through MLflow's global client
    with using_tracking_uri(uri):
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as e:
            if "ALREADY_EXISTS" not in str(e.error_code):
                raise
        model_id, run_id = None, None
        if model_uri.startswith("models:/m-"):
            model_id = model_uri[len("models:/"):].split("/")[0]
            run_id = client.get_logged_model(model_id).source_run_id
        elif model_uri.startswith("runs:/"):
            run_id = model_uri[len("runs:/"):].split("/")[0]
        version = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id,
                                              tags={k: str(v) for k, v in (tags or {}).items()},
                                              description=description)
        if model_id:
            _link_version_to_logged_model(client, model_id, name, version.version)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"


def _link_version_to_logged_model(client, model_id: str, name: str, version: int | str) -> None:
    """Record ``name`` v``version`` in the logged model's ``mlflow.modelVersions`` tag.

    The UI's logged-model page ("Model versions", the "Not registered" badge) and the runs'
    "Logged models" tables read that tag. ``mlflow.register_model`` and a tracking server's
    CreateModelVersion write it; ``MlflowClient.create_model_version`` on a sqlite or file
    store does not. Entries already there (a server wrote it) are kept and not repeated.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    have = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    versions = json.loads(have) if have else []
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in versions):
        entry = {"name": name, "version": version}  # as MLflow writes it (an int from a sqlite registry)
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions + [entry])})


# ----------------------------------------------------------------------------- loading


def download_model(uri: str, model_uri: str, dst: str) -> Path:
    """The files of MLflow model ``model_uri`` (``runs:/``, ``models:/``, an artifact URI) under ``dst``.

    Only copies files: nothing in them is loaded or run (``toolkit predict`` then reads the
    toolkit's own two files, ``model_package.read_mlflow_model``).
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file on stderr otherwise
    with using_tracking_uri(uri) if uri else contextlib.nullcontext():
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst))


def load_trusted_model(uri: str, model_uri: str):
    """``mlflow.pyfunc.load_model(model_uri)``, which RUNS the model's code and unpickles what it holds.

    Only for ``predict.trust_pickled_model=true``: a model the user vouches for that the toolkit did
    not log (or logged before its models were plain files). MLflow refuses pickled models unless
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is true; the opt-in sets it for this call.
    Returns (the pyfunc model, its MLmodel metadata with ``_signature``).
    """
    import mlflow
    from mlflow.models import get_model_info

    saved = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    try:
        with using_tracking_uri(uri) if uri else contextlib.nullcontext():
            info = get_model_info(model_uri)
            model = mlflow.pyfunc.load_model(model_uri)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = saved
    return model, dict(info.metadata or {}) | {"_signature": info.signature}


def registered_versions(target: Any, name: str) -> Sequence:
    """The versions of registered model ``name`` (newest first)."""
    return _client(_uri_of(target)).search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])


# the run's dataset inputs live beside the models; stages import them from here
from toolkit.tracking.split_inputs import log_split_dataset, split_digest  # noqa: E402,F401
