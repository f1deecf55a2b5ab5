"""Run a ``TrainJob`` on Ray Train (``TorchTrainer``) or in-process (``local``); return the final checkpoint's payload.

The worker function has the signature ``fn(job: TrainJob, session: Session)``; the
session is the only thing that differs between backends: where checkpoints go and
come back from, and the rank / world size. What a job produces comes back through
Ray (checkpoints in ``ray.storage_path``), and metrics reach MLflow from the driver's
node only (a Ray Train callback on the controller, which Ray places on the driver's
node): no worker opens the tracking store or a path on the driver's disk.
"""

from __future__ import annotations

import dataclasses

import functools
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from toolkit.engine import checkpoints
from toolkit.config import ConfigError, Execution
from toolkit.engine.jobs import TrainJob
from toolkit.execution.ray_checkpoints import older_registered_checkpoints, remove_strays
from toolkit.execution.storage import check_shared, resolve_output_dir, storage_path

MetricsSink = Callable[[dict[str, Any]], None]


class Session(Protocol):
    rank: int
    world: int

    def restore(self) -> dict | None: ...

    def unreadable(self) -> int:
        """How many checkpoints the last ``restore`` found but could not read (it returned None)."""
        ...

    def report(self, metrics: dict[str, Any], payload: dict | None) -> None: ...


class LocalSession:
    """In-process session: checkpoints are folders ``<root>/checkpoint_000001`` (the newest two kept)."""

    rank = 0
    world = 1

    def __init__(self, root: Path, sink: MetricsSink | None = None, keep: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep, self.sink = keep, sink
        self.last_metrics: dict[str, Any] = {}

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def restore(self) -> dict | None:
        """The newest readable checkpoint; a damaged newest one falls back to the one before, with a warning."""
        for ckpt in reversed(self.checkpoints()):
            try:
                return checkpoints.load(ckpt)
            except checkpoints.CheckpointError as e:
                print(f"[warning] {e}; falling back to the previous checkpoint", flush=True)
        return None

    def unreadable(self) -> int:
        # restore() returns None with folders left only when every one of them failed to load
        return len(self.checkpoints())

    def report(self, metrics: dict[str, Any], payload: dict | None) -> None:
        self.last_metrics = dict(metrics)
        if self.sink:
            self.sink(metrics)
        if payload is None:
            return
        ckpts = self.checkpoints()
        n = int(ckpts[-1].name.split("_")[1]) + 1 if ckpts else 0
        final, tmp = self.root / f"checkpoint_{n:06d}", self.root / f"checkpoint_{n:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints.save(tmp / checkpoints.CHECKPOINT_FILE, payload)
        os.replace(tmp, final)  # atomic: a crash never leaves a half-written "latest"
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RaySession:
    """Session inside a Ray Train worker: checkpoints travel through Ray's storage, never a local folder."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()

    def unreadable(self) -> int:
        return 0  # a damaged Ray checkpoint with no older registered one fails the run loudly (restore raises)

    def restore(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        try:
            with ckpt.as_directory() as d:  # downloads from cloud storage when needed, and cleans up
                return checkpoints.load(d)
        except checkpoints.CheckpointError as e:
            # only checkpoints Ray registered before this one: a folder uploaded after it but never
            # registered (a run stopped in between) holds epochs MLflow never saw
            for older in older_registered_checkpoints(ckpt):
                try:
                    with older.as_directory() as d:
                        state = checkpoints.load(d)
                except checkpoints.CheckpointError:
                    continue
                if self.rank == 0:
                    sys.stdout.write(f"[warning] {e}; resuming from the previous checkpoint {older.path}\n")
                return state
            raise

    def report(self, metrics: dict[str, Any], payload: dict | None) -> None:
        import ray.train

        # every rank must report; only rank 0 hands over a checkpoint
        if payload is None or self.rank != 0:
            ray.train.report(metrics)
            return
        d = Path(tempfile.mkdtemp(prefix="toolkit-ckpt-"))
        try:
            checkpoints.save(d / checkpoints.CHECKPOINT_FILE, payload)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                             delete_local_checkpoint_after_upload=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- drivers


def _worker(loop: str) -> Callable:
    from toolkit.engine import workers

    return {"simclr": workers.simclr_worker, "classifier": workers.classifier_worker}[loop]


def _ray_entry(train_loop_config: dict) -> None:
    """What each Ray Train worker runs: the job arrives by value through Ray."""
    job: TrainJob = train_loop_config["job"]
    _worker(job.loop)(job, RaySession())


def _sink_callback(sink: MetricsSink):
    """A Ray Train callback that feeds rank 0's reported metrics to ``sink`` on the controller (the driver's node)."""
    from ray.train import UserCallback

    class _Sink(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                sink(metrics[0])

    return _Sink()


@functools.cache
def _interruptible_trainer_class():
    from ray.train.torch import TorchTrainer

    class InterruptibleTrainer(TorchTrainer):
        """``TorchTrainer`` whose Ctrl-C / SIGTERM aborts the run and then reaches the CLI as KeyboardInterrupt.

        Ray Train installs its own SIGINT handler in ``fit()`` (abort, then exit 0 or 1), which
        would hide the interruption: the command must exit 130 and mark its MLflow run KILLED.
        (Overrides a private hook of Ray Train 2.5x; the version is bounded in pyproject.toml.)
        """

        interrupted = False

        def _register_sigint_handler(self, controller):
            import ray

            def on_signal(signum, frame):
                self.interrupted = True
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - the controller may already be gone
                    pass

            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)

    return InterruptibleTrainer


def _ray_init(**kwargs) -> None:
    """``ray.init``, keeping this process's SIGTERM handler.

    ``ray.init`` installs its own (``sys.exit(15)``) in the main thread. The CLI's handler turns
    SIGTERM into an interrupt (exit 130, MLflow runs KILLED); without it, a SIGTERM during
    in-process work after Ray started (``run.classifiers_local``, pool inference, the test
    report) would end the command as a failure.
    """
    import threading

    import ray

    main = threading.current_thread() is threading.main_thread()
    kept = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    finally:
        if kept is not None:
            signal.signal(signal.SIGTERM, kept)


def init_ray(execution: Execution) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, or start an embedded local Ray (dashboard off).

    The embedded Ray listens on 127.0.0.1 only, with Ray's token authentication on and its
    token file private (``embedded_ray.closed``): its ports are useless to other machines, and
    to other local users without the token.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from toolkit.execution.console import quiet_loggers, show_toolkit_lines

    if not execution.run.verbose:
        quiet_loggers("ray")
    if not execution.embedded():
        _ray_init(address=execution.ray.address or None, log_to_driver=True)
        show_toolkit_lines(execution.run.verbose, None)
        return
    # logical CPUs may exceed cores: a Tune trial plus its 2 training workers must fit
    num_cpus = execution.ray.num_cpus or max(4, os.cpu_count() or 1)
    from toolkit.execution.embedded_ray import closed

    with closed():
        _ray_init(
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            runtime_env={"worker_process_setup_hook": "toolkit.execution.console.quiet_worker_logs"},
            object_store_memory=200 * 1024 * 1024,
            log_to_driver=True,
        )
    show_toolkit_lines(execution.run.verbose, Path(ray._private.worker.global_worker.node.get_logs_dir_path()))


def check_gpu_visible(execution: Execution, classifiers: bool = False) -> None:
    """What trains in this process needs its GPU here: ``ray.use_gpu`` or ``run.device=cuda`` under
    the local backend, and, when the command trains ``classifiers`` with ``run.classifiers_local``,
    under the Ray backend too (they would train on this process's CPU instead of Ray's GPU workers)."""
    wants = execution.ray.use_gpu or execution.run.device == "cuda"
    # an embedded Ray has this machine's GPUs and no others: none here means none there, known before
    # anything starts (a Ray cluster is asked for its resources once Ray is up, and may grow)
    in_process = execution.run.backend == "local" or execution.embedded() or (classifiers and execution.backend_for("classifier") == "local")
    if wants and in_process:
        import torch

        if not torch.cuda.is_available():
            if execution.run.backend != "local" and execution.ray.use_gpu:
                raise ConfigError("ray.use_gpu=true is not allowed: the embedded Ray (no ray.address) has this "
                                  "machine's GPUs, and no CUDA GPU is visible here")
            if execution.run.backend != "local":
                raise ConfigError("run.classifiers_local=true is not allowed: the classifiers would train in this "
                                  "process, which sees no CUDA GPU; set it false to train them on Ray Train's GPU workers")
            key = "ray.use_gpu=true" if execution.ray.use_gpu else "run.device='cuda'"
            raise ConfigError(f"{key} is not allowed: no CUDA GPU is visible to this process")


def require_resources(execution: Execution, need: dict[str, float], what: str) -> None:
    """Make sure the Ray cluster can ever give ``need`` ({"CPU": n, "GPU": m}) at once.

    An embedded Ray cannot grow: a request larger than it fails now with one line
    (Ray would otherwise wait forever). On a cluster the autoscaler may add nodes: ask
    it for them and wait up to ``ray.resource_wait_s``, with a progress line, then fail.
    """
    import ray

    def shortfall() -> tuple[str, str]:
        """(what is missing, what the cluster has of it); ("", "") when nothing is."""
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if v > 0 and have.get(k, 0) < v}
        return (", ".join(f"{v:g} {k}" for k, v in short.items()),
                ", ".join(f"{have.get(k, 0):g} {k}" for k in short))

    desc, has = shortfall()
    if not desc:
        return
    if execution.embedded() or execution.ray.resource_wait_s <= 0:
        raise ConfigError(f"{what} is not allowed: it needs {desc} and the Ray cluster has {has}")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * int(need.get("GPU", 0)) or [{"CPU": 1}] * int(need.get("CPU", 0)))
    t0 = time.monotonic()
    next_line = t0
    while desc:
        now = time.monotonic()
        if now - t0 > execution.ray.resource_wait_s:
            raise ConfigError(f"{what}: the Ray cluster still has {has} after waiting {now - t0:.0f}s for the autoscaler "
                              f"to add {desc} (ray.resource_wait_s={execution.ray.resource_wait_s:g})")
        if now >= next_line:
            print(f"[ray] waiting for the autoscaler: {what} needs {desc}, the cluster has {has} "
                  f"({now - t0:.0f}s of {execution.ray.resource_wait_s:g}s)", flush=True)
            next_line = now + 30
        time.sleep(5)
        desc, has = shortfall()


def local_checkpoint_root(execution: Execution, run_name: str) -> Path:
    return resolve_output_dir(execution.run.output_dir) / "local" / run_name


def run_training(execution: Execution, job: TrainJob, run_name: str, sink: MetricsSink | None = None) -> tuple[dict, dict]:
    """Run ``job`` where the execution puts its loop (``Execution.backend_for``: Ray Train's workers or this
    process); return (final checkpoint payload, last metrics of rank 0).

    ``sink`` receives rank 0's metrics after every report, on the driver's node.
    Re-running with the same ``run_name`` resumes from the newest checkpoint; on Ray,
    a lost worker or node restarts the job from it (``ray.max_failures``).
    """
    if execution.backend_for(job.loop) == "local":
        check_gpu_visible(execution, classifiers=job.loop == "classifier")
        session = LocalSession(local_checkpoint_root(execution, run_name), sink)
        _worker(job.loop)(job, session)
        final = session.restore()
        if final is None:
            raise RuntimeError(f"training '{run_name}' reported no checkpoint")
        return final, session.last_metrics

    init_ray(execution)
    need = {"CPU": execution.ray.num_workers * execution.ray.cpus_per_worker, "GPU": execution.ray.num_workers if execution.ray.use_gpu else 0}
    require_resources(execution, need, f"ray.num_workers={execution.ray.num_workers} (x {execution.ray.cpus_per_worker:g} CPU"
                                 f"{', 1 GPU' if execution.ray.use_gpu else ''} each)")
    storage = storage_path(execution)
    check_shared(execution, storage)
    remove_strays(storage, run_name)  # left by an interrupted run: Ray would neither resume nor delete them
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": execution.ray.cpus_per_worker}
    if execution.ray.use_gpu:
        resources["GPU"] = 1
    if job.images is not None and not isinstance(job.images, ray.ObjectRef):
        # a user's images: once into the object store, which every worker reads from wherever it runs
        job = dataclasses.replace(job, images=ray.put(job.images))
    trainer = _interruptible_trainer_class()(
        train_loop_per_worker=_ray_entry,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=execution.ray.num_workers, use_gpu=execution.ray.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=execution.ray.max_failures),
            callbacks=[_sink_callback(sink)] if sink else None,
        ),
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopped = KeyboardInterrupt(f"training '{run_name}' stopped by a signal; its checkpoints are kept")
    try:
        result = trainer.fit()
    except Exception:
        if trainer.interrupted:  # the aborted controller ends fit() with an ActorDiedError
            raise stopped from None
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if trainer.interrupted:
        raise stopped
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training '{run_name}' reported no checkpoint")
    with result.checkpoint.as_directory() as d:  # a cloud checkpoint is downloaded, then removed
        payload = checkpoints.load(d)
    return payload, dict(result.metrics or {})
