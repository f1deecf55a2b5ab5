"""Which study sections decide each stage's result, and the stage digest built from them.

A stage's key (its folder, its Ray storage name and the MLflow run it resumes) is that digest,
so this map is what makes a re-run with the same settings resume instead of starting over.
It names study sections only: the execution (``Execution``) cannot enter a key, so no list of
exceptions is needed to keep a backend, a folder or a thread count out of it.
"""

from __future__ import annotations

from toolkit.config.study import STUDY_SECTIONS, Study


# The study sections each stage depends on, written once. A stage's key (the folder, the Ray
# storage name and the MLflow run it resumes) is a hash of these sections; the CLI help, Tune's
# tunable keys and best.yaml derive from the same map. Commands that train nothing (report,
# predict) have no key.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("data", "split", "model", "augment", "pretrain"),
    "probe": ("data", "split", "model", "probe"),
    "supervised": ("data", "split", "model", "augment", "classifier", "consistency"),
    "pseudolabel": ("data", "split", "model", "augment", "classifier", "consistency", "pseudolabel"),
    "tune": ("data", "split", "model", "augment", "classifier", "consistency", "pseudolabel", "tune"),
    "student": ("data", "split", "model", "augment", "classifier", "consistency", "pseudolabel", "student"),
    "pipeline": STUDY_SECTIONS,
}


def result_keys(stage: str) -> list[str]:
    """The dotted keys that decide ``stage``'s result: every key of its study sections."""
    return [k for k in Study().flat() if k.split(".")[0] in STAGE_SECTIONS[stage]]


def stage_digest(study: Study, stage: str) -> str:
    """Short stable hash of the study sections that decide ``stage``'s result (``Study.digest``)."""
    return study.digest(*STAGE_SECTIONS[stage])

