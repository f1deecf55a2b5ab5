"""One Tune trial, run inside its Tune actor: what it receives by value (``TrialJob``), the config
it runs (base + sampled point + in-process execution), and the rounds with a report and a Tune
checkpoint after each.

Kept apart from the driver (``stages/tune.py``) because this code runs on whichever node Ray
places the trial: it may read nothing from the driver's disk, only what ``TrialJob`` carries.
Each trial runs in-process (backend and pool inference): a trial holding one CPU whose nested
``TorchTrainer`` asked for more would starve on a small machine. A trial that Ray gave a GPU
(or a share of one: ``tune.gpus_per_trial``) trains on it; it reports the device it used.
"""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, config_from_dict
from ..data import resolve_root
from ..jobs import ModelWeights
from ..search_space import trial_config
from ..tracking import Tracker
from ..tune_records import DEVICE, DEVICE_NAME, METRIC
from .rounds import STATE_FILE, load_state, run_rounds, save_state

SIMCLR_REF = "weights"  # model.init=simclr:weights: the trial's SimCLR weights came by value


@dataclass(frozen=True)
class TrialJob:
    """What every trial gets through Ray's object store: values, never a path on the driver's disk."""

    base: dict                         # the base config (Config.to_dict())
    execution: dict[str, Any]          # _execution_overrides
    key: str
    simclr: ModelWeights | None        # the SimCLR weights of model.init=simclr (the searched 'simclr' choice)
    start: ModelWeights | None         # a base classifier every trial starts its rounds from (no round 0)
    simclr_choices: dict[str, ModelWeights]  # explicit 'simclr:<ref>' choices of model.init


def _execution_overrides(cfg: Config, train_subset: int) -> dict[str, Any]:
    """How every trial runs: in-process rounds and inference in its Tune actor, no MLflow of its own."""
    ov: dict[str, Any] = {
        "data.root": str(resolve_root(cfg.data.root)),  # each node's own copy, at the same path
        "run.backend": "local",
        "pseudolabel.inference": "local",
        # no Ray Train workers or Ray Data actors inside a trial: its own GPU (tune.gpus_per_trial) is
        # used in-process through run.device, which the trial sets from what Ray gave it (placed_device)
        "ray.use_gpu": False,
    }
    if train_subset:
        ov["data.train_subset"] = train_subset
    if not cfg.run.threads:
        ov["run.threads"] = max(1, int(cfg.tune.cpus_per_trial))  # no oversubscription of the trial's CPUs
    return ov


def reproduce_args(execution: dict[str, Any]) -> str:
    """The command-line overrides that run ``toolkit pseudolabel`` the way a trial ran (in-process, same pool)."""
    keys = ("data.root", "data.train_subset", "run.backend", "pseudolabel.inference", "run.threads")
    return " ".join(shlex.quote(f"{k}={execution[k]}") for k in keys if k in execution)


def _trial_cfg(job: TrialJob, point: dict, device: str) -> Config:
    base = config_from_dict(job.base)
    return trial_config(base, point, SIMCLR_REF if job.simclr else None).replace(**job.execution, **{"run.device": device})


def placed_device(gpu_ids: list) -> str:
    """``run.device`` of a trial: ``cuda`` when Ray gave it (a share of) a GPU, ``ray.get_gpu_ids()``, else ``cpu``."""
    return "cuda" if gpu_ids else "cpu"


def device_report(cfg: Config) -> dict[str, str]:
    """Where this trial trains, read in its own process: the device type and its name (a GPU's model, or the CPU's).

    ``device_for`` is the device the rounds train and predict on; it fails (the trial fails,
    readably) when Ray gave a GPU that torch cannot see.
    """
    from ..inference import device_for
    from ..machine import device_label

    device = device_for(cfg)
    return {DEVICE: device.type, DEVICE_NAME: device_label(device)}


def _round_result(entry: dict, placed: dict[str, str]) -> dict[str, Any]:
    return {METRIC: float(entry["val_acc"]), "round": int(entry["round"]), "threshold": float(entry["threshold"]),
            "added": int(entry["added"]), "pool_left": int(entry["pool_left"]), **placed}


def _trial(point: dict, job: TrialJob) -> None:
    """A Tune trial: the rounds in this process; after each, ``{"val_acc", "round", ...}`` and a checkpoint."""
    import ray
    from ray import tune as ray_tune

    cfg = _trial_cfg(job, point, placed_device(ray.get_gpu_ids()))  # a ConfigError fails the trial, readably
    placed = device_report(cfg)
    init = None
    if cfg.model.init.startswith("simclr:"):
        ref = cfg.model.init[len("simclr:"):]
        init = job.simclr if ref == SIMCLR_REF else job.simclr_choices[ref]
    trial_id = ray_tune.get_context().get_trial_id()
    state = None
    restored = ray_tune.get_checkpoint()
    if restored is not None:  # a retried trial (its node died, or Ctrl-C): resume after its last round
        with restored.as_directory() as d:
            state = load_state(Path(d) / STATE_FILE)
    reported: list[int] = []

    def after_round(st: dict, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="toolkit-trial-") as d:
            save_state(Path(d) / STATE_FILE, st)
            ray_tune.report(_round_result(st["history"][-1], placed), checkpoint=ray_tune.Checkpoint.from_directory(d))
        reported.append(st["rounds_done"])

    # scratch: this process's own training checkpoints, on this node, removed at the end
    with tempfile.TemporaryDirectory(prefix="toolkit-trial-") as scratch:
        cfg = cfg.replace(**{"run.output_dir": scratch})
        final = run_rounds(cfg, Tracker.disabled(), f"{job.key}-trial-{trial_id}", Path(scratch), state, after_round,
                           start=job.start, start_id="base" if job.start else "round0", init=init)
    if not reported and final["history"]:
        # restored after its last round had finished: Tune still needs the final result
        ray_tune.report(_round_result(final["history"][-1], placed))
