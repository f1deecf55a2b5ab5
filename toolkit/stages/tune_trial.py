"""One Tune trial, run inside its Tune actor: what it receives by value (``TrialJob``), the config
it runs (base + sampled point + in-process execution), and the rounds with a report and a Tune
checkpoint after each.

Kept apart from the driver (``stages/tune.py``) because this code runs on whichever node Ray
places the trial: it may read nothing from the driver's disk, only what ``TrialJob`` carries.
Each trial runs in-process (backend and pool inference): a trial holding one CPU whose nested
``TorchTrainer`` asked for more would starve on a small machine. A trial that Ray gave a GPU
(or a share of one: ``trials.gpus``) trains on it; it reports the device it used.
"""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from toolkit.config import Execution, Study
from toolkit.datasets.mnist import Split, resolve_root
from toolkit.datasets.training_data import ImageData, load_image_data
from toolkit.engine.jobs import ModelWeights
from toolkit.config.search_space import trial_config
from toolkit.tracking.runs import Tracker
from toolkit.tracking.tune_runs import DEVICE, DEVICE_NAME, METRIC
from toolkit.stages.pseudolabel_rounds import STATE_FILE, RoundsStart, load_state, run_rounds, save_state
from toolkit.stages.skeleton import StageRun

SIMCLR_REF = "weights"  # model.init=simclr:weights: the trial's SimCLR weights came by value


@dataclass(frozen=True)
class TrialJob:
    """What every trial gets through Ray's object store: values, never a path on the driver's disk."""

    base: Study                        # the study every trial's point is applied to
    execution: Execution               # how every trial runs (trial_execution), its device set in the trial
    key: str
    simclr: ModelWeights | None        # the SimCLR weights of model.init=simclr (the searched 'simclr' choice)
    start: ModelWeights | None         # a base classifier every trial starts its rounds from (no round 0)
    simclr_choices: dict[str, ModelWeights]  # explicit 'simclr:<ref>' choices of model.init
    splits: list[Split]                # the driver's split, or its folds of the labeled images (label_folds): a
                                       # trial reads no label to draw them
    images: ImageData | None           # a user's own images (no node but the driver can read their folder)


def trial_execution(execution: Execution) -> Execution:
    """How every trial runs: in-process rounds and inference in its Tune actor, no MLflow of its own.

    Where a trial runs is an execution of its own, built once on the driver: no Ray Train
    workers or Ray Data actors inside a trial; its own GPU (``trials.gpus``) is used
    in-process through ``run.device``, which the trial sets from what Ray gave it (``placed_device``).
    """
    return execution.replace(**{
        "run.data_root": str(resolve_root(execution.run.data_root)),  # each node's own copy, at the same path
        "run.backend": "local",
        "inference.backend": "local",
        "ray.use_gpu": False,
        # no oversubscription of the trial's CPUs
        "run.threads": execution.run.threads or max(1, int(execution.trials.cpus)),
    })


def reproduce_args(execution: Execution, train_subset: int) -> str:
    """The command-line overrides that run ``toolkit pseudolabel`` the way a trial ran (in-process, same pool)."""
    args = {"run.data_root": execution.run.data_root, "data.train_subset": train_subset,
            "run.backend": execution.run.backend, "inference.backend": execution.inference.backend,
            "run.threads": execution.run.threads}
    return " ".join(shlex.quote(f"{k}={v}") for k, v in args.items() if v)


def _trial_study(job: TrialJob, point: dict) -> Study:
    return trial_config(job.base, point, SIMCLR_REF if job.simclr else None)


def placed_device(gpu_ids: list) -> str:
    """``run.device`` of a trial: ``cuda`` when Ray gave it (a share of) a GPU, ``ray.get_gpu_ids()``, else ``cpu``."""
    return "cuda" if gpu_ids else "cpu"


def device_report(execution: Execution) -> dict[str, str]:
    """Where this trial trains, read in its own process: the device type and its name (a GPU's model, or the CPU's).

    ``device_for`` is the device the rounds train and predict on; it fails (the trial fails,
    readably) when Ray gave a GPU that torch cannot see.
    """
    from toolkit.execution.pool_inference import device_for
    from toolkit.tracking.machine import device_label

    device = device_for(execution)
    return {DEVICE: device.type, DEVICE_NAME: device_label(device)}


def _round_result(entry: dict, placed: dict[str, str]) -> dict[str, Any]:
    return {METRIC: float(entry["val_acc"]), "round": int(entry["round"]), "threshold": float(entry["threshold"]),
            "added": int(entry["added"]), "pool_left": int(entry["pool_left"]), **placed}


def rounds_start(job: TrialJob, study: Study) -> RoundsStart:
    """Where a trial's rounds start: the base model, else round 0 from the SimCLR weights ``study.model.init``
    names (carried in the job), else from scratch."""
    init = None
    if study.model.init.startswith("simclr:"):
        ref = study.model.init[len("simclr:"):]
        init = job.simclr if ref == SIMCLR_REF else job.simclr_choices[ref]
    return RoundsStart(start=job.start, start_id="base" if job.start else "round0", init=init)


def state_file(fold: int, folds: int) -> str:
    """A trial's checkpoint holds its round state (``rounds.pt``), or one per fold of ``folds`` > 1
    (``fold<f>-rounds.pt``)."""
    return f"fold{fold}-{STATE_FILE}" if folds > 1 else STATE_FILE


def _round_entry(states: list[dict], splits: list[Split]) -> dict:
    """The last round of each fold (or of the one run) as one round result: the held-out accuracy pooled
    over the folds (each fold's validation accuracy weighted by its size); added and pool left: the means."""
    entries = [s["history"][-1] for s in states]
    if len(entries) == 1:
        return entries[0]
    sizes = [len(s.val) for s in splits]
    mean = lambda k: sum(e[k] for e in entries) / len(entries)  # noqa: E731
    return {"round": entries[0]["round"], "threshold": entries[0]["threshold"],
            "val_acc": sum(e["val_acc"] * n for e, n in zip(entries, sizes)) / sum(sizes),
            "added": round(mean("added")), "pool_left": round(mean("pool_left"))}


def _trial_images(job: TrialJob, study: Study, execution: Execution) -> ImageData:
    """The images: a user's own, carried in the job; a benchmark's, from this node's own copy."""
    if job.images is not None:
        return job.images
    return load_image_data(study.data, execution.run.data_root, execution.run.download, execution.run.resident_mb << 20)


def _trial(point: dict, job: TrialJob) -> None:
    """A Tune trial: the rounds in this process; after each, ``{"val_acc", "round", ...}`` and a checkpoint.

    ``tune.objective=label_folds``: the rounds run once per fold of the labeled images, all
    folds moving round by round together, and ``val_acc`` is their pooled held-out accuracy.
    """
    import ray
    from ray import tune as ray_tune

    study = _trial_study(job, point)  # a ConfigError fails the trial, readably
    execution = job.execution.replace(**{"run.device": placed_device(ray.get_gpu_ids())})
    placed = device_report(execution)
    trial_id = ray_tune.get_context().get_trial_id()
    begin = rounds_start(job, study)
    splits = job.splits
    folds = len(splits)
    states: list[dict | None] = [None] * len(splits)
    restored = ray_tune.get_checkpoint()
    if restored is not None:  # a retried trial (its node died, or Ctrl-C): resume after its last round
        with restored.as_directory() as d:
            states = [load_state(Path(d) / state_file(f, folds)) for f in range(len(splits))]
        print(f"[tune] trial {trial_id}: resuming after round {states[0]['rounds_done']}", flush=True)
    done = states[0]["rounds_done"] if states[0] else 0

    # scratch: this process's own training checkpoints, on this node, removed at the end
    with tempfile.TemporaryDirectory(prefix="toolkit-trial-") as scratch:
        execution = execution.replace(**{"run.output_dir": scratch})
        data = _trial_images(job, study, execution)
        runs = [StageRun(study, execution, f"{job.key}-trial-{trial_id}" + (f"-fold{f}" if folds > 1 else ""),
                         Path(scratch) / f"fold{f}", Tracker.disabled(), data, sp) for f, sp in enumerate(splits)]
        for r in range(done, study.pseudolabel.rounds):
            states = [run_rounds(run, st, lambda *_: None, replace(begin, until=r + 1)) for run, st in zip(runs, states)]
            with tempfile.TemporaryDirectory(prefix="toolkit-trial-") as d:
                for f, st in enumerate(states):
                    save_state(Path(d) / state_file(f, folds), st)
                ray_tune.report(_round_result(_round_entry(states, splits), placed),
                                checkpoint=ray_tune.Checkpoint.from_directory(d))
    if done and done >= study.pseudolabel.rounds:
        # restored after its last round had finished: Tune still needs the final result
        ray_tune.report(_round_result(_round_entry(states, splits), placed))
