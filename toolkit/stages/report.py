"""`toolkit report`: the results table beside the reference numbers, and the summary plot, for a pipeline run.

Rows are named by protocol; each figure is the mean ± std of the final models' test
accuracy over split seeds (never a best-seen-during-training value).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from ..config import Config, ConfigError
from ..plots import plot_error_by_stage
from ..tracking import Tracker, tracking_uri
from .common import STAGE_RUN_TAG, StageResult, stage_dir

# (row name, stage, metric key, reference test accuracy with 100 labels or None)
ROWS = [
    ("SimCLR linear probe, 100 labels", "probe", "100-labels/linear/test_acc", 0.9855),
    ("SimCLR MLP probe, 100 labels", "probe", "100-labels/mlp/test_acc", 0.9844),
    ("SimCLR kNN probe, 100 labels", "probe", "100-labels/knn/test_acc", None),
    ("SimCLR linear probe, all labels", "probe", "all-labels/linear/test_acc", None),
    ("SimCLR MLP probe, all labels", "probe", "all-labels/mlp/test_acc", None),
    ("SimCLR kNN probe, all labels", "probe", "all-labels/knn/test_acc", None),
    ("CNN + augmentation, 100 labels", "supervised", "test_acc", 0.9366),
    ("one-shot pseudo-labeling", "oneshot", "test_acc", 0.9412),
    ("iterative pseudo-labeling", "iterative", "test_acc", 0.9718),
    ("SimCLR-initialised iterative pseudo-labeling", "simclr_iterative", "test_acc", None),
]


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}%"
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}%"


def table_rows(results: dict[int, dict[str, StageResult]]) -> list[dict]:
    rows = []
    for name, stage, metric, ref in ROWS:
        per_seed = {seed: r[stage].metrics.get(metric) for seed, r in results.items() if stage in r}
        vals = [v for v in per_seed.values() if v is not None]
        if not vals:
            continue
        rows.append({
            "result": name, "stage": stage, "metric": metric,
            "test_acc": _fmt(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "reference": f"{100 * ref:.2f}%" if ref else "-", "reference_value": ref,
            "beats_reference": "" if ref is None else ("yes" if statistics.fmean(vals) > ref else "no"),
            "per_seed": "; ".join(f"seed {s}: {100 * v:.2f}%" for s, v in per_seed.items() if v is not None),
        })
    return rows


def to_markdown(rows: list[dict], seeds: list[int]) -> str:
    lines = [
        f"Test accuracy of the final models (mean ± std over split seeds {seeds}); selection used the validation split only.",
        "",
        "| result | test accuracy | reference | beats reference | per seed |",
        "| --- | ---: | ---: | :---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['result']} | {r['test_acc']} | {r['reference']} | {r['beats_reference']} | {r['per_seed']} |")
    return "\n".join(lines) + "\n"


def summarise(cfg: Config, tracker: Tracker, results: dict[int, dict[str, StageResult]], folder: Path | None = None) -> str:
    """Write results.md / results.csv / accuracy plot, log them to ``tracker``'s run; return the markdown."""
    folder = folder or stage_dir(cfg, f"report-{tracker.run_id or 'local'}")
    rows = table_rows(results)
    md = to_markdown(rows, list(results))
    (folder / "results.md").write_text(md)
    with (folder / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["result", "stage", "metric", "mean", "std", "reference_value", "per_seed"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tracker.log_artifact(folder / "results.md", "report")
    tracker.log_artifact(folder / "results.csv", "report")
    if rows:
        per_seed = {}
        for name, stage, metric, _ in ROWS:
            vals = [r[stage].metrics[metric] for r in results.values() if stage in r and metric in r[stage].metrics]
            if vals:
                per_seed[name] = vals
        png = plot_error_by_stage(per_seed, folder / "error_by_stage.png",
                                  f"test error by stage, {len(results)} split seed(s)",
                                  {r["result"]: r["reference_value"] for r in rows if r["reference_value"]})
        tracker.log_artifact(png, "report")
        tracker.log_metrics({f"summary/{r['stage']}/{r['metric']}/mean": r["mean"] for r in rows})
    return md


def report(cfg: Config) -> str:
    """Rebuild the table of a finished (or partly finished) pipeline run from MLflow and log it there."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        raise ConfigError(f"tracking.experiment={cfg.tracking.experiment!r} does not exist in {uri}")
    if cfg.report.run_id:
        parent_id = cfg.report.run_id
    else:
        runs = client.search_runs([exp.experiment_id], "tags.`toolkit.command` = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ConfigError(f"no pipeline run in {uri}: run `toolkit pipeline` first or set report.run_id")
        parent_id = runs[0].info.run_id
    results: dict[int, dict[str, StageResult]] = {}
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
    if not results:
        raise ConfigError(f"pipeline run {parent_id} has no finished stage to report yet")
    md = summarise(cfg, Tracker(uri, parent_id), dict(sorted(results.items())))
    print(md, flush=True)
    return md
