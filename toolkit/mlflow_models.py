"""MLflow Models, dataset inputs and the Model Registry, for runs the toolkit opened by id.

What a logged model takes and gives (its signature says the same):

* classifier: uint8 images ``(N, 28, 28)``, MNIST's own format (0 = background, 255 = ink)
  -> float32 class probabilities ``(N, 10)``;
* encoder:    uint8 images ``(N, 28, 28)`` -> float32 features ``(N, feature_dim)``.

Raw uint8 in: a served model takes the pixels as MNIST stores them, and its user needs no
knowledge of the toolkit's scaling. The networks themselves take float ``[0, 1]``
``(N, 1, 28, 28)`` and standardise inside (``toolkit.models``); the exported wrapper adds the
``/ 255`` and the softmax. Models are saved in MLflow's ``pt2`` format (``torch.export``): a
traced graph that loads without pickle and without the ``toolkit`` package installed, with a
dynamic batch dimension.

The toolkit logs through ``MlflowClient`` with explicit run ids (runs are opened by id, and
there is no fluent active run). ``mlflow.pytorch.log_model`` accepts ``run_id=`` but finishes
its logged model through MLflow's *global* tracking URI, so each call here sets that URI (and
the registry URI) for its own duration, under a lock, and restores both afterwards, including
the ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` environment variables MLflow writes.

A stage calls, in the driver and on rank 0 only (``tracker`` may be passed where a URI is
asked for; a disabled tracker makes every call a no-op)::

    log_split_dataset(tracker, tracker.run_id, split, source=str(resolve_root(cfg.data.root)))
    uri = log_classifier(tracker, tracker.run_id, model, input_example=data.test_images[:4], step=steps)
    log_encoder(tracker, tracker.run_id, simclr_model, input_example=data.test_images[:4])
    register_best(tracker, uri, name)   # the pipeline, for its best model

The first model logged in a process also pays for importing ``torch.export`` (seconds).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# What the toolkit writes into each MLmodel's metadata; `toolkit predict` reads it back.
KIND_KEY = "toolkit.kind"
CLASSIFIER, ENCODER = "classifier", "encoder"
DEFAULT_REGISTERED_NAME = "toolkit-mnist-classifier"

_GLOBAL_URI_LOCK = threading.RLock()


# ----------------------------------------------------------------------------- exported wrappers


class ImageClassifier(nn.Module):
    """uint8 ``(N, 28, 28)`` -> class probabilities ``(N, 10)``: what a logged classifier computes."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.unsqueeze(1).to(torch.float32) / 255.0  # (N, 1, 28, 28) in [0, 1]
        return self.classifier(x).softmax(dim=1)


class ImageEncoder(nn.Module):
    """uint8 ``(N, 28, 28)`` -> features ``(N, feature_dim)``: what a logged encoder computes."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.unsqueeze(1).to(torch.float32) / 255.0)


def _plain_cpu_eval(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode (dropout off, BatchNorm on running statistics), unwrapped from DDP."""
    model = getattr(model, "module", model)  # DistributedDataParallel / Accelerate wrappers
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return copy.deepcopy(model).to("cpu").eval()


# ----------------------------------------------------------------------------- tracking URI plumbing


def _disabled(target: Any) -> bool:
    """A ``Tracker.disabled()`` (tracking.enabled=false, non-zero ranks): every helper is then a no-op."""
    return getattr(target, "enabled", True) is False


def _uri_of(target: Any) -> str:
    """A tracking URI from a URI string, a ``toolkit.tracking.Tracker`` or an ``MlflowClient``."""
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


def _example_images(input_example: Any, most: int = 8) -> np.ndarray:
    """uint8 ``(2..most, 28, 28)``; the batch must be > 1, or torch.export fixes the batch size to 1."""
    if input_example is None:
        return np.zeros((2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    x = input_example.detach().cpu().numpy() if isinstance(input_example, torch.Tensor) else np.asarray(input_example)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"input_example must be uint8 (N, 28, 28) images, got {x.dtype} {x.shape}")
    if len(x) < 2:
        x = np.concatenate([x, np.zeros((2 - len(x), IMAGE_SIZE, IMAGE_SIZE), np.uint8)])
    return np.ascontiguousarray(x[:most])


def _signature(out_dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out_dim))]),
    )


def _log_pytorch(uri: str, run_id: str, wrapped: nn.Module, out_dim: int, name: str, kind: str,
                 input_example: Any, registered_name: str | None, metadata: dict | None,
                 step: int) -> str:
    import mlflow

    client = _client(uri)
    run = client.get_run(run_id)
    example = _example_images(input_example)
    meta = {
        KIND_KEY: kind,
        "toolkit.input": "uint8 (N, 28, 28), MNIST format: 0 background, 255 ink",
        "toolkit.output": "float32 (N, 10) class probabilities" if kind == CLASSIFIER else f"float32 (N, {out_dim}) features",
        **(metadata or {}),
    }
    with using_tracking_uri(uri), warnings.catch_warnings():
        # torch.export's packager warns about weights it found on the CPU, where they are meant to be
        warnings.filterwarnings("ignore", message="No complete tensor found", category=UserWarning)
        # created here with the run's experiment: left to MLflow, an MLFLOW_EXPERIMENT_NAME in
        # the environment would decide where the model goes
        logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
                                            tags={KIND_KEY: kind}, params=dict(run.data.params))
        info = mlflow.pytorch.log_model(
            wrapped,
            name=name,
            run_id=run_id,
            model_id=logged.model_id,
            signature=_signature(out_dim),
            input_example=example,
            serialization_format="pt2",
            pip_requirements=pip_requirements(),
            metadata=meta,
            step=step,
        )
    model_uri = info.model_uri
    if registered_name:
        register_best(uri, model_uri, registered_name)
    return model_uri


def log_classifier(target: Any, run_id: str, model: nn.Module, name: str = "model",
                   registered_name: str | None = None, *, input_example: Any = None,
                   metadata: dict | None = None, step: int = 0) -> str:
    """Log ``model`` (a ``toolkit.models.Classifier``) as an MLflow PyTorch model of run ``run_id``.

    ``target``: the tracking URI, a ``Tracker`` or an ``MlflowClient``. The logged model maps uint8
    ``(N, 28, 28)`` images to ``(N, 10)`` probabilities; ``input_example`` (uint8 images, a few
    test digits are best) is stored with it and shown in the UI; without one, two blank images.
    ``registered_name`` also registers it (see ``register_best``). Returns the model URI
    (``models:/<model id>``), which ``mlflow.pytorch.load_model`` and ``toolkit predict`` accept.
    """
    if _disabled(target):
        return ""
    wrapped = ImageClassifier(_plain_cpu_eval(model)).eval()
    return _log_pytorch(_uri_of(target), run_id, wrapped, NUM_CLASSES, name, CLASSIFIER,
                        input_example, registered_name, metadata, step)


def log_encoder(target: Any, run_id: str, model: nn.Module, name: str = "encoder", *,
                input_example: Any = None, metadata: dict | None = None, step: int = 0) -> str:
    """Log a SimCLR encoder (a ``SimCLRModel``, whose ``.encoder`` is used, or an ``Encoder``).

    The logged model maps uint8 ``(N, 28, 28)`` images to the encoder's features (what the
    probes use; the projection head is left out). Returns the model URI.
    """
    if _disabled(target):
        return ""
    model = _plain_cpu_eval(model)
    wrapped = ImageEncoder(getattr(model, "encoder", model)).eval()
    with torch.no_grad():
        out_dim = int(wrapped(torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)).shape[1])
    return _log_pytorch(_uri_of(target), run_id, wrapped, out_dim, name, ENCODER,
                        input_example, None, metadata, step)


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


# ----------------------------------------------------------------------------- datasets


def split_digest(split) -> str:
    """A stable 8-hex digest of a split's index arrays (same split -> same digest everywhere)."""
    h = hashlib.sha256()
    for part in (split.labeled, split.val, split.pool):
        h.update(np.asarray(part.cpu() if isinstance(part, torch.Tensor) else part, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:8]


def log_split_dataset(target: Any, run_id: str, split, name: str | None = None, digest: str | None = None,
                      source: str | None = None) -> list[str]:
    """Log the labeled / validation / pool split as the run's MLflow dataset inputs.

    Two datasets, both built with ``mlflow.data.from_numpy`` from the split's index arrays into
    the MNIST training images: ``<name>`` (``labeled`` and ``pool`` indices, context
    ``training``) and ``<name>-val`` (``val``, context ``validation``). Their profile and the
    input tags hold the sizes (``labeled``, ``val``, ``pool``), the split seed and labels per
    class. ``name`` defaults to ``mnist-seed<seed>-<labels_per_class>x10``, ``digest`` to
    ``split_digest(split)``; ``source`` (e.g. the MNIST folder) is recorded as the dataset source.
    Logging the same split again (a resumed run) adds nothing. Returns the two dataset names.
    """
    if _disabled(target):
        return []
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    uri = _uri_of(target)
    name = name or f"mnist-seed{split.seed}-{split.labels_per_class}x{NUM_CLASSES}"
    digest = digest or split_digest(split)

    def arr(t) -> np.ndarray:
        return np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.int64)

    sizes = {"labeled": len(split.labeled), "val": len(split.val), "pool": len(split.pool)}
    about = {**sizes, "seed": int(split.seed), "labels_per_class": int(split.labels_per_class),
             "indices_into": "MNIST training images"}
    parts = (
        (name, {"labeled": arr(split.labeled), "pool": arr(split.pool)}, "training"),
        (f"{name}-val", {"val": arr(split.val)}, "validation"),
    )
    inputs = []
    with using_tracking_uri(uri):  # from_numpy without a source resolves one from the fluent context
        for ds_name, features, context in parts:
            with warnings.catch_warnings():  # a local folder "can be interpreted in multiple ways" (all local)
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_numpy(features, source=source, name=ds_name, digest=digest)
            entity = ds._to_mlflow_entity()
            profile = {**about, **json.loads(entity.profile or "{}")}
            entity = Dataset(name=entity.name, digest=entity.digest, source_type=entity.source_type,
                             source=entity.source, schema=entity.schema, profile=json.dumps(profile))
            tags = [InputTag(key="mlflow.data.context", value=context)]
            tags += [InputTag(key=f"toolkit.{k}", value=str(v)) for k, v in sizes.items()]
            inputs.append(DatasetInput(dataset=entity, tags=tags))
    client = _client(uri)
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    new = [d for d in inputs if (d.dataset.name, d.dataset.digest) not in have]
    if new:
        client.log_inputs(run_id, datasets=new)
    return [p[0] for p in parts]


def load_logged_model(uri: str, model_uri: str) -> tuple[nn.Module, dict]:
    """``mlflow.pytorch.load_model(model_uri)`` against tracking store ``uri``, with its MLmodel metadata."""
    import mlflow
    from mlflow.models import get_model_info

    with using_tracking_uri(uri) if uri else contextlib.nullcontext():  # a local model folder needs no store
        info = get_model_info(model_uri)
        model = mlflow.pytorch.load_model(model_uri)
    return model, dict(info.metadata or {}) | {"_signature": info.signature}


def registered_versions(target: Any, name: str) -> Sequence:
    """The versions of registered model ``name`` (newest first)."""
    return _client(_uri_of(target)).search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])
