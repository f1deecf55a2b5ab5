"""The networks: a CNN encoder, SimCLR's projection head, a classifier. No device or distributed code here."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec

# Inputs arrive in [0, 1] and are standardised inside the model with the dataset's statistics
# (``ImageSpec.mean/std``; MNIST's are 0.1307, 0.3081), so augmentation, inference actors and
# probes never need to know about normalisation.
MNIST_MEAN, MNIST_STD = MNIST_SPEC.mean[0], MNIST_SPEC.std[0]


def _standardiser(module: nn.Module, spec: ImageSpec) -> None:
    """``module.mean`` / ``module.std`` (1, C, 1, 1): non-persistent, so a state dict holds weights only."""
    module.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """(B, C, S, S) in [0, 1] -> features (B, feature_dim); C, S and the statistics from ``spec``.

    Stage i has ``width * 2**i`` channels and ``convs_per_stage`` 3x3 convs; every
    stage but the last halves the resolution (28 -> 14 -> 7 -> 3), and global
    average pooling ends it. The first stage always has one conv: early
    downsampling is what keeps it fast on a CPU. Features are the last stage
    average-pooled to ``pool x pool`` cells and flattened.
    """

    def __init__(self, width: int = 32, depth: int = 3, convs_per_stage: int = 1, pool: int = 1,
                 spec: ImageSpec = MNIST_SPEC):
        super().__init__()
        _standardiser(self, spec)
        layers: list[nn.Module] = []
        cin = spec.channels
        for i in range(depth):
            cout = width * 2**i
            layers.append(_conv_bn(cin, cout))
            for _ in range(convs_per_stage - 1 if i > 0 else 0):
                layers.append(_conv_bn(cout, cout))
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.body = nn.Sequential(*layers)
        # pool > 1 keeps a coarse layout (pool x pool cells): where a stroke is matters for digits
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.feature_dim = cin * pool * pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.pool(self.body(x)).flatten(1)


class ProjectionHead(nn.Module):
    """SimCLR's MLP g(.) : features -> space where NT-Xent is computed."""

    def __init__(self, in_dim: int, hidden: int = 256, out_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SimCLRModel(nn.Module):
    """Encoder + projection head; ``forward`` gives projections z, ``encoder`` gives features h."""

    kind = "simclr"

    def __init__(self, cfg: ModelConfig, spec: ImageSpec = MNIST_SPEC):
        super().__init__()
        self.encoder = build_encoder(cfg, spec)
        self.projector = ProjectionHead(self.encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class Classifier(nn.Module):
    """Encoder + dropout + linear head: (B, C, S, S) -> logits (B, spec.num_classes)."""

    kind = "classifier"

    def __init__(self, cfg: ModelConfig, spec: ImageSpec = MNIST_SPEC):
        super().__init__()
        self.encoder = build_encoder(cfg, spec)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.encoder.feature_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))


def _cnn(cfg: ModelConfig, spec: ImageSpec) -> nn.Module:
    return Encoder(cfg.width, cfg.depth, cfg.convs_per_stage, cfg.pool, spec)


def _resnet18(cfg: ModelConfig, spec: ImageSpec) -> nn.Module:
    from toolkit.maths.resnet import ResNet18Encoder  # torchvision's import costs seconds: only when asked

    return ResNet18Encoder(cfg.width, cfg.pool, spec)


# model.name -> builder of an encoder: (B, C, S, S) in [0, 1] -> (B, .feature_dim), standardising inside.
# Bring your own backbone: add a builder here taking (ModelConfig, ImageSpec) (see maths/resnet.py).
ENCODERS = {"cnn": _cnn, "resnet18": _resnet18}


def build_encoder(cfg: ModelConfig, spec: ImageSpec = MNIST_SPEC) -> nn.Module:
    return ENCODERS[cfg.name](cfg, spec)


def architecture(cfg: ModelConfig) -> dict:
    """The model-config fields that decide tensor shapes (a checkpoint must match them)."""
    return {"name": cfg.name, "width": cfg.width, "depth": cfg.depth, "convs_per_stage": cfg.convs_per_stage, "pool": cfg.pool, "proj_dim": cfg.proj_dim, "proj_hidden": cfg.proj_hidden}
