"""A toolkit network as two plain files, read back without unpickling anything or running their code.

What the toolkit logs as an MLflow model (``tracking.logged_models``) and reads back (``toolkit predict``):

* ``weights.pt``: ``{"state_dict": {name: tensor}}``, read with ``torch.load(weights_only=True)``;
* ``toolkit_model.json``: the format, the kind (``classifier`` / ``encoder``), the architecture
  (``width``, ``depth``, ``convs_per_stage``, ``pool``), the input transform and, for a model that
  predicts over augmented views, its test-time augmentation recipe (``engine.tta_recipe``).

The network is rebuilt from the description with the toolkit's own classes (``toolkit.maths.models``)
and the weights must fit it exactly. ``read_mlflow_model`` finds the two files through a model
folder's ``MLmodel`` (read with ``yaml.safe_load``); a folder without them is not a toolkit model,
and nothing else in it (``code/``, ``python_model.pkl``, ``data/model.pth``) is ever opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.engine.checkpoints import CheckpointError, load_plain
from toolkit.config import ConfigError, ModelConfig
from toolkit.datasets.mnist import IMAGE_SIZE
from toolkit.maths.models import Classifier, Encoder, SimCLRModel

FORMAT = "toolkit-model/1"
FORMAT_KEY = "toolkit.format"  # in the MLmodel's metadata, beside toolkit.kind
WEIGHTS_FILE, DESCRIPTION_FILE = "weights.pt", "toolkit_model.json"
WEIGHTS, DESCRIPTION = "weights", "description"  # their names among the pyfunc flavor's artifacts
CLASSIFIER, ENCODER = "classifier", "encoder"
ARCHITECTURE_KEYS = ("width", "depth", "convs_per_stage", "pool")
INPUT = {"dtype": "uint8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE],
         "transform": "x / 255 (MNIST format: 0 background, 255 ink), then standardised inside the network"}


class NotAToolkitModel(CheckpointError):
    """An MLflow model folder that lacks the toolkit's weights and description (another library's model)."""


def encoder_architecture(encoder: Encoder) -> dict[str, int]:
    """``width``, ``depth``, ``convs_per_stage``, ``pool`` of a built ``Encoder`` (it keeps no config)."""
    convs = [m for m in encoder.body.modules() if isinstance(m, nn.Conv2d)]
    depth = 1 + sum(isinstance(m, nn.MaxPool2d) for m in encoder.body)
    pool = encoder.pool.output_size
    return {"width": int(convs[0].out_channels), "depth": depth,
            # the first stage always has one conv (models.Encoder)
            "convs_per_stage": (len(convs) - 1) // (depth - 1) if depth > 1 else 1,
            "pool": int(pool if isinstance(pool, int) else pool[0])}


def describe(model: nn.Module) -> tuple[str, dict[str, int], dict[str, torch.Tensor]]:
    """(kind, architecture, CPU state dict) of a ``Classifier``, or of a ``SimCLRModel`` / ``Encoder``'s encoder.

    ValueError for any other module, or one whose weights do not fit the toolkit's network of
    that architecture (a module merely shaped like one).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel / Accelerate wrappers
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, Classifier):
        kind, encoder = CLASSIFIER, model.encoder
    elif isinstance(model, (SimCLRModel, Encoder)):
        kind, encoder = ENCODER, getattr(model, "encoder", model)
        model = encoder
    else:
        raise ValueError(f"a toolkit Classifier, SimCLRModel or Encoder is logged, not {type(model).__name__}")
    arch = encoder_architecture(encoder)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    build(kind, arch).load_state_dict(state)  # raises here, at logging, rather than when someone predicts
    return kind, arch, state


def build(kind: str, arch: dict[str, int]) -> nn.Module:
    """The toolkit's own network of ``kind`` and ``arch`` (eval mode, random weights)."""
    cfg = ModelConfig(**{k: arch[k] for k in ARCHITECTURE_KEYS})
    cfg.validate()
    net = Classifier(cfg) if kind == CLASSIFIER else Encoder(cfg.width, cfg.depth, cfg.convs_per_stage, cfg.pool)
    return net.eval()


def write(folder: str | Path, model: nn.Module, tta: dict[str, Any] | None = None) -> tuple[str, Path, Path]:
    """Write ``weights.pt`` and ``toolkit_model.json`` of ``model`` into ``folder``: (kind, weights, description)."""
    kind, arch, state = describe(model)
    if tta is not None and kind != CLASSIFIER:
        raise ValueError("a test-time augmentation recipe belongs to a classifier")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, description = folder / WEIGHTS_FILE, folder / DESCRIPTION_FILE
    torch.save({"state_dict": state}, weights)
    with torch.no_grad():
        out_dim = int(build(kind, arch)(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)).shape[1])
    doc = {"format": FORMAT, "kind": kind, "architecture": arch, "input": INPUT,
           "output": {"dtype": "float32", "shape": [-1, out_dim],
                      "meaning": "class probabilities" if kind == CLASSIFIER else "encoder features"},
           "tta": tta}
    description.write_text(json.dumps(doc, indent=1) + "\n")
    return kind, weights, description


@dataclass
class ImageModel:
    """A network rebuilt from the two files: uint8 images ``(N, 28, 28)`` -> float32 ``(N, out_dim)``."""

    kind: str
    net: nn.Module
    tta: dict[str, Any] | None
    out_dim: int

    def to(self, device: torch.device | str) -> "ImageModel":
        self.net = self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        from toolkit.engine.loops import extract_features, predict_probs

        images = images.to(next(self.net.parameters()).device)
        if self.kind == ENCODER:
            return extract_features(self.net, images, batch_size)
        # the same code path as `toolkit predict` on a model.pt file: the same probabilities
        return predict_probs(self.net, images, self.tta, batch_size)


def read(weights: str | Path, description: str | Path) -> ImageModel:
    """The network described in ``description`` with the tensors of ``weights``; one CheckpointError line if not."""
    try:
        doc = json.loads(Path(description).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"model description {description} does not read as JSON ({type(e).__name__}: {e})"
                              .splitlines()[0]) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") not in (CLASSIFIER, ENCODER):
        raise CheckpointError(f"model description {description} is not a toolkit model description ({FORMAT})")
    arch, tta = doc.get("architecture"), doc.get("tta")
    try:
        net = build(doc["kind"], arch)
        if tta is not None:
            from toolkit.engine.loops import read_tta_recipe

            read_tta_recipe(tta)
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"model description {description}: unusable architecture or test-time recipe "
                              f"({type(e).__name__}: {e})".splitlines()[0]) from None
    payload = load_plain(weights, "weights file")
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {weights} holds no 'state_dict'")
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"weights file {weights} does not fit its description's {doc['kind']} "
                              f"{arch}: {e}".splitlines()[0]) from None
    with torch.no_grad():  # from the network itself, not from what the file says
        out_dim = int(net.eval()(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)).shape[1])
    return ImageModel(doc["kind"], net, tta, out_dim)


def _inside(folder: Path, relative: Any) -> Path | None:
    """``folder / relative`` when it names a file inside ``folder`` (no ``..``, no absolute path)."""
    if not isinstance(relative, str) or not relative:
        return None
    path = (folder / relative).resolve()
    return path if path.is_file() and path.is_relative_to(folder.resolve()) else None


def read_mlflow_model(folder: str | Path) -> tuple[ImageModel, dict[str, Any]]:
    """The toolkit network of an MLflow model folder, and its MLmodel's metadata.

    Only ``MLmodel`` (``yaml.safe_load``) and the two files its ``python_function`` flavor lists as
    the ``weights`` and ``description`` artifacts are read. ``NotAToolkitModel`` when they are
    not there: the model was not logged by the toolkit, and loading it would mean running its code.
    """
    import yaml

    folder = Path(folder)
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"MLflow model {folder}: unreadable MLmodel file ({type(e).__name__}: {e})"
                              .splitlines()[0]) from None
    mlmodel = mlmodel if isinstance(mlmodel, dict) else {}
    flavors = mlmodel.get("flavors") if isinstance(mlmodel.get("flavors"), dict) else {}
    pyfunc = flavors.get("python_function") if isinstance(flavors.get("python_function"), dict) else {}
    artifacts = pyfunc.get("artifacts") if isinstance(pyfunc.get("artifacts"), dict) else {}
    paths = {name: _inside(folder, (artifacts.get(name) or {}).get("path") if isinstance(artifacts.get(name), dict)
                           else None) for name in (WEIGHTS, DESCRIPTION)}
    if None in paths.values():
        raise NotAToolkitModel(f"MLflow model {folder} was not logged by the toolkit (flavors: "
                               f"{', '.join(sorted(flavors)) or 'none'}; no {WEIGHTS_FILE} and {DESCRIPTION_FILE})")
    metadata = mlmodel.get("metadata") if isinstance(mlmodel.get("metadata"), dict) else {}
    return read(paths[WEIGHTS], paths[DESCRIPTION]), metadata

