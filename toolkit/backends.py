"""Run a per-worker training function on Ray Train (``TorchTrainer``) or in-process (``local``).

The worker function has the signature ``fn(params: dict, session: Session)``; the
session is the only thing that differs between backends: where checkpoints come
from and go to, and the rank / world size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import Config, ConfigError


class Session(Protocol):
    rank: int
    world: int

    def latest_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class LocalSession:
    """In-process session: checkpoints are folders ``<root>/checkpoint_000001`` (the newest kept two)."""

    rank = 0
    world = 1

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.last_metrics: dict[str, Any] = {}

    def _checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest_checkpoint(self) -> Path | None:
        ckpts = self._checkpoints()
        return ckpts[-1] if ckpts else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.last_metrics = dict(metrics)
        if checkpoint_dir is None:
            return
        n = len(self._checkpoints()) and int(self._checkpoints()[-1].name.split("_")[1]) + 1
        final = self.root / f"checkpoint_{n:06d}"
        tmp = self.root / f"checkpoint_{n:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        os.replace(tmp, final)  # atomic: a crash never leaves a half-written "latest"
        for old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RaySession:
    """Session inside a Ray Train worker."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        self._restored: Path | None = None

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        if self._restored is None:
            # to_directory copies (or downloads, on cloud storage) into a local temp folder
            self._restored = Path(ckpt.to_directory())
        return self._restored

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        # every rank must report; only rank 0 hands over the checkpoint
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if (checkpoint_dir and self.rank == 0) else None
        ray.train.report(metrics, checkpoint=ckpt)


# ---------------------------------------------------------------- drivers


def _worker_registry() -> dict[str, Callable]:
    from . import train_loops

    return {"simclr": train_loops.simclr_worker, "classifier": train_loops.classifier_worker}


def _ray_entry(train_loop_config: dict) -> None:
    """What each Ray Train worker runs: look the loop up by name (functions stay importable, not pickled)."""
    fn = _worker_registry()[train_loop_config["loop"]]
    fn(train_loop_config["params"], RaySession())


def check_gpu_request(cfg: Config) -> None:
    """``ray.use_gpu=true`` with no GPU to use is a config error, not a hang."""
    if not cfg.ray.use_gpu:
        return
    if cfg.run.backend == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("ray.use_gpu=true is not allowed: no CUDA GPU is visible to this process")
        return
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("ray.use_gpu=true is not allowed: the Ray cluster has no GPU")


def init_ray(cfg: Config) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, or start an embedded local Ray (dashboard off)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # logical CPUs may exceed cores: a Tune trial plus its 2 training workers must fit (see NOTES)
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        runtime_env={"worker_process_setup_hook": "toolkit.backends.quiet_worker_logs"},
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=True,
    )


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process of an embedded Ray.

    Without the dashboard (it needs ray[default]) the State API is absent, and Ray
    Train's placement-group cleaner warns about it every second; the cleanup itself
    still happens when the driver ends.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def storage_path(cfg: Config) -> str:
    if cfg.ray.storage_path:
        sp = cfg.ray.storage_path
        return sp if "://" in sp else str(Path(sp).expanduser().resolve())
    return str((Path(cfg.run.output_dir).expanduser() / "ray").resolve())


def local_checkpoint_root(cfg: Config, run_name: str) -> Path:
    return (Path(cfg.run.output_dir).expanduser() / "local" / run_name).resolve()


def params_for_workers(params: dict) -> dict:
    """``params`` with the driver's relative data root made absolute.

    Ray workers do not run in the driver's folder (a local worker starts in Ray's session
    folder), so ``data.root=../shared/data`` would name another place there. An empty root
    is resolved too: ``$TOOLKIT_DATA_DIR`` is the driver's, not the worker's.
    """
    from .data import resolve_root

    config = {**params["config"]}
    config["data"] = {**config["data"], "root": str(resolve_root(config["data"]["root"]))}
    return {**params, "config": config}


def run_training(cfg: Config, loop: str, params: dict, run_name: str) -> tuple[Path, dict]:
    """Run ``loop`` ('simclr' | 'classifier') under ``cfg.run.backend``; return (final checkpoint dir, last metrics).

    Re-running with the same ``run_name`` resumes from the newest checkpoint.
    """
    if cfg.run.backend == "local":
        check_gpu_request(cfg)
        session = LocalSession(local_checkpoint_root(cfg, run_name))
        _worker_registry()[loop](params, session)
        final = session.latest_checkpoint()
        if final is None:
            raise RuntimeError(f"training '{run_name}' reported no checkpoint")
        return final, session.last_metrics

    from .data import check_mnist

    check_mnist(cfg.data.root, cfg.data.download)  # in the driver: one line, not a traceback from each worker
    init_ray(cfg)
    check_gpu_request(cfg)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker=_ray_entry,
        train_loop_config={"loop": loop, "params": params_for_workers(params)},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training '{run_name}' reported no checkpoint")
    path = result.checkpoint.path
    if result.checkpoint.filesystem.type_name != "local":
        path = result.checkpoint.to_directory(tempfile.mkdtemp(prefix="toolkit-ckpt-"))
    return Path(path), dict(result.metrics or {})
