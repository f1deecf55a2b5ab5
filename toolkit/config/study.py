"""``Config``, the whole study (one field per section), and the catalogue of its dotted keys.

Every command receives the same resolved ``Config``, so a run's logged config is enough to
reproduce it; ``all_keys`` and ``help_text`` read the key list off these dataclasses, so a new
field in ``sections.py`` appears in parsing, ``--help`` and the MLflow params by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .fields import ConfigError
from .sections import (
    AugmentConfig,
    ClassifierConfig,
    DataConfig,
    ModelConfig,
    PipelineConfig,
    PredictConfig,
    PretrainConfig,
    ProbeConfig,
    PseudoLabelConfig,
    RayConfig,
    ReportConfig,
    RunConfig,
    SplitConfig,
    StudentConfig,
    TrackingConfig,
    TuneConfig,
)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def validate(self) -> "Config":
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (the form logged as MLflow params)."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys replaced (``cfg.replace(**{"split.seed": 1})``), validated."""
        from .parsing import apply_overrides  # parsing builds on Config: imported here, not at the top

        return apply_overrides(self, dotted)

    def digest(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none): keys stage outputs."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]



def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def all_keys() -> dict[str, dataclasses.Field]:
    """Every dotted key with its dataclass field (default and help)."""
    out = {}
    for section, cls in _section_types().items():
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
