"""`toolkit pseudolabel`: offline pseudo-labeling rounds, one-shot or iterative.

Round r: predict the remaining pool (Ray Data actor pool, or in-process), keep
predictions above the round's threshold (a schedule of r), move them from the pool
into the training set, retrain (warm-started or from the initial weights), select the
best model on the validation split. The round state is written after every round, so
an interrupted run resumes at its last finished round. Pseudo-label precision uses
the pool's hidden true labels: it is logged as a diagnostic and never decides anything.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .. import checkpoints
from ..config import Config
from ..inference import predict_pool
from ..plots import plot_class_counts, plot_curves
from ..pseudo_labels import select_pseudo_labels
from ..schedules import threshold_at
from ..tracking import Tracker, mlflow_run, run_url
from .common import StageResult, finished_result, load_data_and_split, log_config_and_split, run_key, stage_dir
from .supervised import init_params, log_test_report, train_classifier

SECTIONS = ("data", "split", "model", "augment", "classifier", "pseudolabel")
STATE_FILE = "rounds.json"


def round_threshold(cfg: Config, r: int) -> float:
    pc = cfg.pseudolabel
    if pc.mode == "oneshot":
        return pc.threshold_start
    rate = pc.threshold_rate if pc.schedule in ("exponential", "step") else None
    return threshold_at(r, pc.schedule, pc.threshold_start, pc.threshold_floor, pc.rounds, rate, pc.step_every)


def _load_state(folder: Path) -> dict:
    p = folder / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_state(folder: Path, state: dict) -> None:
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / STATE_FILE)  # atomic: a kill mid-write keeps the previous round


def _log_round(tracker: Tracker, entry: dict) -> None:
    """A round's history entry as round-level series under round/ (the classifier logs its own val_acc per step)."""
    tracker.log_metrics({f"round/{k}": v for k, v in entry.items() if k not in ("round", "counts")}, step=entry["round"])


def _adopt_first_round(cfg: Config, source: Path, folder: Path, base_model: str | None, digest: str,
                       tracker: Tracker) -> dict:
    """The first round of a finished one-shot run, as this iterative run's round 1 ({} when it does not match).

    A one-shot run is round 1 of an iterative run with the same config (same start model,
    same threshold for round 1, same training): the pipeline runs both, and retraining the
    same round twice would cost minutes for nothing. The round's model is copied into this
    run's folder and its metrics logged here, so the run stands on its own.
    """
    other = _load_state(source)
    oneshot = cfg.replace(**{"pseudolabel.mode": "oneshot"})
    if (not other or other.get("rounds_done") != 1 or other.get("config_digest") != oneshot.digest(*SECTIONS)
            or not base_model or other.get("start_model") != base_model
            or abs(round_threshold(cfg, 0) - round_threshold(oneshot, 0)) > 1e-12):
        return {}
    model = folder / "round1.pt"
    shutil.copyfile(other["model"], model)
    state = {**other, "config_digest": digest, "model": str(model), "adopted_from": str(source)}
    first = state["history"][0]
    _log_round(tracker, first)
    tracker.set_tags({"toolkit.round1_from": str(source)})
    _save_state(folder, state)
    print(f"[pseudolabel] round 1/{cfg.pseudolabel.rounds}: taken from the one-shot run in {source} "
          f"(same config and start model), val acc {first['val_acc']:.4f}", flush=True)
    return state


def run_rounds(cfg: Config, tracker: Tracker, key: str, folder: Path, base_model: str | None = None,
               on_round=None, first_round_from: Path | None = None) -> dict:
    """The round loop (also the body of a Tune trial). Returns the final state dict.

    ``on_round(round_index, metrics)`` is called after each round (Tune reports there).
    ``first_round_from``: the folder of a finished one-shot run whose round may stand as
    round 1 here (see ``_adopt_first_round``).
    """
    pc = cfg.pseudolabel
    data, split = load_data_and_split(cfg)
    log_config_and_split(tracker, cfg, split, folder)
    train_labels = data.train_labels
    rounds = 1 if pc.mode == "oneshot" else pc.rounds
    init = init_params(cfg, folder)
    state = _load_state(folder)
    resumed = bool(state.get("rounds_done"))
    digest = cfg.digest(*SECTIONS)
    if state and state.get("config_digest", digest) != digest:
        from ..config import ConfigError

        raise ConfigError(f"run.name={cfg.run.name!r}: {folder} holds pseudo-labeling rounds of another config; "
                          "choose another run.name (or delete that folder to start over)")
    if not state and first_round_from is not None:
        state = _adopt_first_round(cfg, first_round_from, folder, base_model, digest, tracker)
    if not state:
        if base_model:
            start_model = base_model
        else:  # round 0: the labeled images alone
            path, _ = train_classifier(cfg, tracker, f"{key}-round0", folder, "round0.pt", init=init, label="round 0")
            start_model = str(path)
        state = {"config_digest": digest, "rounds_done": 0, "model": start_model, "start_model": start_model,
                 "pool": split.pool.tolist(), "pseudo_indices": [], "pseudo_labels": [], "history": []}
        _save_state(folder, state)
    elif resumed:
        print(f"[pseudolabel] resuming after round {state['rounds_done']}", flush=True)

    for r in range(state["rounds_done"], rounds):
        t0 = time.perf_counter()
        threshold = round_threshold(cfg, r)
        pool = torch.tensor(state["pool"], dtype=torch.long)
        probs = torch.from_numpy(predict_pool(cfg, state["model"], pool))
        sel = select_pseudo_labels(probs, threshold, pc.per_class_cap or None, pc.class_adaptive)
        new_idx = pool[sel.positions]
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[sel.positions] = False
        pseudo_idx = state["pseudo_indices"] + new_idx.tolist()
        pseudo_lab = state["pseudo_labels"] + sel.labels.tolist()
        # diagnostics only: the pool's true labels never feed back into selection or training
        precision_round = float((train_labels[new_idx] == sel.labels).float().mean()) if len(new_idx) else float("nan")
        all_idx = torch.tensor(pseudo_idx, dtype=torch.long)
        precision_total = (float((train_labels[all_idx] == torch.tensor(pseudo_lab)).float().mean())
                           if len(pseudo_idx) else float("nan"))
        init_r = {"classifier": state["model"], "encoder_pretrained": bool(init)} if pc.warm_start else init
        model_path, best = train_classifier(
            cfg, tracker, f"{key}-round{r + 1}", folder, f"round{r + 1}.pt", init=init_r,
            pseudo={"indices": pseudo_idx, "labels": pseudo_lab}, steps=pc.steps_per_round,
            step_offset=(r + 1) * 1_000_000, label=f"round {r + 1}/{rounds}",
        )
        counts = sel.counts_per_class(10).tolist()
        metrics = {
            "threshold": threshold,
            "added": len(new_idx),
            "pool_left": int(keep.sum()),
            "train_size": len(split.labeled) + len(pseudo_idx),
            "val_acc": best["best_val_acc"],
            "round_seconds": time.perf_counter() - t0,
            "diagnostic/pseudo_precision_round": precision_round,
            "diagnostic/pseudo_precision_total": precision_total,
            **{f"added_digit{c}": n for c, n in enumerate(counts)},
        }
        entry = {"round": r + 1, "counts": counts, **metrics}
        _log_round(tracker, entry)
        state.update({
            "rounds_done": r + 1, "model": str(model_path), "pool": pool[keep].tolist(),
            "pseudo_indices": pseudo_idx, "pseudo_labels": pseudo_lab,
        })
        state["history"].append(entry)
        _save_state(folder, state)
        print(f"[pseudolabel] round {r + 1}/{rounds}: threshold {threshold:.4f}, +{len(new_idx)} "
              f"(precision {precision_round:.4f}, diagnostic), pool left {int(keep.sum())}, val acc {best['best_val_acc']:.4f}",
              flush=True)
        if on_round:
            on_round(r, metrics)
    return state


def _round_plots(tracker: Tracker, state: dict, folder: Path, title: str) -> None:
    hist = state["history"]
    if not hist:
        return
    x = [h["round"] for h in hist]
    plots = [
        plot_curves(x, {"pool left": [h["pool_left"] for h in hist], "added": [h["added"] for h in hist]},
                    folder / "rounds_pool.png", f"{title}: pool per round", "round", "images"),
        plot_curves(x, {"threshold": [h["threshold"] for h in hist],
                        "val acc": [h["val_acc"] for h in hist],
                        "pseudo-label precision (diagnostic)": [h["diagnostic/pseudo_precision_round"] for h in hist]},
                    folder / "rounds_accuracy.png", f"{title}: per round", "round", "value"),
        plot_class_counts([h["counts"] for h in hist], folder / "rounds_class_counts.png", f"{title}: pseudo-labels per digit"),
    ]
    for p in plots:
        tracker.log_artifact(p, "plots")
    tracker.log_dict({"history": hist}, "rounds.json")


def pseudolabel(cfg: Config, parent_run_id: str | None = None, key: str | None = None,
                base_model: str | None = None, first_round_from: StageResult | None = None) -> StageResult:
    """Run the rounds; log per-round metrics, plots, the final model and its test accuracy (once)."""
    key = key or run_key(cfg, f"pseudolabel-{cfg.pseudolabel.mode}", *SECTIONS)
    if base_model and not cfg.run.name and key.startswith("pseudolabel-"):
        import hashlib

        key += "-from-" + hashlib.sha256(str(base_model).encode()).hexdigest()[:6]
    folder = stage_dir(cfg, key)
    done = finished_result(folder, cfg.digest(*SECTIONS))
    if done:
        print(f"[pseudolabel] {key} already finished: test acc {done.metrics.get('test_acc', float('nan')):.4f}", flush=True)
        return done
    t0 = time.perf_counter()
    with mlflow_run(cfg, "pseudolabel", key, parent_run_id, {"toolkit.mode": cfg.pseudolabel.mode,
                                                             "toolkit.init": cfg.model.init}) as tracker:
        source = Path(first_round_from.model_path).parent if first_round_from and first_round_from.model_path else None
        state = run_rounds(cfg, tracker, key, folder, base_model, first_round_from=source)
        final = folder / checkpoints.MODEL_FILE
        final.write_bytes(Path(state["model"]).read_bytes())
        tracker.log_artifact(final, "model")
        _round_plots(tracker, state, folder, f"pseudo-labeling ({cfg.pseudolabel.mode})")
        data, _ = load_data_and_split(cfg)
        metrics = log_test_report(tracker, cfg, final, data, folder, f"pseudo-labeling ({cfg.pseudolabel.mode})")
        last = state["history"][-1] if state["history"] else {}
        seconds = time.perf_counter() - t0
        metrics.update({
            "val_acc": float(last.get("val_acc", float("nan"))),
            "pseudo_labels": len(state["pseudo_indices"]),
            "pool_left": len(state["pool"]),
            "diagnostic/pseudo_precision_total": float(last.get("diagnostic/pseudo_precision_total", float("nan"))),
            "stage_seconds": seconds,
        })
        tracker.log_metrics({f"final/{k}": v for k, v in metrics.items() if not k.startswith("test_")})
        result = StageResult(f"pseudolabel-{cfg.pseudolabel.mode}", key, tracker.run_id, str(final), metrics, seconds, config_digest=cfg.digest(*SECTIONS))
        result.save(folder)
        print(f"[pseudolabel] done in {seconds:.0f}s: {metrics['pseudo_labels']} pseudo-labels, pool left "
              f"{metrics['pool_left']}, test acc {metrics['test_acc']:.4f}  {run_url(cfg, tracker)}", flush=True)
        return result
