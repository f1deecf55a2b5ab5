"""`toolkit pseudolabel`: offline pseudo-labeling rounds, one-shot or iterative.

The round loop is ``stages/pseudolabel_rounds.py``; this stage runs it in the driver, writes the
round state into its folder after every round (an interrupted run resumes at its last
finished round), and logs the per-round plots, the final model and its test accuracy.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.engine import checkpoints
from toolkit.config import Execution, Study, stage_digest
from toolkit.execution.pool_inference import device_for
from toolkit.engine.jobs import ModelWeights
from toolkit.tracking.plots import plot_class_counts, plot_curves
from toolkit.tracking.runs import Tracker
from toolkit.stages.model_files import check_fits_data, init_weights, load_classifier_file, save_model_file
from toolkit.stages.pseudolabel_rounds import STATE_FILE, RoundsStart, load_state, run_rounds, save_state
from toolkit.stages.skeleton import Stage, StageOutput, StageResult, StageRun, run_key, run_stage, with_inputs
from toolkit.stages.evaluation import log_test_report


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


def pseudolabel(study: Study, execution: Execution, parent_run_id: str | None = None, key: str | None = None,
                base_model: str | None = None, first_round_from: StageResult | None = None) -> StageResult:
    """Run the rounds; log per-round metrics, plots, the final model and its test accuracy (once).

    ``base_model``: a classifier file (the driver's) every round-0 starts from instead of training one.
    ``first_round_from``: a finished one-shot result whose round may stand as round 1 here.
    """
    mode = study.pseudolabel.mode
    key = key or run_key(study, execution, f"pseudolabel-{mode}", "pseudolabel")
    if base_model and not execution.run.name and key.startswith("pseudolabel-"):
        key = with_inputs(key, [base_model])

    def body(run: StageRun) -> StageOutput:
        init = init_weights(study, execution, run.folder, run.data)
        start = None
        if base_model:
            start = check_fits_data(ModelWeights.from_payload(
                checkpoints.load_model_file(base_model, "classifier", study.model)), run.data, base_model)
        state_path = run.folder / STATE_FILE
        source = Path(first_round_from.model_path).parent if first_round_from and first_round_from.model_path else None
        begin = RoundsStart(start=start, start_id=str(base_model or "round0"), init=init, adopt_from=source)
        state = run_rounds(run, load_state(state_path), lambda st, m: save_state(state_path, st), begin)
        final = save_model_file(run.folder / checkpoints.MODEL_FILE, "classifier", study, state["state_dict"], run.data,
                                encoder_pretrained=bool(state["encoder_pretrained"]))
        run.tracker.log_artifact(final, "model")
        _round_plots(run.tracker, state, run.folder, f"pseudo-labeling ({mode})")
        model = load_classifier_file(final, device_for(execution))
        metrics = log_test_report(run, model, f"pseudo-labeling ({mode})")
        last = state["history"][-1] if state["history"] else {}
        metrics.update({
            "val_acc": float(last.get("val_acc", float("nan"))),
            "pseudo_labels": len(state["pseudo_indices"]),
            "pool_left": len(state["pool"]),
            "diagnostic/pseudo_precision_total": float(last.get("diagnostic/pseudo_precision_total", float("nan"))),
        })
        run.tracker.log_metrics({f"final/{k}": v for k, v in metrics.items() if not k.startswith("test_")})
        return StageOutput(final, metrics, f"{metrics['pseudo_labels']} pseudo-labels, pool left {metrics['pool_left']}, "
                                           f"test acc {metrics['test_acc']:.4f}")

    stage = Stage(f"pseudolabel-{mode}", key, stage_digest(study, "pseudolabel"), parent_run_id,
                  {"toolkit.mode": mode, "toolkit.init": study.model.init}, command="pseudolabel",
                  skipped_line=lambda done: f"test acc {done.metrics.get('test_acc', float('nan')):.4f}")
    return run_stage(study, execution, stage, body)
