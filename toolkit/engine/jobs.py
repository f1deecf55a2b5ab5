"""What crosses to a remote process: one typed job per call, holding values, never a path on the driver's disk.

A Ray Train worker, a Ray Data actor or a Tune trial may run on another node, which
cannot read the driver's run folder. So the driver puts everything a job needs into
one object (the study sections its loop reads, the device it may use, the split it
computed once, the weights to start from) and Ray carries it (``train_loop_config``,
``fn_constructor_kwargs``, ``tune.with_parameters``). The one path a job holds is the
data root, which the cluster set-up gives every node at the same place (``ray_cluster.yaml``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from toolkit.config import (
    AugmentConfig,
    ClassifierConfig,
    ConsistencyConfig,
    DataConfig,
    Execution,
    ModelConfig,
    PretrainConfig,
    Study,
)
from toolkit.datasets.mnist import Split
from toolkit.datasets.spec import MNIST_SPEC, ImageSpec


def worker_device(execution: Execution, loop: str) -> str:
    """The device a training loop's processes use: 'cuda', 'cpu' or 'auto' (a GPU when one is visible).

    On Ray Train's workers that is ``ray.use_gpu`` (Ray gives each worker its GPU); in this
    process (``run.backend=local``, or the classifiers on one machine) it is ``run.device``.
    """
    if execution.backend_for(loop) == "local":
        return execution.run.device
    return "cuda" if execution.ray.use_gpu else "cpu"


@dataclass(frozen=True)
class TrainJob:
    """One training run on the workers: SimCLR (``loop="simclr"``) or the classifier (``loop="classifier"``).

    It carries the study sections its loop reads (typed, frozen), not the whole config, and
    the two execution settings a worker needs (device, threads)."""

    loop: str
    data_root: str                     # absolute data root, the same on every node
    split: Split                       # labeled / validation / pool indices, computed once by the driver
    data: DataConfig
    model: ModelConfig
    augment: AugmentConfig
    pretrain: PretrainConfig | None = None        # the SimCLR loop's recipe
    classifier: ClassifierConfig | None = None    # the classifier loop's recipe
    consistency: ConsistencyConfig | None = None  # the classifier loop's unlabeled consistency term (weight 0: off)
    labeled_fraction: float = 1.0      # classifier: share of each batch from the true labels (pseudolabel.*)
    device: str = "auto"               # worker_device(): 'cuda' | 'cpu' | 'auto'
    threads: int = 0                   # torch threads per process (run.threads; 0: torch's default)
    steps: int = 0                     # classifier: optimizer steps of this job (a round may differ from classifier.steps)
    init_kind: str = ""                # "" | "classifier" (warm start) | "simclr" (pretrained encoder)
    init_state: dict[str, torch.Tensor] | None = None
    encoder_pretrained: bool = False   # the start model's encoder came from SimCLR (its lr is scaled)
    pseudo_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    pseudo_labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    label: str = ""                    # shown in progress lines
    # the images themselves where no node can read them from data_root (a user's dataset): an ImageData
    # in-process, a Ray ObjectRef to it on Ray's workers (backends puts it in the object store once per job)
    images: Any = None
    resident_bytes: int = 0            # run.resident_mb in bytes: larger training images are streamed (0: auto)

    @classmethod
    def simclr(cls, study: Study, execution: Execution, data_root: str, split: Split, images: Any = None) -> "TrainJob":
        return cls("simclr", data_root, split, study.data, study.model, study.augment, pretrain=study.pretrain,
                   device=worker_device(execution, "simclr"), threads=execution.run.threads, images=images,
                   resident_bytes=execution.run.resident_mb << 20)

    @classmethod
    def for_classifier(cls, study: Study, execution: Execution, data_root: str, split: Split,
                       **start: object) -> "TrainJob":
        """``start``: steps, init_kind, init_state, encoder_pretrained, pseudo_indices, pseudo_labels, label."""
        return cls("classifier", data_root, split, study.data, study.model, study.augment,
                   classifier=study.classifier, consistency=study.consistency, labeled_fraction=study.pseudolabel.labeled_fraction,
                   device=worker_device(execution, "classifier"), threads=execution.run.threads,
                   resident_bytes=execution.run.resident_mb << 20, **start)

    def sections(self) -> dict:
        """The study sections this job carries, as the ``config`` a checkpoint records."""
        out = {"data": asdict(self.data), "model": asdict(self.model), "augment": asdict(self.augment)}
        if self.pretrain is not None:
            out["pretrain"] = asdict(self.pretrain)
        if self.classifier is not None:
            out["classifier"] = asdict(self.classifier)
        if self.consistency is not None:
            out["consistency"] = asdict(self.consistency)
        return out


@dataclass(frozen=True)
class ModelWeights:
    """A model travelling by value: its kind, the config that built it (architecture), its weights and
    the images it takes (``spec``: channels, size, classes, normalisation)."""

    kind: str                          # "classifier" | "simclr"
    config: dict
    state_dict: dict[str, torch.Tensor]
    spec: ImageSpec = MNIST_SPEC

    @classmethod
    def from_payload(cls, payload: dict) -> "ModelWeights":
        return cls(payload["kind"], payload["config"], payload["state_dict"], ImageSpec.from_dict(payload.get("input")))
