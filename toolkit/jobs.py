"""What crosses to a remote process: one typed job per call, holding values, never a path on the driver's disk.

A Ray Train worker, a Ray Data actor or a Tune trial may run on another node, which
cannot read the driver's run folder. So the driver puts everything a job needs into
one object (the resolved config, the split it computed once, the weights to start
from) and Ray carries it (``train_loop_config``, ``fn_constructor_kwargs``,
``tune.with_parameters``). The one path a job holds is the MNIST root, which the
cluster set-up gives every node at the same place (``ray_cluster.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import Config, config_from_dict
from .data import Split


@dataclass(frozen=True)
class TrainJob:
    """One training run on the workers: SimCLR (``loop="simclr"``) or the classifier (``loop="classifier"``)."""

    loop: str
    config: dict                       # Config.to_dict(): plain data, rebuilt and validated on the worker
    data_root: str                     # absolute MNIST root, the same on every node
    split: Split                       # labeled / validation / pool indices, computed once by the driver
    steps: int = 0                     # classifier: optimizer steps of this job (a round may differ from classifier.steps)
    init_kind: str = ""                # "" | "classifier" (warm start) | "simclr" (pretrained encoder)
    init_state: dict[str, torch.Tensor] | None = None
    encoder_pretrained: bool = False   # the start model's encoder came from SimCLR (its lr is scaled)
    pseudo_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    pseudo_labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    label: str = ""                    # shown in progress lines

    def cfg(self) -> Config:
        return config_from_dict(self.config)


@dataclass(frozen=True)
class ModelWeights:
    """A model travelling by value: its kind, the config that built it (architecture) and its weights."""

    kind: str                          # "classifier" | "simclr"
    config: dict
    state_dict: dict[str, torch.Tensor]

    @classmethod
    def from_payload(cls, payload: dict) -> "ModelWeights":
        return cls(payload["kind"], payload["config"], payload["state_dict"])
