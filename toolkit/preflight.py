"""Checks the CLI makes before a command starts work: cheap, with short timeouts, one line each.

Without them an unreachable Ray cluster makes ``ray.init`` retry for minutes, and a bad input
found inside a stage leaves what the stage made before it: its folder and ``.lock``, a FAILED
MLflow run holding ``config.yaml`` and ``split.json``. ``check_inputs`` reads every input a
command names (the MNIST files and the split, the checkpoint it starts from, the store it
reads runs from) and only then checks the tracking store it will write to: bad input leaves
the output folder and the MLflow store as they were.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from toolkit.config import STAGE_SECTIONS, ConfigError, Execution, Study
from toolkit.tracking.stores import readable_tracking_uri

RAY_CONNECT_TIMEOUT_S = 3.0


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` or ``ray://host:port`` -> (host, port); None for ``auto``, ``local`` and the like."""
    if address in ("auto", "local") or not address:
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"ray.address={address!r} is not allowed: expected host:port, ray://host:port or 'auto'") from None
    if not parts.hostname or port is None:
        raise ConfigError(f"ray.address={address!r} is not allowed: expected host:port, ray://host:port or 'auto'")
    return parts.hostname, port


def check_ray_address_reachable(execution: Execution, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """``ray.address`` (else ``$RAY_ADDRESS``) accepts a TCP connection within ``timeout_s``, or ConfigError."""
    key, address = ("ray.address", execution.ray.address) if execution.ray.address else ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS", ""))
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, TimeoutError) or isinstance(e, socket.timeout):
            reason = f"no answer within {timeout_s:g} s"
        raise ConfigError(f"{key}={address!r} is not reachable: {reason} (is the Ray head running there?)") from None


# the commands that read ``model.init`` (the pipeline sets it per stage, from its own pretraining)
_READS_MODEL_INIT = ("supervised", "pseudolabel", "tune")
# the commands that open MLflow runs (report and predict only read them)
_WRITES_RUNS = ("pretrain", "probe", "supervised", "pseudolabel", "student", "tune", "pipeline")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _check_model_ref(execution: Execution, ref: str, key: str, kind: str, model_cfg=None) -> None:
    """``ref`` (a path or an MLflow run id) is a ``kind`` model file (of ``model_cfg``'s architecture, when given)."""
    from toolkit.engine import checkpoints
    from toolkit.stages.model_files import resolve_model_ref

    with tempfile.TemporaryDirectory(prefix="toolkit-preflight-") as tmp:  # a run's file is fetched here, then dropped
        path = resolve_model_ref(execution, ref, Path(tmp))
        try:
            checkpoints.load_model_file(path, kind, model_cfg)
        except checkpoints.CheckpointError as e:
            raise checkpoints.CheckpointError(f"{key}: {e}") from None


def _check_student_inputs(study: Study, execution: Execution) -> None:
    """``student.teachers`` are classifier files of ``study.model``'s shape; ``student.encoder`` a SimCLR file."""
    from toolkit.stages.student import require_teachers

    require_teachers(study.student.teachers)
    for i, ref in enumerate(study.student.teachers):
        _check_model_ref(execution, ref, f"student.teachers[{i}]", "classifier", study.model)
    if study.student.encoder:
        _check_model_ref(execution, study.student.encoder, "student.encoder", "simclr")


def _check_predict_model(execution: Execution) -> None:
    """A run id, ``runs:/`` or ``models:/`` URI is read from the tracking store: that store must exist."""
    ref = execution.predict.model
    if not ref or Path(ref).expanduser().exists():
        return
    if _RUN_ID.match(ref):
        readable_tracking_uri(execution, f"predict.model={ref}: no MLflow run with this id")
    elif ref.startswith(("runs:/", "models:/")):
        readable_tracking_uri(execution, f"predict.model={ref}: not a loadable MLflow model")


def check_inputs(study: Study, execution: Execution, command: str) -> None:
    """Everything ``command`` reads, checked before it creates a folder, a lock, a file or an MLflow run.

    The MNIST files and every labeled split the command makes; the SimCLR checkpoint it
    starts from (``probe.checkpoint``, ``model.init``); the store that ``report`` and
    ``predict`` read runs from; the tracking store the command will write to. Nothing here writes.
    """
    tunes = command == "tune" or (command == "pipeline" and study.pipeline.tune)
    if tunes:
        from toolkit.stages.tune import check_search

        check_search(study)
    if "data" in STAGE_SECTIONS.get(command, ()):
        from toolkit.datasets.training_data import load_image_data
        from toolkit.datasets.folds import check_folds
        from toolkit.stages.data_inputs import check_pretrain_batch, split_of

        data = load_image_data(study.data, execution.run.data_root, execution.run.download)
        pretrains = command == "pretrain" or (command == "pipeline" and "pretrain" in study.pipeline.stages)
        for seed in study.pipeline.seeds if command == "pipeline" else [study.split.seed]:
            split = split_of(study.replace(**{"split.seed": seed}), data)
            if pretrains:
                check_pretrain_batch(study, split)
            if tunes and study.tune.objective == "label_folds":
                check_folds(study.tune.folds, data.train_labels[split.labeled])
    if command == "probe" and study.probe.checkpoint:
        _check_model_ref(execution, study.probe.checkpoint, "probe.checkpoint", "simclr")
    if command in _READS_MODEL_INIT and study.model.init.startswith("simclr:"):
        _check_model_ref(execution, study.model.init[len("simclr:"):], "model.init", "simclr", study.model)
    if command == "student":
        _check_student_inputs(study, execution)
    if command == "report":
        readable_tracking_uri(execution, "no runs to report")
    if command == "predict":
        _check_predict_model(execution)
    if command in _WRITES_RUNS and execution.tracking.enabled:
        _check_tracking_store(execution)


def _check_tracking_store(execution: Execution) -> None:
    """The store runs will be written to can be used, checked without creating it.

    A server answers within seconds; a sqlite file's folder exists (the default one, in
    ``run.output_dir``, is made with the output folder). The store itself is created when the
    first run opens, after every input was read (``tracking.prepare_sqlite_store``).
    """
    from toolkit.tracking.stores import configured_tracking_uri

    uri = configured_tracking_uri(execution)
    if not uri:
        return
    if uri.startswith("sqlite:///"):
        from toolkit.redaction import redact

        folder = Path(uri[len("sqlite:///"):].split("?", 1)[0]).parent
        if not folder.is_dir():
            raise ConfigError(f"tracking.uri={redact(uri)!r} is not usable: the folder {str(folder)!r} does not exist")
        return
    from toolkit.tracking.runs import check_tracking_reachable

    check_tracking_reachable(uri)
