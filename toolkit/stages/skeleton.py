"""The skeleton every stage shares: its key, its folder, the saved result that lets a re-run skip
finished work, and ``run_stage`` (data and split -> lock -> MLflow run -> body -> result)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from toolkit.engine import checkpoints
from toolkit.config import Config, Execution, Study, stage_digest, to_yaml
from toolkit.datasets.mnist import Split, resolve_root
from toolkit.datasets.training_data import ImageData
from toolkit.redaction import redact
from toolkit.execution.storage import resolve_output_dir
from toolkit.tracking.runs import Tracker
from toolkit.stages.data_inputs import load_data_and_split

RESULT_FILE = "result.json"
STAGE_RUN_TAG = "toolkit.stage_run"  # on a pipeline's run: toolkit.stage_run.<seed>.<stage> = the stage's run id


@dataclass
class StageResult:
    """What a finished stage leaves behind (also written as ``result.json`` in its folder)."""

    stage: str
    run_key: str
    run_id: str | None = None
    model_path: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    config_digest: str = ""
    skipped: bool = False

    def save(self, folder: Path) -> None:
        d = asdict(self)
        d.pop("skipped")
        tmp = folder / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, folder / RESULT_FILE)  # atomic: a kill mid-write never leaves a half result


def run_key(study: Study, execution: Execution, command: str, stage: str | None = None) -> str:
    """``<run.name>-<command>`` when a name is given, else ``<command>-<hash of what decides the stage>``.

    The same command with the same study gets the same key, so re-running it resumes
    (Ray Train storage, local checkpoints, the MLflow run) instead of starting over.
    ``stage`` names the entry of ``config.STAGE_SECTIONS`` (default: the command).
    """
    if execution.run.name:
        return f"{execution.run.name}-{command}"
    return f"{command}-{stage_digest(study, stage or command)}"


def with_inputs(key: str, inputs: list[str]) -> str:
    """``key`` plus a short hash of the input files a stage starts from (``-from-<hash>``).

    Two runs of the same config from different models (another seed's teacher, another
    encoder) must not share a folder, and the config alone does not name those files.
    """
    return key + "-from-" + hashlib.sha256("\n".join(str(i) for i in inputs).encode()).hexdigest()[:6]


def stage_path(execution: Execution, key: str) -> Path:
    """The folder of stage ``key``, not created."""
    return resolve_output_dir(execution.run.output_dir) / "stages" / key


def stage_dir(execution: Execution, key: str) -> Path:
    """The folder of stage ``key``, created if missing."""
    d = stage_path(execution, key)
    d.mkdir(parents=True, exist_ok=True)
    return d


def finished_result(folder: Path, digest: str | None = None) -> StageResult | None:
    """The saved result of a finished stage with this config, or None (then the stage runs, resuming what it can).

    A stage re-run under the same key with another config (say more epochs) is not
    finished: it continues from its checkpoints.
    """
    p = folder / RESULT_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"[warning] {p} is damaged: the stage runs again", flush=True)
        return None
    if d.get("model_path"):
        try:
            checkpoints.load(d["model_path"])  # a truncated model file means the stage is not finished
        except checkpoints.CheckpointError as e:
            print(f"[warning] {e}: the stage runs again", flush=True)
            return None
    if digest is not None and d.get("config_digest") and d["config_digest"] != digest:
        return None
    return StageResult(**d, skipped=True)


def log_config_and_split(tracker: Tracker, run: "StageRun") -> None:
    """The resolved config (study and execution) and the split indices as artifacts; the split sizes as params."""
    folder, split = run.folder, run.split
    (folder / "config.yaml").write_text(redact(to_yaml(Config.of(run.study, run.execution))))  # credentials masked
    split.save(folder / "split.json")
    tracker.log_artifact(folder / "config.yaml")
    tracker.log_artifact(folder / "split.json")
    tags = {"split.kind": split.kind}
    if run.data is not None:  # what kind of data, and its classes in label order
        tags.update({"data.kind": run.data.kind, "data.classes": ",".join(run.data.class_names)[:5000]})
    tracker.set_tags(tags)
    tracker.log_params({
        "split.labeled_size": len(split.labeled),
        "split.val_size_actual": len(split.val),
        "split.pool_size": len(split.pool),
    })


@dataclass
class StageRun:
    """What a stage's body works with: its study and execution, folder, MLflow run, data and split."""

    study: Study
    execution: Execution
    key: str
    folder: Path
    tracker: Tracker
    data: ImageData
    split: Split


@dataclass
class StageOutput:
    """What a stage's body returns: its model file (if any), its metrics, and the words of its last line."""

    model_path: Path | None
    metrics: dict[str, float]
    summary: str


@dataclass(frozen=True)
class Stage:
    """What names one stage's run: ``name`` (results and console lines), ``key`` (folder, Ray storage,
    MLflow run key), ``digest`` (of the study sections that decide it), the parent run and tags, the
    MLflow command tag (default: the name) and the words after "already finished"."""

    name: str
    key: str
    digest: str
    parent_run_id: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    skipped_line: Callable[[StageResult], str] | None = None


def run_stage(study: Study, execution: Execution, stage: Stage, body: Callable[[StageRun], StageOutput]) -> StageResult:
    """The skeleton every stage shares, written once.

    Skip if a finished result with this study exists -> read the data and make the split
    -> hold the run's lock (one writer; it creates the folder) -> open (or resume) its MLflow
    run -> log the config and the split -> run ``body(StageRun)`` -> log the stage time, save
    ``result.json`` atomically, print one closing line. Bad data fail before the folder exists.
    """
    from toolkit.locks import run_lock
    from toolkit.tracking.runs import mlflow_run, run_url

    name, key = stage.name, stage.key
    folder = stage_path(execution, key)
    done = finished_result(folder, stage.digest)
    if done:
        print(f"[{name}] {key} already finished" + (f": {stage.skipped_line(done)}" if stage.skipped_line else ""),
              flush=True)
        return done
    t0 = time.perf_counter()
    data, split = load_data_and_split(study, execution)  # only reads: a missing or corrupt file leaves no folder, lock or run
    with run_lock(folder, f"run '{key}'"):
        with mlflow_run(study, execution, stage.command or name, key, stage.parent_run_id, stage.tags) as tracker:
            run = StageRun(study, execution, key, folder, tracker, data, split)
            log_config_and_split(tracker, run)
            if tracker.enabled:  # the split as the run's MLflow dataset inputs (training / validation)
                from toolkit.tracking.logged_models import log_split_dataset

                log_split_dataset(tracker, tracker.run_id, split, source=str(resolve_root(execution.run.data_root)),
                                  name=f"{data.name}-seed{split.seed}-{split.labels_per_class}x{data.spec.num_classes}")
            out: StageOutput = body(run)
            seconds = time.perf_counter() - t0
            metrics = {**out.metrics, "stage_seconds": seconds}
            tracker.log_metrics({"stage_seconds": seconds})
            result = StageResult(name, key, tracker.run_id, str(out.model_path) if out.model_path else None, metrics,
                                 seconds, config_digest=stage.digest)
            result.save(folder)
            print(f"[{name}] done in {seconds:.0f}s: {out.summary}  {run_url(tracker)}", flush=True)
            return result
