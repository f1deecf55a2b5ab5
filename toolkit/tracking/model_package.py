"""A toolkit network as two plain files, read back without unpickling anything or running their code.

What the toolkit logs as an MLflow model (``tracking.logged_models``) and reads back (``toolkit predict``):

* ``weights.pt``: ``{"state_dict": {name: tensor}}``, read with ``torch.load(weights_only=True)``;
* ``toolkit_model.json``: the format, the kind (``classifier`` / ``encoder``), the architecture
  (``name``: the encoder, ``cnn`` or ``resnet18``; ``width``, ``pool`` and, for the CNN, ``depth``,
  ``convs_per_stage``), the input (uint8 images, and the ``ImageSpec`` fields: channels, side,
  classes, normalisation), the class names and, for a model that predicts over augmented views, its
  test-time augmentation recipe (``engine.tta_recipe``).

A description written before any of these existed is read as it was meant: no ``name`` is the
CNN, no spec in ``input`` is MNIST's, no ``class_names`` are class indices.

The network is rebuilt from the description with the toolkit's own classes (``toolkit.maths.models``)
and the weights must fit it exactly. ``read_mlflow_model`` finds the two files through a model
folder's ``MLmodel`` (read with ``yaml.safe_load``); a folder without them is not a toolkit model,
and nothing else in it (``code/``, ``python_model.pkl``, ``data/model.pth``) is ever opened.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from toolkit.engine.checkpoints import CheckpointError, load_plain
from toolkit.config import ConfigError, ModelConfig
from toolkit.datasets.checks import MAX_IMAGE_SIZE
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec
from toolkit.maths.models import Classifier, Encoder, SimCLRModel, build_encoder

FORMAT = "toolkit-model/1"
FORMAT_KEY = "toolkit.format"  # in the MLmodel's metadata, beside toolkit.kind
CLASS_NAMES_KEY = "toolkit.class_names"  # in the MLmodel's metadata too: the names are shown beside the model
WEIGHTS_FILE, DESCRIPTION_FILE = "weights.pt", "toolkit_model.json"
WEIGHTS, DESCRIPTION = "weights", "description"  # their names among the pyfunc flavor's artifacts
CLASSIFIER, ENCODER = "classifier", "encoder"
# per encoder name (``model.name``), the ModelConfig fields that decide its shapes
ARCHITECTURE_KEYS = {"cnn": ("width", "depth", "convs_per_stage", "pool"), "resnet18": ("width", "pool")}
TRANSFORM = "x / 255, then standardised inside the network with the input's mean and std"


class NotAToolkitModel(CheckpointError):
    """An MLflow model folder that lacks the toolkit's weights and description (another library's model)."""


def signature_shape(spec: ImageSpec) -> tuple[int, ...]:
    """The batch shape a logged model takes: ``(-1, S, S)`` for MNIST-shaped images, else ``(-1, C, S, S)``.

    MNIST's (1, 28, 28) keeps the shape its models were always logged and served with (``(N, 28, 28)``),
    so clients of existing models need not change; every other spec says its channels."""
    if spec.input_shape() == MNIST_SPEC.input_shape():
        return (-1, spec.image_size, spec.image_size)
    return (-1, *spec.input_shape())


def input_description(spec: ImageSpec) -> dict[str, Any]:
    """The description's ``input``: the tensor a logged model takes, and the spec its network was built for."""
    return {"dtype": "uint8", "shape": list(signature_shape(spec)), "transform": TRANSFORM, **spec.to_dict()}


def _pool_side(pool: nn.AdaptiveAvgPool2d) -> int:
    size = pool.output_size
    return int(size if isinstance(size, int) else size[0])


def _resnet_class() -> type | None:
    """``ResNet18Encoder`` if its module was imported (torchvision costs seconds: not imported to say "no")."""
    module = sys.modules.get("toolkit.maths.resnet")
    return getattr(module, "ResNet18Encoder", None)


def _is_encoder(module: nn.Module) -> bool:
    resnet = _resnet_class()
    return isinstance(module, Encoder) or (resnet is not None and isinstance(module, resnet))


def encoder_architecture(encoder: nn.Module) -> dict[str, Any]:
    """``name`` and the shape fields of a built encoder (it keeps no config): see ``ARCHITECTURE_KEYS``."""
    if isinstance(encoder, Encoder):
        convs = [m for m in encoder.body.modules() if isinstance(m, nn.Conv2d)]
        depth = 1 + sum(isinstance(m, nn.MaxPool2d) for m in encoder.body)
        return {"name": "cnn", "width": int(convs[0].out_channels), "depth": depth,
                # the first stage always has one conv (models.Encoder)
                "convs_per_stage": (len(convs) - 1) // (depth - 1) if depth > 1 else 1,
                "pool": _pool_side(encoder.pool)}
    if _is_encoder(encoder):
        return {"name": "resnet18", "width": int(encoder.conv1.out_channels), "pool": _pool_side(encoder.pool)}
    raise ValueError(f"not a toolkit encoder: {type(encoder).__name__}")


def _check_statistics(encoder: nn.Module, spec: ImageSpec) -> None:
    """ValueError unless ``encoder`` standardises with ``spec``'s mean and std: the file rebuilds it from the spec."""
    for name, want in (("mean", spec.mean), ("std", spec.std)):
        have = tuple(float(v) for v in getattr(encoder, name).flatten())
        if len(have) != len(want) or any(abs(h - w) > 1e-6 for h, w in zip(have, want)):
            raise ValueError(f"the network standardises with {name} {have}, but the spec says {tuple(want)}: "
                             "give the spec of the data it was trained on (spec=data.spec)")


def describe(model: nn.Module, spec: ImageSpec = MNIST_SPEC) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(kind, architecture, CPU state dict) of a ``Classifier``, or of a ``SimCLRModel`` / encoder's encoder.

    ValueError for any other module, or one whose weights or statistics do not fit the toolkit's
    network of that architecture for ``spec`` (a module merely shaped like one, or the wrong spec).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel / Accelerate wrappers
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, Classifier):
        kind, encoder = CLASSIFIER, model.encoder
    elif isinstance(model, SimCLRModel) or _is_encoder(model):
        kind, encoder = ENCODER, getattr(model, "encoder", model)
        model = encoder
    else:
        raise ValueError(f"a toolkit Classifier, SimCLRModel or Encoder is logged, not {type(model).__name__}")
    arch = encoder_architecture(encoder)
    _check_statistics(encoder, spec)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    try:  # here, at logging, rather than when someone predicts
        build(kind, arch, spec).load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the {kind}'s weights do not fit a {arch['name']} {kind} for {spec.channels}-channel "
                         f"images of {spec.num_classes} classes: {e}".splitlines()[0]) from None
    return kind, arch, state


def build(kind: str, arch: dict[str, Any], spec: ImageSpec = MNIST_SPEC) -> nn.Module:
    """The toolkit's own network of ``kind`` and ``arch`` for ``spec``'s images (eval mode, random weights)."""
    name = arch.get("name", "cnn")  # descriptions written before model.name existed: the CNN
    if name not in ARCHITECTURE_KEYS:
        raise ValueError(f"unknown encoder {name!r} (known: {', '.join(ARCHITECTURE_KEYS)})")
    cfg = ModelConfig(name=name, **{k: arch[k] for k in ARCHITECTURE_KEYS[name]})
    cfg.validate()
    net = Classifier(cfg, spec) if kind == CLASSIFIER else build_encoder(cfg, spec)
    return net.eval()


def read_spec(d: Any) -> ImageSpec:
    """The ``ImageSpec`` in a description's (or model file's) ``input``; MNIST's where it records none.

    ValueError when the fields are there but describe no image a toolkit network takes."""
    if not isinstance(d, dict) or "channels" not in d:
        return MNIST_SPEC  # written before specs existed: MNIST was the only input
    try:
        spec = ImageSpec.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"unreadable input spec ({type(e).__name__}: {e})") from None
    ok = (spec.channels in (1, 3) and 1 <= spec.image_size <= MAX_IMAGE_SIZE and spec.num_classes >= 1
          and len(spec.mean) == len(spec.std) == spec.channels and all(s > 0 for s in spec.std))
    if not ok:
        raise ValueError(f"input spec {spec} is not one of 1 or 3 channels, 1..{MAX_IMAGE_SIZE} px, "
                         "a mean and a positive std per channel")
    return spec


def read_class_names(names: Any, num_classes: int) -> tuple[str, ...] | None:
    """A model's class names (label i is ``names[i]``), or None when it records none.

    ValueError unless they are ``num_classes`` strings: a label must not be named by the wrong class."""
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be a list of strings, got {type(names).__name__}")
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return tuple(names)


def write(folder: str | Path, model: nn.Module, tta: dict[str, Any] | None = None, spec: ImageSpec = MNIST_SPEC,
          class_names: Sequence[str] | None = None) -> tuple[str, Path, Path]:
    """Write ``weights.pt`` and ``toolkit_model.json`` of ``model`` (built for ``spec``) into ``folder``.

    ``class_names``: the name of each class (a classifier's needs one per output). Returns (kind, weights, description).
    """
    kind, arch, state = describe(model, spec)
    if tta is not None and kind != CLASSIFIER:
        raise ValueError("a test-time augmentation recipe belongs to a classifier")
    names = None if class_names is None else [str(n) for n in class_names]
    if names is not None and kind == CLASSIFIER:
        read_class_names(names, spec.num_classes)  # the model would otherwise name its labels wrongly
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, description = folder / WEIGHTS_FILE, folder / DESCRIPTION_FILE
    torch.save({"state_dict": state}, weights)
    with torch.no_grad():
        out_dim = int(build(kind, arch, spec)(torch.zeros(2, *spec.input_shape())).shape[1])
    doc = {"format": FORMAT, "kind": kind, "architecture": arch, "input": input_description(spec),
           "output": {"dtype": "float32", "shape": [-1, out_dim],
                      "meaning": "class probabilities" if kind == CLASSIFIER else "encoder features"},
           "class_names": names, "tta": tta}
    description.write_text(json.dumps(doc, indent=1) + "\n")
    return kind, weights, description


@dataclass
class ImageModel:
    """A network rebuilt from the two files: uint8 images ``(N, C, S, S)`` (``(N, S, S)`` for one channel)
    -> float32 ``(N, out_dim)``; C and S from ``spec``."""

    kind: str
    net: nn.Module
    tta: dict[str, Any] | None
    out_dim: int
    spec: ImageSpec = MNIST_SPEC
    class_names: tuple[str, ...] | None = None  # a classifier's label i is class_names[i]; None: indices

    def to(self, device: torch.device | str) -> "ImageModel":
        self.net = self.net.to(device)
        return self

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as uint8 (N, C, S, S) for this model; ValueError naming the shape it takes if they are not."""
        if images.ndim == 3 and self.spec.channels == 1:
            images = images.unsqueeze(1)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.spec.input_shape():
            c, s = self.spec.channels, self.spec.image_size
            want = f"(N, {s}, {s}) or (N, 1, {s}, {s})" if c == 1 else f"(N, {c}, {s}, {s})"
            raise ValueError(f"images of shape {tuple(images.shape)}: this model takes uint8 {want}")
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        from toolkit.engine.loops import extract_features, predict_probs

        images = self.batch(images).to(next(self.net.parameters()).device)
        if self.kind == ENCODER:
            return extract_features(self.net, images, batch_size)
        # the same code path as `toolkit predict` on a model.pt file: the same probabilities
        return predict_probs(self.net, images, self.tta, batch_size)


def _load_description(description: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(description).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"model description {description} does not read as JSON ({type(e).__name__}: {e})"
                              .splitlines()[0]) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") not in (CLASSIFIER, ENCODER):
        raise CheckpointError(f"model description {description} is not a toolkit model description ({FORMAT})")
    return doc


def read(weights: str | Path, description: str | Path) -> ImageModel:
    """The network described in ``description`` with the tensors of ``weights``; one CheckpointError line if not."""
    doc = _load_description(description)
    arch, tta = doc.get("architecture"), doc.get("tta")
    try:
        spec = read_spec(doc.get("input"))
        net = build(doc["kind"], arch, spec)
        names = read_class_names(doc.get("class_names"), spec.num_classes) if doc["kind"] == CLASSIFIER else None
        if tta is not None:
            from toolkit.engine.loops import read_tta_recipe

            read_tta_recipe(tta)
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"model description {description}: unusable architecture, input, class names or "
                              f"test-time recipe ({type(e).__name__}: {e})".splitlines()[0]) from None
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
        out_dim = int(net.eval()(torch.zeros(2, *spec.input_shape())).shape[1])
    return ImageModel(doc["kind"], net, tta, out_dim, spec, names)


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
    model = read(paths[WEIGHTS], paths[DESCRIPTION])
    if model.kind == CLASSIFIER and model.class_names is None:
        # the description is what counts; a model whose names were only written into its MLmodel keeps them
        try:
            model.class_names = read_class_names(metadata.get(CLASS_NAMES_KEY), model.spec.num_classes)
        except ValueError:
            pass  # names that do not fit the network name nothing: labels stay indices
    return model, metadata

