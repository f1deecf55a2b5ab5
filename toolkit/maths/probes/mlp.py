"""The MLP probe: one hidden ReLU layer on standardised features, trained by AdamW with a cosine
learning rate for a fixed number of optimizer steps.

Steps, not epochs, so the same protocol trains on 100 labels and on 60,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.maths.probes.features import Standardize, _check_feats_labels, _seeded


@dataclass(frozen=True)
class MLPProbeSettings:
    """How the MLP probe is built and trained. The defaults are the protocol (pinned by the tests).

    ``steps`` counts optimizer steps, not epochs; ``lr`` is the peak of the cosine schedule;
    ``weight_decay`` applies to the weights only, not the biases.
    """

    hidden_dim: int = 512
    dropout: float = 0.0
    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.hidden_dim < 1:
            raise ValueError(
                f"steps, batch_size and hidden_dim must be >= 1, got {self.steps}, {self.batch_size}, {self.hidden_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def train_mlp_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int = 10,
    *,
    settings: MLPProbeSettings = MLPProbeSettings(),
    seed: int = 0,
) -> nn.Sequential:
    """Fit ``Standardize -> Linear -> ReLU -> Dropout -> Linear`` with AdamW; return it in eval mode.

    Trains for a fixed number of optimizer ``settings.steps`` with a cosine learning rate from
    ``settings.lr`` to 0: with 100 labels each step is one full batch (500 passes), with 60,000
    labels and ``batch_size=1024`` it is about 8.5 epochs. Batches walk through seeded
    permutations of the data. Deterministic for a given ``seed`` and device; the global RNG state
    is restored.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    hidden_dim, steps = settings.hidden_dim, settings.steps
    n, d = train_feats.shape
    device = train_feats.device
    bs = min(settings.batch_size, n)

    with _seeded(seed, device):
        model = nn.Sequential(
            Standardize.fit(train_feats),
            nn.Linear(d, hidden_dim),
            nn.ReLU(),
            nn.Dropout(settings.dropout),
            nn.Linear(hidden_dim, num_classes),
        ).to(device)
        # Decay weights only, not biases (the usual AdamW practice).
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(seed)  # batch order, on the CPU for every device
        model.train()
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(steps):
            if pos + bs > n:  # drop the ragged tail so every step sees a full batch
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + bs].to(device)
            pos += bs
            loss = F.cross_entropy(model(train_feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
