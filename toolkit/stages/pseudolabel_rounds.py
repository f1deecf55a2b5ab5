"""The pseudo-labeling round loop, shared by the `pseudolabel` stage (in the driver) and Tune trials (anywhere).

Round r: predict the remaining pool (Ray Data actor pool, or in-process), keep
predictions above the round's threshold (a schedule of r), move them from the pool
into the training set, retrain (warm-started or from the initial weights) and keep the
last weights (validation accuracy is logged, never used: the chain reads no validation label). The state (pool, pseudo-labels, history and the
current model's weights) lives in memory and is handed to ``after_round`` after each
round: a file in the stage folder, or a Tune checkpoint in Ray's storage. Pseudo-label
precision uses the pool's hidden true labels: it is logged as a diagnostic and never
decides anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from toolkit.engine import checkpoints
from toolkit.config import ConfigError, PseudoLabelConfig, Study, stage_digest
from toolkit.datasets.mnist import Split
from toolkit.datasets.spec import ImageSpec
from toolkit.execution.pool_inference import predict_pool
from toolkit.engine.jobs import ModelWeights
from toolkit.maths.selection import select_pseudo_labels
from toolkit.maths.schedules import threshold_at
from toolkit.tracking.runs import Tracker
from toolkit.stages.classifier_fit import ClassifierTraining, train_classifier
from toolkit.stages.skeleton import StageRun

STATE_FILE = "rounds.pt"
STATE_KIND = "rounds"  # a checkpoint payload: the round state, with the current model's weights as state_dict


def round_threshold(pc: PseudoLabelConfig, r: int) -> float:
    """The confidence threshold of round ``r`` (0-based) under the schedule."""
    if pc.mode == "oneshot":
        return pc.threshold_start
    rate = pc.threshold_rate if pc.schedule in ("exponential", "step") else None
    return threshold_at(r, pc.schedule, pc.threshold_start, pc.threshold_floor, pc.rounds, rate, pc.step_every)


def load_state(path: Path) -> dict | None:
    """The round state saved at ``path`` (None when there is none); a damaged file is an error, not a fresh start."""
    if not path.is_file():
        return None
    state = checkpoints.load(path)
    if state.get("kind") != STATE_KIND:
        raise checkpoints.CheckpointError(f"{path} is not a pseudo-labeling round state")
    return state


def save_state(path: Path, state: dict) -> None:
    checkpoints.save(path, {k: v for k, v in state.items() if k != "path"})  # atomic: a kill keeps the previous round


def state_weights(state: dict, spec: ImageSpec) -> ModelWeights:
    """The state's current model (a classifier), as weights to pass by value."""
    return ModelWeights("classifier", state["model_config"], state["state_dict"], spec)


def _log_round(tracker: Tracker, entry: dict) -> None:
    """A round's history entry as round-level series under round/ (the classifier logs its own val_acc per step)."""
    tracker.log_metrics({f"round/{k}": v for k, v in entry.items() if k not in ("round", "counts")}, step=entry["round"])


def _adopt_first_round(study: Study, source: Path, digest: str, start_id: str, tracker: Tracker) -> dict | None:
    """The first round of a finished one-shot run, as this iterative run's round 1 (None when it does not match).

    A one-shot run is round 1 of an iterative run with the same config (same start model,
    same threshold for round 1, same training): the pipeline runs both, and retraining the
    same round twice would cost minutes for nothing.
    """
    try:
        other = load_state(source / STATE_FILE)
    except checkpoints.CheckpointError:
        return None
    oneshot = study.replace(**{"pseudolabel.mode": "oneshot"})
    if (not other or other.get("rounds_done") != 1 or other.get("config_digest") != stage_digest(oneshot, "pseudolabel")
            or other.get("start_id") != start_id
            or abs(round_threshold(study.pseudolabel, 0) - round_threshold(oneshot.pseudolabel, 0)) > 1e-12):
        return None
    state = {**other, "config_digest": digest, "adopted_from": str(source)}
    first = state["history"][0]
    _log_round(tracker, first)
    tracker.set_tags({"toolkit.round1_from": str(source)})
    print(f"[pseudolabel] round 1/{study.pseudolabel.rounds}: taken from the one-shot run in {source} "
          f"(same config and start model), val acc {first['val_acc']:.4f}", flush=True)
    return state


def new_state(digest: str, start_id: str, start: ModelWeights, encoder_pretrained: bool, split: Split) -> dict:
    return {"kind": STATE_KIND, "config_digest": digest, "rounds_done": 0, "start_id": start_id,
            "model_config": start.config, "state_dict": start.state_dict, "encoder_pretrained": encoder_pretrained,
            "pool": split.pool.tolist(), "pseudo_indices": [], "pseudo_labels": [], "history": []}


@dataclass(frozen=True)
class RoundsStart:
    """Where the rounds start: ``start``, the model of round 0 (None: train it on the labeled images,
    from ``init``, the SimCLR weights, if any), the id that names it, and ``adopt_from``, a finished
    one-shot run's folder whose round may stand as round 1. ``until``: stop after that many rounds
    (None: all of them); a later call with the state it returned goes on, so several runs can move
    round by round together (a Tune trial's label folds)."""

    start: ModelWeights | None = None
    start_id: str = "round0"
    init: ModelWeights | None = None
    adopt_from: Path | None = None
    until: int | None = None


def run_rounds(run: StageRun, state: dict | None, after_round: Callable[[dict, dict], None],
               begin: RoundsStart = RoundsStart()) -> dict:
    """The round loop, in the driver (a stage) or inside a Tune trial. Returns the final state.

    ``run``: the study, execution, data, split and MLflow run; ``run.folder`` is where training
    checkpoints of this process go (never read by another node) and ``run.key`` names them.
    ``state``: a saved state to resume from (None: start). ``after_round(state, metrics)``
    persists each finished round (a file in the stage folder, or a Tune checkpoint).
    The pool's true labels are read for diagnostics only.
    """
    study, tracker, key, scratch = run.study, run.tracker, run.key, run.folder
    pc = study.pseudolabel
    data, split = run.data, run.split
    train_labels = data.train_labels
    rounds = 1 if pc.mode == "oneshot" else pc.rounds
    digest = stage_digest(study, "pseudolabel")
    init = begin.init
    if state and state.get("config_digest") != digest:
        raise ConfigError(f"run.name={run.execution.run.name!r}: {scratch} holds pseudo-labeling rounds of another "
                          "study; choose another run.name (or delete that folder to start over)")
    if state and begin.until is None:
        print(f"[pseudolabel] resuming after round {state['rounds_done']}", flush=True)
    if not state and begin.adopt_from is not None:
        state = _adopt_first_round(study, begin.adopt_from, digest, begin.start_id, tracker)
        if state:
            after_round(state, {})
    if not state:
        start = begin.start
        if start is None:  # round 0: the labeled images alone
            _, trained = train_classifier(run, f"{key}-round0", "round0.pt", ClassifierTraining(init=init, label="round 0"))
            start = ModelWeights("classifier", study.to_dict(), trained["state_dict"], data.spec)
        state = new_state(digest, begin.start_id, start, init is not None, split)

    for r in range(state["rounds_done"], rounds if begin.until is None else min(rounds, begin.until)):
        t0 = time.perf_counter()
        threshold = round_threshold(pc, r)
        pool = torch.tensor(state["pool"], dtype=torch.long)
        probs = torch.from_numpy(predict_pool(study, run.execution, state_weights(state, data.spec), pool, data.train_images))
        sel = select_pseudo_labels(probs, threshold, pc.per_class_cap or None, pc.class_adaptive)
        new_idx = pool[sel.positions]
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[sel.positions] = False
        pseudo_idx = state["pseudo_indices"] + new_idx.tolist()
        pseudo_lab = state["pseudo_labels"] + sel.labels.tolist()
        # diagnostics only, and only where the pool's labels exist (a benchmark): they never feed back into
        # selection or training; a real dataset's pool has no labels to compare with
        truth = data.kind == "benchmark"
        precision_round = (float((train_labels[new_idx] == sel.labels).float().mean())
                           if len(new_idx) and truth else float("nan"))
        all_idx = torch.tensor(pseudo_idx, dtype=torch.long)
        precision_total = (float((train_labels[all_idx] == torch.tensor(pseudo_lab)).float().mean())
                           if len(pseudo_idx) and truth else float("nan"))
        warm = state_weights(state, data.spec)
        _, trained = train_classifier(run, f"{key}-round{r + 1}", f"round{r + 1}.pt", ClassifierTraining(
            init=warm if pc.warm_start else init, encoder_pretrained=bool(state["encoder_pretrained"]),
            pseudo_indices=torch.tensor(pseudo_idx, dtype=torch.long), pseudo_labels=torch.tensor(pseudo_lab, dtype=torch.long),
            steps=pc.steps_per_round, step_offset=(r + 1) * 1_000_000, label=f"round {r + 1}/{rounds}",
        ))
        counts = sel.counts_per_class(data.spec.num_classes).tolist()
        metrics = {
            "threshold": threshold,
            "added": len(new_idx),
            "pool_left": int(keep.sum()),
            "train_size": len(split.labeled) + len(pseudo_idx),
            "val_acc": trained["val_acc"],
            "round_seconds": time.perf_counter() - t0,
            "diagnostic/pseudo_precision_round": precision_round,
            "diagnostic/pseudo_precision_total": precision_total,
            **{f"added_digit{c}": n for c, n in enumerate(counts)},
        }
        entry = {"round": r + 1, "counts": counts, **metrics}
        _log_round(tracker, entry)
        state.update({
            "rounds_done": r + 1, "model_config": study.to_dict(), "state_dict": trained["state_dict"],
            "pool": pool[keep].tolist(), "pseudo_indices": pseudo_idx, "pseudo_labels": pseudo_lab,
            "history": state["history"] + [entry],
        })
        print(f"[pseudolabel] round {r + 1}/{rounds}: threshold {threshold:.4f}, +{len(new_idx)} "
              f"(precision {precision_round:.4f}, diagnostic), pool left {int(keep.sum())}, "
              f"{'labeled acc (in-sample)' if split.val_is_labeled else 'val acc'} {trained['val_acc']:.4f}",
              flush=True)
        after_round(state, metrics)
    return state
