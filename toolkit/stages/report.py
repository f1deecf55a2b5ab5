"""`toolkit report`: the results table under two protocols beside the reference numbers, and the summary plot.

Each figure is the mean ± std over split seeds of a final model's test accuracy (never a
best-seen-during-training value). Two protocols, side by side:

* ``standard``: the 100 training labels and the validation split's labels may decide (the
  linear probe's C, a Tune search's schedule, which finished model is "best").
* ``strict``: only the 100 training labels decide anything. The training chain itself reads
  no validation label (last weights, fixed recipe), so every trained stage counts under both;
  the probe's C is chosen by cross-validation inside the 100 labels; the final model is the
  pre-declared last stage (the student), and a stage whose schedule Tune chose on validation
  accuracy has no strict figure (one Tune chose by folds of the 100 labels, ``tune.objective=label_folds``, has).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

from toolkit.config import ConfigError, DataConfig, Execution, SplitConfig, Study
from toolkit.tracking.plots import plot_error_by_stage
from toolkit.tracking.runs import Tracker
from toolkit.tracking.stores import tracking_uri
from toolkit.stages.skeleton import STAGE_RUN_TAG, StageResult, stage_dir

# (row name, stage, metric under the standard protocol, metric under the strict one (None: not
# allowed there), reference test accuracy with 100 labels or None)
ROWS = [
    ("SimCLR linear probe, 100 labels", "probe", "100-labels/linear/test_acc", "100-labels/linear_cv/test_acc", 0.9855),
    ("SimCLR MLP probe, 100 labels", "probe", "100-labels/mlp/test_acc", "100-labels/mlp/test_acc", 0.9844),
    ("SimCLR kNN probe, 100 labels", "probe", "100-labels/knn/test_acc", "100-labels/knn/test_acc", None),
    ("CNN + augmentation, 100 labels", "supervised", "test_acc", "test_acc", 0.9366),
    ("one-shot pseudo-labeling", "oneshot", "test_acc", "test_acc", 0.9412),
    ("iterative pseudo-labeling", "iterative", "test_acc", "test_acc", 0.9718),
    ("SimCLR-initialised iterative pseudo-labeling", "simclr_iterative", "test_acc", "test_acc", None),
    ("student of the iterative models (whole pool relabeled)", "student", "test_acc", "test_acc", None),
    # the student predicts over augmented views (student.tta_views); its network on one view alone:
    ("student, one view (no test-time augmentation)", "student", "test_acc_plain", "test_acc_plain", None),
]
# reference rows: every training label is used, so they belong to neither few-label protocol
ALL_LABEL_ROWS = [
    ("SimCLR linear probe, all labels", "probe", "all-labels/linear/test_acc"),
    ("SimCLR MLP probe, all labels", "probe", "all-labels/mlp/test_acc"),
    ("SimCLR kNN probe, all labels", "probe", "all-labels/knn/test_acc"),
]
# classifier stages in chain order: the standard protocol's "best" is the one with the highest
# validation accuracy; the strict protocol's final model is the last one the pipeline ran
CHAIN = ("supervised", "oneshot", "iterative", "simclr_iterative", "student")
TUNED = ("simclr_iterative", "student")  # take their schedule from Tune when the pipeline searched


def mean_std_text(values: list[float]) -> str:
    """Accuracies (fractions) as "98.25 ± 0.71%" (one value: no ± part; none: "-")."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}%"
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}%"


# two-sided 97.5% quantiles of Student's t for n - 1 = 1..30 degrees of freedom (scipy.stats.t.ppf);
# beyond 30 the normal quantile is within 2% of t's
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def interval95(values: list[float]) -> tuple[float, float] | None:
    """The 95% confidence interval of the mean over split seeds, mean ± t(0.975, n-1)·std/√n (None below 2)."""
    if len(values) < 2:
        return None
    t = _T975[len(values) - 2] if len(values) - 2 < len(_T975) else 1.960
    mean, half = statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def interval_text(values: list[float]) -> str:
    """The 95% interval of the mean as "[97.40, 99.10]%" ("-" below two seeds)."""
    ci = interval95(values)
    return "-" if ci is None else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]%"


def _tuned_on_validation(stages: dict[str, StageResult]) -> bool:
    """The pipeline's Tune search chose by validation accuracy (not by folds of the labeled images: ``label_folds``)."""
    return "tune" in stages and not stages["tune"].metrics.get("label_folds", 0)


def _strict_value(stages: dict[str, StageResult], stage: str, metric: str | None) -> float | None:
    if metric is None or (stage in TUNED and _tuned_on_validation(stages)):
        return None  # chosen on validation labels: no strict figure
    return stages[stage].metrics.get(metric)


def final_model_figures(stages: dict[str, StageResult]) -> dict[str, tuple[str, float] | None]:
    """{"standard": (stage, test acc) of the best-on-validation model, "strict": (stage, test acc) of the last}."""
    trained = [s for s in CHAIN if s in stages and "test_acc" in stages[s].metrics]
    out: dict[str, tuple[str, float] | None] = {"standard": None, "strict": None}
    with_val = [s for s in trained if math.isfinite(stages[s].metrics.get("val_acc", math.nan))]
    if with_val:
        best = max(with_val, key=lambda s: (stages[s].metrics["val_acc"], CHAIN.index(s)))
        out["standard"] = (best, stages[best].metrics["test_acc"])
    strict = [s for s in trained if _strict_value(stages, s, "test_acc") is not None]
    if strict:
        out["strict"] = (strict[-1], stages[strict[-1]].metrics["test_acc"])
    return out


def _beats(mean: float, ref: float) -> str:
    """"yes" when ``mean`` is above ``ref`` at the table's precision (0.01 points): a float32
    accuracy of 9,366/10,000 lies a hair above the float 0.9366 and must not beat it."""
    return "yes" if round(100 * mean, 2) > round(100 * ref, 2) else "no"


def _row(name: str, stage: str, standard: dict[int, float | None], strict: dict[int, float | None],
         ref: float | None) -> dict:
    std_vals = [v for v in standard.values() if v is not None]
    strict_vals = [v for v in strict.values() if v is not None]
    return {
        "result": name, "stage": stage,
        "standard": mean_std_text(std_vals), "strict": mean_std_text(strict_vals),
        "interval95": interval_text(std_vals), "strict_interval95": interval_text(strict_vals),
        "mean": statistics.fmean(std_vals) if std_vals else float("nan"),
        "std": statistics.stdev(std_vals) if len(std_vals) > 1 else 0.0,
        "strict_mean": statistics.fmean(strict_vals) if strict_vals else float("nan"),
        "strict_std": statistics.stdev(strict_vals) if len(strict_vals) > 1 else 0.0,
        "reference": f"{100 * ref:.2f}%" if ref else "-", "reference_value": ref,
        "beats_reference": "" if ref is None or not std_vals else _beats(statistics.fmean(std_vals), ref),
        "per_seed": "; ".join(f"seed {s}: {100 * v:.2f}%" for s, v in standard.items() if v is not None),
    }


def table_rows(results: dict[int, dict[str, StageResult]], references: bool = True) -> list[dict]:
    """The table's rows; ``references``: beside the published MNIST-100 figures (only MNIST has them)."""
    rows = []
    for name, stage, metric, strict_metric, ref in ROWS:
        ref = ref if references else None
        seeds = [seed for seed, r in results.items() if stage in r]
        standard = {seed: results[seed][stage].metrics.get(metric) for seed in seeds}
        if not any(v is not None for v in standard.values()):
            continue
        strict = {seed: _strict_value(results[seed], stage, strict_metric) for seed in seeds}
        rows.append(_row(name, stage, standard, strict, ref))
    finals = {seed: final_model_figures(r) for seed, r in results.items()}
    if any(f["standard"] or f["strict"] for f in finals.values()):
        row = _row("final model (standard: best on validation; strict: the last stage)", "final",
                   {s: f["standard"][1] if f["standard"] else None for s, f in finals.items()},
                   {s: f["strict"][1] if f["strict"] else None for s, f in finals.items()}, None)
        row["per_seed"] = "; ".join(
            f"seed {s}: {f['standard'][0]} {100 * f['standard'][1]:.2f}%" + (f" / {f['strict'][0]}" if f["strict"] else "")
            for s, f in finals.items() if f["standard"])
        rows.append(row)
    for name, stage, metric in ALL_LABEL_ROWS:
        vals = {seed: r[stage].metrics.get(metric) for seed, r in results.items() if stage in r}
        if any(v is not None for v in vals.values()):
            row = _row(name, stage, vals, {}, None)
            row["strict"] = "(all labels)"
            rows.append(row)
    return rows


def to_markdown(rows: list[dict], seeds: list[int], labeled: int | None = None, val_size: int | None = None) -> str:
    labels = f"{labeled} " if labeled else ""
    val = f"{val_size:,} " if val_size else ""
    lines = [
        f"Test accuracy of the final models (mean ± std over split seeds {seeds}). The test set only reports.",
        f"Standard protocol: the {labels}training labels and the {val}validation labels decided (probe C, Tune's "
        f"schedule, the best final model). Strict protocol: only the {labels}training labels decided anything "
        "(no validation label was read by the training chain; probe C by cross-validation inside them; the final "
        "model is the last stage).",
        "",
        "| result | standard | 95% interval | strict | 95% interval | reference | beats reference "
        "| per seed (standard) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['result']} | {r['standard']} | {r['interval95']} | {r['strict']} "
                     f"| {r['strict_interval95']} | {r['reference']} | {r['beats_reference']} "
                     f"| {r['per_seed']} |")
    return "\n".join(lines) + "\n"


def report_folder(execution: Execution, tracker: Tracker) -> Path:
    """Where the report of ``tracker``'s pipeline run is written: ``<run.output_dir>/stages/report-<run id>``."""
    return stage_dir(execution, f"report-{tracker.run_id or 'local'}")


def summarise(tracker: Tracker, results: dict[int, dict[str, StageResult]], folder: Path, split: SplitConfig,
              val_size: int | None = None, data: DataConfig | None = None) -> str:
    """Write results.md / results.csv / error plot into ``folder``, log them to ``tracker``'s run; return the markdown.

    ``split``: the split the seeds were drawn with; ``val_size``: the validation split's
    actual size (default: ``split.val_size``).
    """
    rows = table_rows(results, references=data is None or data.name == "mnist")
    md = to_markdown(rows, list(results), 10 * split.labels_per_class, val_size or split.val_size)
    (folder / "results.md").write_text(md)
    with (folder / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["result", "stage", "mean", "std", "interval95", "strict_mean", "strict_std",
                                          "strict_interval95", "reference_value", "per_seed"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tracker.log_artifact(folder / "results.md", "report")
    tracker.log_artifact(folder / "results.csv", "report")
    if rows:
        per_seed = {}
        for name, stage, metric, _, _ in ROWS:
            vals = [r[stage].metrics[metric] for r in results.values() if stage in r and metric in r[stage].metrics]
            vals = [v for v in vals if math.isfinite(v)]  # a dataset without a test set has no test figure
            if vals:
                per_seed[name] = vals
        if per_seed:
            png = plot_error_by_stage(per_seed, folder / "error_by_stage.png",
                                      f"test error by stage, {len(results)} split seed(s)",
                                      {r["result"]: r["reference_value"] for r in rows if r["reference_value"]})
            tracker.log_artifact(png, "report")
        summary = {}
        for r in rows:
            slug = re.sub(r"[^a-z0-9]+", "_", r["result"].lower()).strip("_")[:60]
            summary[f"summary/{slug}/standard_mean"] = r["mean"]
            if not math.isnan(r["strict_mean"]):
                summary[f"summary/{slug}/strict_mean"] = r["strict_mean"]
        tracker.log_metrics(summary)
    return md


def real_data_summary(tracker: Tracker, results: dict[int, dict[str, StageResult]], folder: Path) -> str:
    """A real dataset's results: what its own labels say (the probe's nested cross-validation, with its 95%
    interval), the test figure only where a test/ folder exists, and how much of the pool the final model
    labels with high confidence. No hidden label exists, so no figure compares against one."""
    lines = ["Your images: no label beyond yours exists, so accuracy is estimated from your labels alone.", "",
             "| seed | estimated accuracy (linear probe, nested CV) | 95% interval | test accuracy | pool images | "
             "confidence >= 0.9 |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for seed, stages in results.items():
        est = stages["probe"].metrics if "probe" in stages else {}
        final = stages.get("student") or next((stages[s] for s in reversed(CHAIN) if s in stages), None)
        test = final.metrics.get("test_acc", math.nan) if final else math.nan
        table = Path(final.model_path).parent / "pool_labels.csv" if final and final.model_path else None
        n = sure = 0
        if table is not None and table.is_file():
            with table.open() as f:
                confs = [float(r["confidence"]) for r in csv.DictReader(f)]
            n, sure = len(confs), sum(c >= 0.9 for c in confs)
        acc = est.get("estimate/linear_cv_acc", math.nan)
        lo, hi = est.get("estimate/linear_cv_low95", math.nan), est.get("estimate/linear_cv_high95", math.nan)
        lines.append(f"| {seed} | {100 * acc:.2f}% | [{100 * lo:.2f}, {100 * hi:.2f}]% | "
                     f"{'-' if math.isnan(test) else f'{100 * test:.2f}%'} | {n} | "
                     f"{f'{100 * sure / n:.1f}%' if n else '-'} |")
    md = "\n".join(lines) + "\n"
    (folder / "results.md").write_text(md)
    tracker.log_artifact(folder / "results.md", "report")
    return md


def report(study: Study, execution: Execution) -> str:
    """Rebuild the table of a finished (or partly finished) pipeline run from MLflow and log it there."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(execution)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(execution.tracking.experiment)
    if exp is None:
        raise ConfigError(f"tracking.experiment={execution.tracking.experiment!r} does not exist in {uri}")
    if execution.report.run_id:
        parent_id = execution.report.run_id
    else:
        runs = client.search_runs([exp.experiment_id], "tags.`toolkit.command` = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ConfigError(f"no pipeline run in {uri}: run `toolkit pipeline` first or set report.run_id")
        parent_id = runs[0].info.run_id
    results: dict[int, dict[str, StageResult]] = {}
    val_sizes: set[int] = set()
    parent_tags = client.get_run(parent_id).data.tags
    # the parent records every stage's run (also stages skipped because an earlier run finished them)
    recorded = {k[len(STAGE_RUN_TAG) + 1:]: v for k, v in parent_tags.items() if k.startswith(STAGE_RUN_TAG + ".")}
    runs = [client.get_run(run_id) for run_id in recorded.values()] or client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)
    for run in runs:
        stage, seed = run.data.tags.get("toolkit.stage"), run.data.tags.get("toolkit.seed")
        if stage is None or seed is None:
            continue
        results.setdefault(int(seed), {})[stage] = StageResult(stage, run.info.run_name, run.info.run_id, None,
                                                               dict(run.data.metrics))
        if "split.val_size_actual" in run.data.params:
            val_sizes.add(int(run.data.params["split.val_size_actual"]))
    if not results:
        raise ConfigError(f"pipeline run {parent_id} has no finished stage to report yet")
    parent = Tracker(uri, parent_id)
    md = summarise(parent, dict(sorted(results.items())), report_folder(execution, parent), study.split,
                   val_size=max(val_sizes) if val_sizes else None)
    print(md, flush=True)
    return md
