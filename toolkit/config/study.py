"""The study (what decides a result), the execution (where and how it runs), and ``Config``: the
two as one config file or command line gives them; plus the catalogue of dotted keys.

A config file or ``key=value`` line sets keys of both; the CLI splits the resolved ``Config``
once into a frozen ``Study`` and a frozen ``Execution``, and every stage receives the two apart.
A stage's key hashes only study sections, so no execution setting can move it.
``all_keys`` and ``help_text`` read the key list off these dataclasses, so a new field in a
sections module appears in parsing, ``--help`` and the MLflow params by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from toolkit.config.execution_sections import (
    InferenceConfig,
    PredictConfig,
    RayConfig,
    ReportConfig,
    RunConfig,
    TrackingConfig,
    TrialsConfig,
)
from toolkit.config.fields import ConfigError
from toolkit.config.study_sections import (
    AugmentConfig,
    ClassifierConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    PipelineConfig,
    PretrainConfig,
    ProbeConfig,
    PseudoLabelConfig,
    SplitConfig,
    StudentConfig,
    TuneConfig,
)


class _Sections:
    """What the study, the execution and the whole config share: dict forms and validated dotted copies."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (the form logged as MLflow params)."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def validate(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            for sf in dataclasses.fields(section):
                v = getattr(section, sf.name)
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{f.name}.{sf.name}={v!r} is not allowed: must be a finite number")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def digest(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none)."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def replace(self, **dotted: Any):
        """A copy with dotted keys replaced (``study.replace(**{"split.seed": 1})``), coerced and validated."""
        from toolkit.config.parsing import apply_overrides  # parsing builds on these classes: imported here, not at the top

        own = {f.name for f in dataclasses.fields(self)}
        for key in dotted:
            if key.split(".")[0] not in own and type(self) in (Study, Execution):
                other = "execution" if isinstance(self, Study) else "study"
                raise ConfigError(f"'{key}' is not a key of the {type(self).__name__.lower()} (it belongs to the "
                                  f"{other}, or does not exist)")
        return apply_overrides(self, dotted)


@dataclass(frozen=True)
class Study(_Sections):
    """What decides a result: the sections a stage's key is a hash of (``config.STAGE_SECTIONS``)."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass(frozen=True)
class Execution(_Sections):
    """Where and how a run executes, and the inputs of the commands that train nothing: never a figure."""

    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    trials: TrialsConfig = field(default_factory=TrialsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def embedded(self) -> bool:
        """True when this run starts its own local Ray (no ray.address, no $RAY_ADDRESS), i.e. one machine."""
        import os

        return not (self.ray.address or os.environ.get("RAY_ADDRESS", ""))

    def backend_for(self, loop: str) -> str:
        """Where a training loop runs: 'ray' (Ray Train's workers) or 'local' (this process).

        ``run.classifiers_local`` is a choice of backend for the classifier loop on one machine
        (an embedded Ray): SimCLR stays on Ray Train; on a cluster it changes nothing.
        """
        if self.run.backend == "local":
            return "local"
        if loop == "classifier" and self.run.classifiers_local and self.embedded():
            return "local"
        return "ray"


STUDY_SECTIONS = tuple(f.name for f in dataclasses.fields(Study))
EXECUTION_SECTIONS = tuple(f.name for f in dataclasses.fields(Execution))


class _Whole(_Sections):
    """One config file or command line: every section of the study and of the execution, flat as
    the user writes them (``split.seed``, ``run.backend``). The CLI splits it once (``.study``,
    ``.execution``); nothing below the CLI receives the whole."""

    @property
    def study(self) -> Study:
        return Study(**{s: getattr(self, s) for s in STUDY_SECTIONS})

    @property
    def execution(self) -> Execution:
        return Execution(**{s: getattr(self, s) for s in EXECUTION_SECTIONS})

    @classmethod
    def of(cls, study: Study, execution: Execution | None = None) -> "Config":
        """The two parts as one config (the form written to ``config.yaml`` and checkpoints)."""
        execution = execution or Execution()
        return cls(**{s: getattr(study, s) for s in STUDY_SECTIONS},
                   **{s: getattr(execution, s) for s in EXECUTION_SECTIONS})


# The whole config's fields are the study's then the execution's, written once (in those two classes).
Config = dataclasses.make_dataclass(
    "Config", [(f.name, f.type, field(default_factory=f.default_factory))
               for part in (Study, Execution) for f in dataclasses.fields(part)],
    bases=(_Whole,), frozen=True)
Config.__module__, Config.__doc__ = __name__, _Whole.__doc__


def _section_types(of: type = None) -> dict[str, type]:
    of = of or Config
    hints = typing.get_type_hints(of)
    return {f.name: hints[f.name] for f in dataclasses.fields(of)}


def all_keys(of: type = None) -> dict[str, dataclasses.Field]:
    """Every dotted key (of ``Config``, or of ``Study`` / ``Execution``) with its dataclass field (default and help)."""
    out = {}
    for section, cls in _section_types(of).items():
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = f
    return out



def help_text(sections: tuple[str, ...] | None = None) -> str:
    """Every key with its default and meaning (``toolkit CMD --help``)."""
    lines = []
    current = None
    for key, f in all_keys().items():
        section = key.split(".")[0]
        if sections and section not in sections:
            continue
        if section != current:
            lines.append(f"\n[{section}]")
            current = section
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key}={json.dumps(default)}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
