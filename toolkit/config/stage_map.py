"""Which config keys decide each stage's result: the stage -> sections map, the infrastructure
keys that never do, and the stage digest built from the rest.

A stage's key (its folder, its Ray storage name and the MLflow run it resumes) is that digest,
so this map is what makes a re-run with the same settings resume instead of starting over.
"""

from __future__ import annotations

import hashlib
import json

from .study import Config, all_keys


# The config sections each stage depends on, written once. A stage's key (the folder,
# the Ray storage name and the MLflow run it resumes) is a hash of the keys of its
# sections less the infrastructure keys below; the CLI help, Tune's tunable keys and
# best.yaml derive from the same map.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("data", "split", "model", "augment", "pretrain", "run"),
    "probe": ("data", "split", "model", "probe", "run"),
    "supervised": ("data", "split", "model", "augment", "classifier", "run"),
    "pseudolabel": ("data", "split", "model", "augment", "classifier", "pseudolabel", "run"),
    "tune": ("data", "split", "model", "augment", "classifier", "pseudolabel", "tune", "run"),
    "student": ("data", "split", "model", "augment", "classifier", "pseudolabel", "student", "run"),
    "pipeline": ("data", "split", "model", "augment", "pretrain", "probe", "classifier", "pseudolabel", "tune",
                 "student", "pipeline", "run"),
    "report": ("report",),
    "predict": ("predict",),
}

# Where and how a run executes, never what it computes: changing one of these never
# changes a stage key (whole sections: ray, tracking; plus the keys listed).
INFRASTRUCTURE_SECTIONS = ("ray", "tracking", "report")
INFRASTRUCTURE_KEYS = frozenset({
    "data.root", "data.download",
    "run.name", "run.output_dir", "run.backend", "run.classifiers_local", "run.device", "run.threads", "run.verbose",
    "pseudolabel.inference", "pseudolabel.inference_actors", "pseudolabel.inference_batch_size",
    "tune.max_concurrent", "tune.cpus_per_trial", "tune.gpus_per_trial", "tune.max_failures",
    "probe.tsne_points",
    "tune.space",  # a file path: the search key hashes the space's text instead
    "student.teachers", "student.encoder",  # input files: the student's key hashes them (with_inputs)
})


def is_infrastructure(key: str) -> bool:
    return key.split(".")[0] in INFRASTRUCTURE_SECTIONS or key in INFRASTRUCTURE_KEYS


def result_keys(stage: str) -> list[str]:
    """The dotted keys that decide ``stage``'s result (its sections less infrastructure)."""
    sections = STAGE_SECTIONS[stage]
    return [k for k in all_keys() if k.split(".")[0] in sections and not is_infrastructure(k)]


def stage_digest(cfg: Config, stage: str) -> str:
    """Short stable hash of the keys that decide ``stage``'s result."""
    flat = cfg.flat()
    d = {k: flat[k] for k in result_keys(stage)}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

