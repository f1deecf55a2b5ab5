"""The one config system: frozen dataclasses hold every default, YAML files and ``key=value``
arguments hold overrides, and validation names the offending key.

This package re-exports every name so ``from toolkit.config import X`` stays the one import
path; the modules each hold one part:

- ``study_sections``: the sections that decide a result (each key's default, help text and rule)
- ``execution_sections``: the sections that say where and how a run executes
- ``study``: ``Study``, ``Execution``, ``Config`` (the two as one file or command line gives them)
  and the catalogue of dotted keys and their help
- ``stage_map``: which study sections decide each stage's result (``STAGE_SECTIONS``, ``stage_digest``)
- ``parsing``: defaults <- YAML file <- ``key=value`` arguments, and back to YAML
- ``checks``: cross-section checks a command runs for the sections it uses
- ``fields``, ``credentials``: the helpers sections are written with, and why a URI with a secret is refused
"""

from toolkit.config.checks import MNIST_TRAIN_IMAGES, check_command_config, embedded_ray_cpus
from toolkit.config.credentials import uri_credentials_problem
from toolkit.config.fields import MAX_SEED, RUN_ID_PATTERN, RUN_NAME_PATTERN, ConfigError, _check, _opt
from toolkit.config.parsing import (
    _coerce,
    _unknown,
    _yaml_problem,
    apply_overrides,
    config_from_dict,
    flatten_yaml,
    load_config,
    parse_assignments,
    read_text_file,
    to_yaml,
)
from toolkit.config.execution_sections import (
    InferenceConfig,
    PredictConfig,
    RayConfig,
    ReportConfig,
    RunConfig,
    TrackingConfig,
    TrialsConfig,
)
from toolkit.config.stage_map import STAGE_SECTIONS, result_keys, stage_digest
from toolkit.config.study import EXECUTION_SECTIONS, STUDY_SECTIONS, Config, Execution, Study, _section_types, all_keys, help_text
from toolkit.config.study_sections import (
    PIPELINE_STAGES,
    THRESHOLD_SCHEDULES,
    rate_problem,
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

__all__ = [
    "THRESHOLD_SCHEDULES", "rate_problem",
    "MNIST_TRAIN_IMAGES", "check_command_config", "embedded_ray_cpus",
    "uri_credentials_problem",
    "MAX_SEED", "RUN_ID_PATTERN", "RUN_NAME_PATTERN", "ConfigError",
    "apply_overrides", "config_from_dict", "flatten_yaml", "load_config", "parse_assignments", "read_text_file",
    "to_yaml",
    "AugmentConfig", "ClassifierConfig", "ConsistencyConfig", "DataConfig", "ModelConfig", "PipelineConfig", "PredictConfig",
    "PretrainConfig", "ProbeConfig", "PseudoLabelConfig", "RayConfig", "ReportConfig", "RunConfig", "SplitConfig",
    "StudentConfig", "TrackingConfig", "TuneConfig", "InferenceConfig", "TrialsConfig", "PIPELINE_STAGES",
    "STAGE_SECTIONS", "result_keys", "stage_digest",
    "Config", "Study", "Execution", "STUDY_SECTIONS", "EXECUTION_SECTIONS", "all_keys", "help_text",
]
