"""The networks: a CNN encoder, SimCLR's projection head, a classifier. No device or distributed code here."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig
from toolkit.datasets.mnist import NUM_CLASSES

# MNIST pixel statistics: inputs arrive in [0, 1] and are standardised inside the model,
# so augmentation, inference actors and probes never need to know about normalisation.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """(B, 1, 28, 28) in [0, 1] -> features (B, feature_dim).

    Stage i has ``width * 2**i`` channels and ``convs_per_stage`` 3x3 convs; every
    stage but the last halves the resolution (28 -> 14 -> 7 -> 3), and global
    average pooling ends it. The first stage always has one conv: early
    downsampling is what keeps it fast on a CPU. Features are the last stage
    average-pooled to ``pool x pool`` cells and flattened.
    """

    def __init__(self, width: int = 32, depth: int = 3, convs_per_stage: int = 1, pool: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
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
        x = (x - MNIST_MEAN) / MNIST_STD
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

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.convs_per_stage, cfg.pool)
        self.projector = ProjectionHead(self.encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class Classifier(nn.Module):
    """Encoder + dropout + linear head: (B, 1, 28, 28) -> logits (B, 10)."""

    kind = "classifier"

    def __init__(self, cfg: ModelConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.convs_per_stage, cfg.pool)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))


def architecture(cfg: ModelConfig) -> dict:
    """The model-config fields that decide tensor shapes (a checkpoint must match them)."""
    return {"width": cfg.width, "depth": cfg.depth, "convs_per_stage": cfg.convs_per_stage, "pool": cfg.pool, "proj_dim": cfg.proj_dim, "proj_hidden": cfg.proj_hidden}
