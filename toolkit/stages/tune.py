"""`toolkit tune`: a Ray Tune search over the iterative pseudo-labeler's schedule and its neighbours (the driver).

The space (what may be searched, how a point becomes a trial config, what best.yaml
holds) is ``toolkit.config.search_space``; the trials' MLflow runs and rows are
``toolkit.tracking.tune_runs``; what runs inside each trial's Tune actor is
``stages/tune_trial.py``; this module runs the search. After every round a trial reports
its objective and a Tune checkpoint of its round state; ASHA stops weak trials at round
rungs. The objective (``tune.objective``) is the validation split's accuracy (the standard
protocol) or, reading no label beyond the labeled images (the strict protocol, and the only
one for a user's own dataset), their cross-validated accuracy: each trial runs its rounds
once per fold of the labeled images, all folds round by round together, and the best
trial's config then trains once more on all of them (a ``pseudolabel`` stage of its own).
The test set is touched once, by the final model.

Outputs (stage folder and the parent MLflow run): ``best.yaml`` (``toolkit pseudolabel
--config best.yaml`` trains the best trial's config), ``trials.csv``, ``search.png``, the
final model's ``model.pt`` (the best trial's, or the refit's) and its test report; one
nested MLflow run per trial (and the refit's).

Nothing a trial needs is a path on the driver's disk: the base config and the weights it
starts from travel by value (``tune.with_parameters``); its checkpoints go to
``ray.storage_path`` (shared by every node), where the driver finds the best trial's model
and a trial whose node died resumes at its last finished round. Tune's own state lives in
``<ray.storage_path>/tune/<key>``: re-running the same command resumes the search.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from toolkit.engine import checkpoints
from toolkit.config import ConfigError, Execution, Study, stage_digest
from toolkit.datasets.folds import label_folds
from toolkit.datasets.mnist import Split, make_split
from toolkit.datasets.training_data import ImageData
from toolkit.execution.pool_inference import device_for
from toolkit.engine.jobs import ModelWeights
from toolkit.config.search_space import SearchSpace, base_point, best_overrides, nested, parse_space, read_space, trial_config
from toolkit.execution.storage import check_shared, storage_path
from toolkit.tracking.tune_runs import (METRIC, TrialRow, close_trial_runs, collect, kill_trial_runs, split_sizes,
                                        trial_runs_callback, write_csv)
from toolkit.stages.data_inputs import images_for_workers
from toolkit.stages.model_files import init_weights, load_classifier_file, save_model_file
from toolkit.stages.pseudolabel import pseudolabel
from toolkit.stages.pseudolabel_rounds import STATE_FILE, load_state
from toolkit.stages.skeleton import Stage, StageOutput, StageResult, StageRun, run_stage
from toolkit.stages.evaluation import log_test_report
from toolkit.stages.tune_trial import SIMCLR_REF, TrialJob, _trial, _trial_study, reproduce_args, trial_execution

BEST_FILE = "best.yaml"
RESULTS_FILE = "trials.csv"
PLOT_FILE = "search.png"
SPACE_FILE = "space.yaml"
SEARCH_FILE = "search.json"


# --------------------------------------------------------------------------- the search (in the driver)


def check_search(study: Study, base_model: str | None = None) -> None:
    """ConfigError for a search that would choose by labels it may not read, before anything starts.

    A user's own dataset has no validation images (its "validation" set is the labeled images
    themselves: a search would pick the best overfit). ``label_folds`` cannot take
    ``tune.pool_subset`` (the trials' smaller split draws other labeled images than the study's)
    nor a base model (trained on every labeled image, it has seen each fold's held-out ones).
    """
    if study.data.own_images and study.tune.objective == "validation":
        raise ConfigError(f"tune.objective=validation is not allowed on data.name={study.data.name}: a real dataset "
                          "has no validation images to choose by (its labels are all training labels); use "
                          "tune.objective=label_folds (cross-validation inside the labeled images)")
    if study.tune.objective == "label_folds" and study.tune.pool_subset:
        raise ConfigError("tune.pool_subset is not allowed with tune.objective=label_folds: the trials' smaller split "
                          "would draw other labeled images than the study's; leave it 0")
    if study.tune.objective == "label_folds" and base_model:
        raise ConfigError("a base model is not allowed with tune.objective=label_folds: trained on every labeled "
                          "image, it has seen each fold's held-out images")


def search_digest(study: Study, space_text: str, base_model: str | None = None) -> str:
    """Hash of what decides a search: its study sections (``stage_digest(study, "tune")``), the space and the base model."""
    return hashlib.sha256((stage_digest(study, "tune") + space_text + (base_model or "")).encode()).hexdigest()[:10]


def search_key(study: Study, execution: Execution, space_text: str, base_model: str | None = None) -> str:
    """``<run.name>-tune``, else ``tune-<search_digest>``."""
    return f"{execution.run.name}-tune" if execution.run.name else f"tune-{search_digest(study, space_text, base_model)}"


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("tune.search='optuna' is not allowed: optuna is not installed "
                          "(pip install 'toolkit[optuna]'), or use tune.search=random") from None


def _searcher(study: Study, execution: Execution, start: dict[str, Any] | None = None):
    """Random search (seeded by model.seed) or Optuna TPE, from ``start`` if given; capped at trials.max_concurrent."""
    points = [start] if start else None
    if study.tune.search == "optuna":
        _require_optuna()
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=study.model.seed, points_to_evaluate=points),
                                  max_concurrent=execution.trials.max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=execution.trials.max_concurrent,
                                 random_state=study.model.seed)


def _trial_split(study: Study, data: ImageData, split: Split) -> tuple[int, Split]:
    """The trials' ``data.train_subset`` and split: (0, the study's split), or with ``tune.pool_subset`` the
    split of the first labeled + validation + pool_subset images, leaving that many pool images.

    run_rounds takes its pool from the split, so the pool is made smaller by splitting only the
    first images. The split stays valid (checked here) but is drawn from those images, so trials
    see other labeled and validation images than a full run; all trials see the same ones, so
    they remain comparable, and best.yaml never carries data.train_subset.
    """
    n = study.tune.pool_subset
    if not n:
        return 0, split
    want = data.spec.num_classes * study.split.labels_per_class + study.split.val_size + n
    if want >= len(data.train_labels):
        print(f"[tune] tune.pool_subset={n}: the pool is already at most that large, using it whole", flush=True)
        return 0, split
    try:
        return want, make_split(data.train_labels[:want], study.split.labels_per_class, study.split.val_size,
                                study.split.seed, data.spec.num_classes)
    except ConfigError as e:
        raise ConfigError(f"tune.pool_subset={n} is not allowed: the first {want} training images cannot hold "
                          f"the split ({e})") from None


def tune_storage(execution: Execution) -> str:
    """Where Tune keeps its experiments and trial checkpoints: ``<ray.storage_path>/tune``."""
    return storage_path(execution).rstrip("/") + "/tune"


def _start_ray(execution: Execution) -> None:
    """Ray up; trials that can never be placed fail now (embedded Ray) or after the autoscaler had its time."""
    from toolkit.execution.backends import init_ray, require_resources

    init_ray(execution)
    require_resources(execution, {"CPU": execution.trials.cpus, "GPU": execution.trials.gpus},
                      f"trials.cpus={execution.trials.cpus:g}, trials.gpus={execution.trials.gpus:g}")
    check_shared(execution, storage_path(execution))


def trial_resources(execution: Execution) -> dict[str, float]:
    """What each trial's Tune actor holds: ``trials.cpus`` CPUs and ``trials.gpus`` GPUs.

    A fraction of a GPU lets several trials share one (0.25: four per GPU); the trial then
    trains on it in-process (``tune_trial.placed_device``).
    """
    return {"cpu": execution.trials.cpus, "gpu": execution.trials.gpus}


def trial_trainable(execution: Execution, job: TrialJob):
    """The trial function with its job bound by value and its resources attached (what the Tuner runs)."""
    from ray import tune as ray_tune

    return ray_tune.with_resources(ray_tune.with_parameters(_trial, job=job), trial_resources(execution))


def _fit(run: StageRun, space: SearchSpace, job: TrialJob, digest: str, start: dict[str, Any] | None = None):
    """Run (or restore and finish) the Tune experiment ``run.key``; return (ResultGrid, trials it was started with, path).

    A saved experiment is restored only when it searched the same study (``digest``): under one
    ``run.name`` another study's trials would otherwise be ranked as this one's.
    """
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    study, execution, key, folder, parent_run_id = run.study, run.execution, run.key, run.folder, run.tracker.run_id
    storage = tune_storage(execution)
    path = f"{storage}/{key}"
    trainable = trial_trainable(execution, job)
    started = folder / SEARCH_FILE  # the restored search keeps the settings it started with
    saved = json.loads(started.read_text()) if started.is_file() else {}
    if ray_tune.Tuner.can_restore(path) and saved.get("digest", digest) != digest:
        raise ConfigError(f"run.name={execution.run.name!r}: {path} holds a Tune search of another study; choose "
                          "another run.name (or delete that folder to start over)")
    if ray_tune.Tuner.can_restore(path):
        print(f"[tune] resuming the search in {path}", flush=True)
        tuner = ray_tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        num_samples = saved.get("num_samples", study.tune.num_samples)
    else:
        num_samples = study.tune.num_samples
        started.write_text(json.dumps({"num_samples": num_samples, "max_rounds": space.max_rounds, "digest": digest}))
        scheduler = ASHAScheduler(time_attr="round", max_t=space.max_rounds, grace_period=study.tune.grace_rounds,
                                  reduction_factor=study.tune.reduction_factor)
        # what each trial's MLflow run logs as params: its study (its execution is tagged; run.device from the trial)
        params = lambda point: _trial_study(job, point)  # noqa: E731
        tuner = ray_tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=ray_tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=_searcher(study, execution, start),
                                            num_samples=study.tune.num_samples,
                                            trial_dirname_creator=_trial_dirname),
            run_config=ray_tune.RunConfig(
                name=key, storage_path=storage, verbose=1 if execution.run.verbose else 0,
                failure_config=ray_tune.FailureConfig(max_failures=execution.trials.max_failures),
                checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1),
                callbacks=[trial_runs_callback(job.execution, key, parent_run_id, params, split_sizes(job.splits))],
            ),
        )
    return tuner.fit(), num_samples, path


def _trial_dirname(trial) -> str:
    return trial.trial_id  # the trial's folder under the experiment


def _ended_trials(path: str) -> int:
    """Trials that ended (finished, stopped by ASHA or errored) in the saved state of the experiment at ``path``.

    After Ctrl-C, Tune saves its state (running trials as RUNNING, to resume them) and
    then marks the trials it stops as TERMINATED in memory, so the ResultGrid alone
    cannot tell an interrupted search from a finished one; the saved state can.
    """
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(path).trials)


# --------------------------------------------------------------------------- the results


def _plot(rows: list[TrialRow], columns: list[str], path: Path, title: str) -> Path:
    """Val acc against the start and floor thresholds when searched, else against the first numeric columns."""
    from toolkit.tracking.plots import SearchTrials, plot_search

    pts = [r for r in rows if r.status != "failed" and math.isfinite(r.val_acc)]
    numeric = [c for c in columns if all(isinstance(r.values.get(c), (int, float)) and not isinstance(r.values.get(c), bool)
                                         for r in pts)]
    xs = [c for c in ("pseudolabel.threshold_start", "pseudolabel.threshold_floor") if c in numeric] or numeric[:2]
    panels = {c.split(".")[-1].replace("_", " "): [float(r.values[c]) for r in pts] for c in xs}
    trials = SearchTrials([r.val_acc for r in pts], [r.kind for r in pts], [r.status == "stopped_early" for r in pts])
    return plot_search(panels or {"trial": list(range(len(pts)))}, trials, path, title)


def _refit(run: StageRun, best_cfg: Study) -> StageResult:
    """The best label-folds config trained once more on all the labeled images: a ``pseudolabel`` stage of its
    own (its run nested in the search's, its rounds resumed after a crash), in this process's execution. The
    pipeline's stage after the search trains the same study, so it finds this one finished."""
    print("[tune] the best config trains once more, on all the labeled images", flush=True)
    return pseudolabel(best_cfg, run.execution, run.tracker.run_id)


def objective_name(study: Study) -> str:
    """What a trial's ``val_acc`` measured, in words."""
    return "val acc" if study.tune.objective == "validation" else f"{study.tune.folds}-fold labeled acc"


def _write_best(folder: Path, key: str, best: TrialRow, overrides: dict[str, Any], job: TrialJob) -> Path:
    path = folder / BEST_FILE
    path.write_text(
        f"# best of `toolkit tune` {key}: trial {best.trial_id}, {objective_name(job.base)} {best.val_acc:.4f} "
        f"({best.kind})\n"
        f"# on the full pool:     toolkit pseudolabel --config {path}\n"
        + (f"# this trial, as it ran: toolkit pseudolabel --config {path} "
           f"{reproduce_args(job.execution, job.base.data.train_subset)}\n" if len(job.splits) == 1 else
           f"# (the trial ran it once per fold of the labeled images, {len(job.splits)} folds)\n")
        + yaml.safe_dump(nested(overrides), sort_keys=False)
    )
    return path


def best_config_path(result: StageResult) -> Path:
    """The ``best.yaml`` of a finished search (beside its best model)."""
    if not result.model_path:
        raise ValueError(f"stage result {result.run_key} has no model path")
    return Path(result.model_path).parent / BEST_FILE


# --------------------------------------------------------------------------- the stage


def tune(study: Study, execution: Execution, parent_run_id: str | None = None,
         base_model: str | None = None) -> StageResult:
    """Search the pseudo-labeling schedule by ``tune.objective``; write best.yaml; test the final model once.

    The final model is the best trial's (``validation``), or the best config trained on all the
    labeled images as a ``pseudolabel`` stage of its own (``label_folds``: each trial's models
    saw only a share of them; the pipeline's next stage then finds that stage finished).
    ``base_model``: a classifier file every trial starts its rounds from (no round 0 per
    trial). A SimCLR encoder (``model.init``) is likewise read once and shipped by value.
    """
    if study.pseudolabel.mode != "iterative":
        study = study.replace(**{"pseudolabel.mode": "iterative"})
    if study.tune.search == "optuna":
        _require_optuna()
    check_search(study, base_model)
    text, source = read_space(study)
    # the trials get the SimCLR weights by value: their base config names them SIMCLR_REF
    simclr = SIMCLR_REF if study.model.init.startswith("simclr:") else None
    base = study.replace(**{"model.init": f"simclr:{SIMCLR_REF}"}) if simclr else study
    space = parse_space(text, source, base, simclr, base_model)  # a bad space fails before anything starts
    tags = {"toolkit.tune.search": study.tune.search, "toolkit.tune.space": source, "toolkit.init": study.model.init,
            "toolkit.tune.objective": study.tune.objective}

    digest = search_digest(study, text, base_model)

    def body(run: StageRun) -> StageOutput:
        (run.folder / SPACE_FILE).write_text(text)
        run.tracker.log_artifact(run.folder / SPACE_FILE)
        rows, job = _search(run, base, space, simclr, base_model, digest)
        return _report(run, rows, space, simclr, job)

    stage = Stage("tune", search_key(study, execution, text, base_model), digest,
                  parent_run_id, tags,
                  skipped_line=lambda done: f"best {objective_name(study)} "
                                            f"{done.metrics.get('best_val_acc', float('nan')):.4f}, "
                                            f"best config {best_config_path(done)}")
    return run_stage(study, execution, stage, body)


def _search(run: StageRun, base: Study, space: SearchSpace, simclr: str | None,
            base_model: str | None, digest: str) -> tuple[list[TrialRow], TrialJob]:
    """Run (or resume) the trials in the stage's MLflow run; return their rows and what every trial got."""
    study, execution, key, folder, tracker = run.study, run.execution, run.key, run.folder, run.tracker
    choices: dict[str, ModelWeights] = {}  # explicit 'simclr:<path | run id>' choices: read once, shipped by value
    for v in space.entries.get("model.init", ("choice", []))[1]:
        ref = str(v)[len("simclr:"):] if str(v).startswith("simclr:") else None
        if ref and ref != SIMCLR_REF:
            choices[ref] = init_weights(base.replace(**{"model.init": v}), execution, folder, run.data)
    start = None
    if base_model:
        start = ModelWeights.from_payload(checkpoints.load_model_file(base_model, "classifier", study.model))
    for note in space.notes:
        print(f"[tune] {note}", flush=True)
    pool_subset, split = _trial_split(study, run.data, run.split)
    trial_base = base.replace(**{"data.train_subset": pool_subset}) if pool_subset else base
    # the splits travel by value: a trial reads no label to draw them (and a user's images travel with them)
    splits = (label_folds(split, run.data.train_labels, study.tune.folds) if study.tune.objective == "label_folds"
              else [split])
    job = TrialJob(base=trial_base, execution=trial_execution(execution), key=key,
                   simclr=init_weights(study, execution, folder, run.data), start=start, simclr_choices=choices,
                   splits=splits, images=images_for_workers(run.data))
    _start_ray(execution)
    first = base_point(base, space) if study.tune.include_base else None
    if first:
        print(f"[tune] the first trial runs the base config's values of the searched keys: {first}", flush=True)
        tracker.log_dict({"base_point": first}, "base_point.json")
    elif study.tune.include_base:
        print("[tune] tune.include_base: the base config's values lie outside the space; every trial is sampled",
              flush=True)
    try:
        grid, num_samples, path = _fit(run, space, job, digest, first)
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) inside Tune: its trials' runs end with the parent's
        kill_trial_runs(execution, tracker.run_id)
        raise
    ended = _ended_trials(path)
    if ended < num_samples:
        # Ctrl-C: Tune stopped gracefully and saved its state; the same command restores it. The trials it
        # stopped got no end callback: their runs end KILLED like the parent (a resumed trial reopens its run)
        killed = kill_trial_runs(execution, tracker.run_id)
        print(f"[tune] search interrupted after {ended}/{num_samples} trials ({killed} trial runs marked KILLED); "
              "re-run the same command to resume it", flush=True)
        raise KeyboardInterrupt
    rows = collect(grid, base, space, simclr)
    close_trial_runs(execution, key, tracker.run_id, rows)
    return rows, job


def _report(run: StageRun, rows: list[TrialRow], space: SearchSpace, simclr: str | None, job: TrialJob) -> StageOutput:
    """trials.csv, search.png, best.yaml, and the final model (the best trial's, or the best config's refit) tested once."""
    study, execution, key, folder, tracker = run.study, run.execution, run.key, run.folder, run.tracker
    base = study.replace(**{"model.init": f"simclr:{SIMCLR_REF}"}) if simclr else study
    tracker.log_artifact(write_csv(rows, space.columns(), folder / RESULTS_FILE))
    tracker.log_artifact(_plot(rows, space.columns(), folder / PLOT_FILE, f"{key}: {len(rows)} trials"), "plots")
    for i, r in enumerate(rows):
        if math.isfinite(r.val_acc):
            tracker.log_metrics({"trial_val_acc": r.val_acc}, step=i)
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "stopped_early", "failed")}
    print(f"[tune] {len(rows)} trials: {counts['completed']} completed, {counts['stopped_early']} stopped early "
          f"by ASHA, {counts['failed']} failed", flush=True)
    finished = [r for r in rows if r.status == "completed" and r.checkpoint is not None and math.isfinite(r.val_acc)]
    if not finished:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in rows if r.error)[:1000]
        raise RuntimeError(f"tune {key}: no trial ran all its rounds ({counts}){': ' + errors if errors else ''}")
    # best validation accuracy among trials that ran all their rounds (an early-stopped trial's
    # number belongs to fewer rounds than its config says); ties go to the first trial
    best = max(finished, key=lambda r: (r.val_acc, -rows.index(r)))
    best_cfg = trial_config(base, best.sample, simclr)
    if simclr and best_cfg.model.init == f"simclr:{SIMCLR_REF}":  # the weights came by value: name them as the user did
        best_cfg = best_cfg.replace(**{"model.init": study.model.init})
    overrides = best_overrides(base.replace(**{"model.init": study.model.init}), best_cfg, space.config_keys())
    best_path = _write_best(folder, key, best, overrides, job)
    tracker.log_artifact(best_path)
    tracker.set_tags({"toolkit.tune.best_trial": best.trial_id, "toolkit.tune.best_kind": best.kind})

    final = folder / checkpoints.MODEL_FILE
    if study.tune.objective == "label_folds":  # the trials' models each trained on a share of the labels
        shutil.copyfile(_refit(run, best_cfg).model_path, final)
        tested = f"tune: the best config ({best.kind}) trained on all labeled images"
    else:
        with best.checkpoint.as_directory() as d:  # from ray.storage_path (downloaded if it is a cloud URI)
            best_state = load_state(Path(d) / STATE_FILE)
        save_model_file(final, "classifier", best_cfg, best_state["state_dict"], run.data,
                        encoder_pretrained=bool(best_state["encoder_pretrained"]))
        tested = f"tune: best trial ({best.kind})"
    tracker.log_artifact(final, "model")
    model = load_classifier_file(final, device_for(execution))
    metrics = log_test_report(run, model, tested)
    search = {"best_val_acc": best.val_acc, "label_folds": study.tune.folds if study.tune.objective == "label_folds" else 0,
              "trials": len(rows), "trials_completed": counts["completed"],
              "trials_stopped_early": counts["stopped_early"], "trials_failed": counts["failed"]}
    tracker.log_metrics(search)
    return StageOutput(final, {**metrics, **search},
                       f"best trial {best.trial_id} ({best.kind}) {objective_name(study)} {best.val_acc:.4f}, test acc "
                       f"{metrics['test_acc']:.4f}\n[tune] best config: {best_path}")
