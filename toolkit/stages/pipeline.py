"""`toolkit pipeline`: the whole study as one parent MLflow run with a nested run per stage.

pretrain -> probe -> supervised -> one-shot -> iterative -> SimCLR-initialised iterative
-> student (the iterative models relabel the whole pool; a student learns it), each stage
unless ``pipeline.stages`` leaves it out, repeated over ``pipeline.seeds`` (split seeds) and
summarised as mean ± std. Each stage's
folder is keyed by the pipeline key, the seed and the stage, so re-running the same
command skips finished stages and resumes an interrupted one where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from toolkit.config import Execution, Study
from toolkit.tracking.runs import Tracker, mlflow_run, run_url
from toolkit.tracking.stores import tracking_uri
from toolkit.stages.skeleton import STAGE_RUN_TAG, StageResult, run_key


def _tag(execution: Execution, parent_id: str | None, result: StageResult, stage: str, seed: int) -> None:
    """Mark a stage's run by stage and seed, and record it on the parent run.

    The parent keeps the run id of every stage, skipped ones included, so `toolkit report`
    on a re-run pipeline (a new parent whose stages were all finished) still has every row.
    """
    if result.run_id and execution.tracking.enabled:
        uri = tracking_uri(execution)
        Tracker(uri, result.run_id).set_tags({"toolkit.stage": stage, "toolkit.seed": seed})
        if parent_id:
            Tracker(uri, parent_id).set_tags({f"{STAGE_RUN_TAG}.{seed}.{stage}": result.run_id})


def run_seed(study: Study, execution: Execution, parent_id: str | None, seed: int,
             simclr_path: str | None) -> dict[str, StageResult]:
    """All stages but pretraining for one split seed (its split and its model seed)."""
    from toolkit.stages.probe import probe
    from toolkit.stages.pseudolabel import pseudolabel
    from toolkit.stages.supervised import supervised

    stages = study.pipeline.stages
    scfg = study.replace(**{"split.seed": seed, "model.seed": seed})
    stage_execution = execution.replace(**{"run.name": ""})  # each stage keyed by its own study sections
    out: dict[str, StageResult] = {}

    def record(stage: str, result: StageResult) -> None:
        out[stage] = result
        _tag(execution, parent_id, result, stage, seed)

    # stage keys come from each stage's own config sections (and inputs), not from the pipeline's:
    # changing, say, the pseudo-labeling schedule re-runs only the stages it affects
    if "probe" in stages and simclr_path:
        record("probe", probe(scfg, stage_execution, parent_id, checkpoint=simclr_path))
    base = None
    if "supervised" in stages:
        record("supervised", supervised(scfg.replace(**{"model.init": "scratch"}), stage_execution, parent_id))
        base = out["supervised"].model_path
    if "oneshot" in stages:
        c = scfg.replace(**{"model.init": "scratch", "pseudolabel.mode": "oneshot"})
        record("oneshot", pseudolabel(c, stage_execution, parent_id, base_model=base))
    if "iterative" in stages:
        c = scfg.replace(**{"model.init": "scratch", "pseudolabel.mode": "iterative"})
        # the one-shot run is this run's round 1 when their configs agree: not trained twice
        record("iterative", pseudolabel(c, stage_execution, parent_id, base_model=base, first_round_from=out.get("oneshot")))
    if "simclr_iterative" in stages and simclr_path:
        c = scfg.replace(**{"model.init": f"simclr:{simclr_path}", "pseudolabel.mode": "iterative"})
        if study.pipeline.tune:
            from toolkit.config import Config, load_config
            from toolkit.stages.tune import best_config_path, tune

            tuned = tune(c, stage_execution, parent_id)
            record("tune", tuned)  # the table then knows whether validation labels chose the schedule
            c = load_config(best_config_path(tuned), base=Config.of(c)).study  # best.yaml holds study keys only
        record("simclr_iterative", pseudolabel(c, stage_execution, parent_id))
    teachers = [out[s].model_path for s in ("iterative", "simclr_iterative") if s in out and out[s].model_path]
    if "student" in stages and teachers:
        from toolkit.stages.student import student

        record("student", student(scfg.replace(**{"model.init": "scratch"}), stage_execution, teachers, parent_id,
                                  encoder=simclr_path))
    return out


def _publish_pool_labels(execution: Execution, parent: Tracker, results: dict[int, dict[str, StageResult]]) -> None:
    """Each seed's student's labeled pool as ``<run.output_dir>/pool_labels-seed<k>.csv``, the first seed's also
    as ``pool_labels.csv``; logged to the pipeline's run too."""
    import shutil

    from toolkit.stages.pool_labels import FILE

    out = Path(execution.run.output_dir)
    for n, (seed, stages) in enumerate(results.items()):
        done = stages.get("student")
        table = Path(done.model_path).parent / FILE if done and done.model_path else None
        if table is None or not table.is_file():
            continue
        names = [f"pool_labels-seed{seed}.csv"] + ([FILE] if n == 0 else [])
        for name in names:
            shutil.copyfile(table, out / name)
        parent.log_artifact(out / names[0])
        print(f"[pipeline] labeled pool (most doubtful first): {out / names[-1]}", flush=True)


def _register_best(study: Study, execution: Execution, parent: Tracker, results: dict[int, dict[str, StageResult]]) -> None:
    """Register the classifier with the best validation accuracy (never test) in the Model Registry."""
    if not (parent.enabled and execution.tracking.log_models and execution.tracking.registered_model):
        return
    from mlflow.tracking import MlflowClient

    from toolkit.tracking.logged_models import register_best

    candidates = [(r.metrics["val_acc"], seed, stage, r) for seed, stages in results.items()
                  for stage, r in stages.items() if r.run_id and "val_acc" in r.metrics and stage != "probe"]
    if study.data.own_images:
        # a real dataset's validation figures are its labeled images' own (in-sample): they cannot choose
        # among models, so the pipeline's final model (the student, else the last stage) is the one
        finals = [c for c in candidates if c[2] == "student"] or candidates[-1:]
        candidates = finals
    if not candidates:
        return
    val, seed, stage, best = max(candidates, key=lambda c: c[0])
    uri = MlflowClient(tracking_uri=parent.uri).get_run(best.run_id).data.tags.get("toolkit.model_uri")
    if not uri:
        return
    version = register_best(parent, uri, execution.tracking.registered_model,
                            tags={"stage": stage, "seed": seed, "val_acc": f"{val:.4f}"},
                            description=f"{stage}, split seed {seed}: best validation accuracy of the pipeline")
    parent.set_tags({"toolkit.registered_model": version})
    print(f"[pipeline] registered {stage} (seed {seed}, val acc {val:.4f}) as {version} "
          f"(alias: models:/{execution.tracking.registered_model}@best); predict with it:\n"
          f"  {predict_command(parent.uri, f'models:/{execution.tracking.registered_model}@best', execution.run.data_root, study.data.name)}",
          flush=True)


def predict_command(uri: str, model_uri: str, data_root: str = "", dataset: str = "mnist") -> str:
    """The ``toolkit predict`` command for ``model_uri`` in store ``uri``, to paste into any shell, anywhere.

    The store is named explicitly (masked of credentials: those come from MLFLOW_TRACKING_* in the
    user's environment): without it, predict looks in ``<run.output_dir>/mlflow.db`` of the
    default output folder, not the profile's (``runs/cpu``) where the pipeline registered the model.
    The images are MNIST's test set, or a folder dataset's unlabeled/ folder (absolute path): the command
    runs as printed, and a user swaps in their own idx3 / .npy / image folder.
    """
    import shlex

    from toolkit.datasets.mnist import resolve_root
    from toolkit.redaction import redact

    images = resolve_root(data_root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    if dataset == "folder":
        images = resolve_root(data_root) / "unlabeled"
    return " ".join(["toolkit", "predict", shlex.quote(f"tracking.uri={redact(uri)}"),
                     shlex.quote(f"predict.model={model_uri}"), shlex.quote(f"predict.input={images}")])


def pipeline(study: Study, execution: Execution) -> dict:
    """Run the study; return {seed: {stage: StageResult}} and log the summary table to the parent run."""
    from toolkit.stages.pretrain import pretrain
    from toolkit.stages.report import real_data_summary, report_folder, summarise

    key = run_key(study, execution, "pipeline")
    t0 = time.perf_counter()
    results: dict[int, dict[str, StageResult]] = {}
    from toolkit.locks import run_lock
    from toolkit.stages.skeleton import stage_dir

    with run_lock(stage_dir(execution, key), f"pipeline '{key}'"), \
            mlflow_run(study, execution, "pipeline", key, None, {"toolkit.seeds": study.pipeline.seeds}) as parent:
        print(f"[pipeline] {key}: seeds {study.pipeline.seeds}, stages {study.pipeline.stages}", flush=True)
        simclr_path = None
        # the student's labels are smoothed in the SimCLR embedding unless student.knn_k=0 or it smooths by pixels
        smooths_in_simclr = study.student.knn_k > 0 and study.student.smooth_space == "simclr"
        users = ("pretrain", "probe", "simclr_iterative") + (("student",) if smooths_in_simclr else ())
        needs_simclr = any(s in study.pipeline.stages for s in users)
        if needs_simclr:
            # one encoder for all seeds: SimCLR never sees a label, and the first seed's
            # validation images are held out of it
            first = study.pipeline.seeds[0]
            pre = pretrain(study.replace(**{"split.seed": first, "model.seed": first}),
                           execution.replace(**{"run.name": ""}), parent.run_id)
            _tag(execution, parent.run_id, pre, "pretrain", first)
            simclr_path = pre.model_path
        for seed in study.pipeline.seeds:
            print(f"[pipeline] seed {seed}", flush=True)
            results[seed] = run_seed(study, execution, parent.run_id, seed, simclr_path)
        seconds = time.perf_counter() - t0
        parent.log_metrics({"pipeline_seconds": seconds})
        if study.data.own_images:
            table = real_data_summary(parent, results, report_folder(execution, parent))
        else:
            # every registered benchmark has ten classes; a real dataset has its own summary above
            table = summarise(parent, results, report_folder(execution, parent), study.split, data=study.data)
        print(table, flush=True)
        _publish_pool_labels(execution, parent, results)
        _register_best(study, execution, parent, results)
        print(f"[pipeline] done in {seconds:.0f}s. Browse: {run_url(parent)}", flush=True)
    return results
