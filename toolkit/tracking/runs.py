"""MLflow at the edge: runs, params, metrics and artifacts through one small class.

``MlflowClient`` with explicit run ids, not the fluent "active run", which does not follow
into Ray workers (ray#19978); training metrics are logged on the driver's node (``MetricsLogger``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from toolkit.config import RUN_ID_PATTERN, ConfigError, Execution, Study
from toolkit.tracking.machine import _git_commit, _user, machine_tags
from toolkit.tracking.stores import check_tracking_reachable, tracking_uri
from toolkit.redaction import MASK, is_secret_name, redact, redact_tree

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_KEY_TAG = "toolkit.run_key"


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """Config as MLflow params, credentials masked (a param named like a secret is masked whole)."""
    return {k: (MASK if is_secret_name(k) else redact(str(v)))[:6000] for k, v in flat.items()}


class Tracker:
    """One MLflow run. ``Tracker.disabled()`` gives a no-op twin (tracking.enabled=false, non-zero ranks)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self._client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @classmethod
    def disabled(cls) -> "Tracker":
        return cls(None, None)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """``model_id``: also attach the values to that logged MLflow model (shown on its page)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step or 0, model_id=model_id) for k, v in metrics.items()
              if isinstance(v, (int, float))]
        if ms:
            self._client.log_batch(self.run_id, metrics=ms)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in safe_params(params).items() if k not in existing]
        for i in range(0, len(new), 100):
            self._client.log_batch(self.run_id, params=new[i: i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, d: dict, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_dict(self.run_id, redact_tree(d), artifact_file)


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the database, at an absolute path (workers and `mlflow ui` run elsewhere)
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def check_run_id(run_id: str, what: str = "run id") -> str:
    """``run_id`` if it has MLflow's run id form (32 hexadecimal digits), else ConfigError."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise ConfigError(f"{what} {run_id!r} is not an MLflow run id (32 hexadecimal digits)")
    return run_id


def filter_value(value: Any) -> str:
    """``value`` as a quoted string literal of an MLflow filter string.

    MLflow's parser has no escape sequences: a value is quoted with the quote it does not
    contain; one holding both kinds (or a backslash, or a line break) cannot be searched for
    safely and is refused rather than pasted in.
    """
    s = str(value)
    if "\\" not in s and "\n" not in s and "\r" not in s:
        if "'" not in s:
            return f"'{s}'"
        if '"' not in s:
            return f'"{s}"'
    raise ConfigError(f"{s!r} cannot be used in an MLflow search: it holds both kinds of quotes, a backslash or a line break")


def find_run(execution: Execution, run_key: str, parent_run_id: str | None = None):
    """The newest run tagged with ``run_key`` (and this parent), or None."""
    if not execution.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(execution)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, execution.tracking.experiment, uri)
    flt = f"tags.`{RUN_KEY_TAG}` = {filter_value(run_key)}"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = {filter_value(check_run_id(parent_run_id, 'parent run id'))}"
    runs = client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


@contextlib.contextmanager
def mlflow_run(study: Study, execution: Execution, command: str, run_key: str, parent_run_id: str | None = None,
               extra_tags: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """Open (or resume) the MLflow run of ``run_key``; mark it FINISHED, FAILED or KILLED on exit.

    The study is the run's params (what decides it); the execution its ``execution.*`` tags
    (where it ran: tags, because a re-run elsewhere continues the same run and params cannot change).
    Re-running the same command finds its run by the ``toolkit.run_key`` tag and continues
    it, so an interrupted run keeps one history. A finished run is reopened too when its
    params are this study (a stage whose result or model file was damaged runs again), so
    the key keeps one run and its training curve; a changed study under the same
    ``run.name`` gets a new run (MLflow params cannot change).
    """
    if not execution.tracking.enabled:
        yield Tracker.disabled()
        return
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(execution)
    check_tracking_reachable(uri)  # one line within seconds, not minutes of retries and a traceback
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, execution.tracking.experiment, uri)
    previous = find_run(execution, run_key, parent_run_id)
    same_config = previous is not None and all(
        previous.data.params.get(k) == v for k, v in safe_params(study.flat()).items())
    if previous is not None and (previous.info.status != "FINISHED" or same_config):
        run_id = previous.info.run_id
        client.update_run(run_id, status="RUNNING")  # FINISHED, FAILED or KILLED before: running again
        resumed = True
    else:
        tags = {RUN_KEY_TAG: run_key, "toolkit.command": command}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, run_name=run_key, tags=tags).info.run_id
        resumed = False
    monitor, status = None, "FAILED"
    try:  # from here the run exists: whatever happens next (a Ctrl-C while tagging included) ends it
        tracker = Tracker(uri, run_id)
        commit = _git_commit()
        tracker.set_tags({
            "toolkit.command": command,
            "toolkit.git_commit": commit,
            # what the MLflow UI shows as the run's source
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"toolkit {command}",
            **({"mlflow.user": user} if (user := _user()) else {}),
            **({"mlflow.source.git.commit": commit} if commit != "unknown" else {}),
            "toolkit.host": socket.gethostname(),
            "toolkit.backend": execution.run.backend,
            **({"toolkit.classifiers": "in-process"} if execution.backend_for("classifier") != execution.run.backend else {}),
            "toolkit.resumed": resumed,
            **{f"execution.{k}": v for k, v in safe_params(execution.flat()).items()},
            **machine_tags(),
            **(extra_tags or {}),
        })
        tracker.log_params(study.flat())
        monitor = _system_metrics(uri, run_id) if command in TRAINING_COMMANDS else None
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        client.set_terminated(run_id, status)


# the runs whose MLflow page shows system metrics (CPU, memory, disk, network; GPU utilisation and
# memory where the driver has a GPU): the stages that train, and the pipeline and search around them
TRAINING_COMMANDS = frozenset({"pretrain", "probe", "supervised", "pseudolabel", "oneshot", "iterative", "simclr_iterative",
                               "student", "tune", "pipeline"})


def _system_metrics(uri: str, run_id: str):
    """Start MLflow's system-metrics sampler on the run (a daemon thread; every 10 s, or
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``), or None where it cannot start.

    It samples the machine this process runs on, the driver's: on one machine that is where training
    runs; on a cluster, workers on other nodes are not sampled (their images/s are in the run's metrics).
    Its own log lines stay off the console: a failure to sample must never become a second stderr line.
    """
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - no psutil, an exotic platform: the run goes on without them
        return None


def run_url(tracker: Tracker) -> str:
    """Where ``mlflow ui`` shows the run's experiment table (3.x opens on a GenAI page otherwise)."""
    if not tracker.enabled:
        return ""
    from mlflow.tracking import MlflowClient

    from urllib.parse import urlsplit

    exp_id = MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id).info.experiment_id
    parts = urlsplit(tracker.uri or "")
    if parts.scheme in ("http", "https"):  # the tracking server is the UI (its address, never its credentials)
        base = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"
    else:  # a local store: `mlflow ui --backend-store-uri <it>` serves it here (README)
        base = "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}/runs/{tracker.run_id}"


class MetricsLogger:
    """Logs reported training metrics to one MLflow run: the sink of ``backends.run_training``.

    Picklable (a URI and a run id, the client made on first use), because on Ray it runs
    in Ray Train's controller, which Ray places on the driver's node: the only process
    that logs is one that can reach the driver's tracking store. ``step_key`` names the
    metric that is the MLflow step (epoch or step), shifted by ``step_offset`` (rounds
    of pseudo-labeling log into one run, a million steps apart).

    Each step is logged once: a resumed training re-trains steps that may have been logged
    before the interruption (metrics go out before the checkpoint; a damaged checkpoint falls
    back to an older one; a redone stage reopens its run), and MLflow cannot delete a point.
    """

    def __init__(self, tracker: Tracker, step_key: str, step_offset: int = 0):
        self.uri, self.run_id = tracker.uri, tracker.run_id
        self.step_key, self.step_offset = step_key, step_offset
        self._tracker: Tracker | None = None
        self._last_steps: dict[str, int | None] | None = None  # metric -> highest step in the run (None: unread)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None, "_last_steps": None}

    def _last_step(self, key: str) -> int:
        """The highest step of ``key`` in the run, -1 if it has none (each history read once, when first needed)."""
        client = self._tracker._client
        if self._last_steps is None:
            self._last_steps = dict.fromkeys(client.get_run(self.run_id).data.metrics)
        if key in self._last_steps and self._last_steps[key] is None:
            self._last_steps[key] = max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
        return self._last_steps.get(key, -1)

    def __call__(self, metrics: dict[str, Any]) -> None:
        if not (self.uri and self.run_id):
            return
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.run_id)
        step = int(metrics.get(self.step_key, 0)) + self.step_offset
        new = {k: v for k, v in metrics.items() if k != self.step_key and step > self._last_step(k)}
        if new:  # a report of the step alone has nothing to log (and read nothing above)
            self._tracker.log_metrics(new, step=step)
            self._last_steps.update(dict.fromkeys(new, step))
