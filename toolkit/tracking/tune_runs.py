"""The record of a Tune search's trials, kept by the driver: their MLflow runs and one row per trial.

Only the driver logs to MLflow: a Tune callback opens each trial's nested run and logs its
config and round metrics as Tune receives them. After the search, ``collect`` reads the
result grid into one ``TrialRow`` per trial (what it tried, how far it got, how it ended),
``write_csv`` writes them as trials.csv, and ``close_trial_runs`` tags each run with how
its trial ended (a trial stopped by ASHA is killed mid-run, so its run would stay RUNNING).
After Ctrl-C, ``kill_trial_runs`` ends the runs of the trials that were still running.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from toolkit.config import ConfigError, Execution, Study
from toolkit.datasets.mnist import Split
from toolkit.config.search_space import SearchSpace, schedule_kind, trial_config, trial_values
from toolkit.tracking.runs import RUN_KEY_TAG, Tracker, find_run, safe_params
from toolkit.tracking.stores import tracking_uri

METRIC = "val_acc"  # what each trial reports after every round, and the search maximises
ROUND_METRICS = ("val_acc", "threshold", "added", "pool_left")
RUN_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}
# what a trial reports about where it ran (read inside the trial, beside its round metrics)
DEVICE, DEVICE_NAME = "device", "device_name"


@dataclass
class TrialRow:
    """One trial as the search ended: what it tried, how far it got, where its model is."""

    trial_id: str
    status: str  # completed | stopped_early | failed
    kind: str
    rounds_done: int
    rounds: int
    val_acc: float
    values: dict[str, Any]  # SearchSpace.columns() as the trial ran them
    sample: dict[str, Any]  # the point the searcher proposed
    error: str = ""
    checkpoint: Any = None  # the trial's last Tune checkpoint (its final round state), in ray.storage_path


def collect(grid, base: Study, space: SearchSpace, simclr: str | None) -> list[TrialRow]:
    """One row per trial of a Tune ``ResultGrid``, sorted by trial id."""
    rows = []
    for res in grid:
        tid = Path(res.path).name
        sample = res.config
        if sample is None:  # failed before its first report: Tune's params.json has the sample
            p = Path(res.path) / "params.json"
            sample = json.loads(p.read_text()) if p.is_file() else {}
        sample = {k: v for k, v in sample.items() if k in space.entries}
        try:
            tuned = trial_config(base, sample, simclr)
            values, kind, rounds = trial_values(space, tuned, sample), schedule_kind(tuned), tuned.pseudolabel.rounds
        except ConfigError:  # the trial failed on it: show what was sampled
            values, kind = dict(sample), str(sample.get("pseudolabel.schedule", base.pseudolabel.schedule))
            rounds = int(sample.get("pseudolabel.rounds", base.pseudolabel.rounds))
        m = res.metrics or {}
        rounds_done = int(m.get("round", 0) or 0)
        val = float(m.get(METRIC, float("nan")))
        checkpoint = None
        if res.error is not None:
            status = "failed"
        elif rounds_done >= rounds:
            status = "completed"
            checkpoint = res.checkpoint
        else:
            status = "stopped_early"
        error = str(res.error).strip().splitlines()[-1][:300] if res.error is not None else ""
        rows.append(TrialRow(tid, status, kind, rounds_done, rounds, val, values, sample, error, checkpoint))
    return sorted(rows, key=lambda r: r.trial_id)


def write_csv(rows: list[TrialRow], keys: list[str], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "kind", "rounds_done", "rounds", "val_acc", *keys, "error"])
        for r in rows:
            w.writerow([r.trial_id, r.status, r.kind, r.rounds_done, r.rounds, r.val_acc,
                        *(r.values.get(k, "") for k in keys), r.error])
    return path


def split_sizes(splits: list[Split]) -> dict[str, int]:
    """The sizes a trial's run logs of the splits every trial runs on (as a stage's run logs them): one split's
    labeled, validation and pool images; or, for folds of the labeled images (``label_folds``), all the labeled
    images, no validation image (the validation split is not read) and the number of folds."""
    first = splits[0]
    if len(splits) == 1:
        return {"split.labeled_size": len(first.labeled), "split.val_size_actual": len(first.val),
                "split.pool_size": len(first.pool), "split.label_folds": 0}
    return {"split.labeled_size": len(first.labeled) + len(first.val), "split.val_size_actual": 0,
            "split.pool_size": len(first.pool), "split.label_folds": len(splits)}


def trial_runs_callback(execution: Execution, key: str, parent_run_id: str | None, config_of: Callable[[dict], Study],
                        sizes: dict[str, int]):
    """A Tune callback, in the driver: one nested MLflow run per trial (``<key>-trial-<id>``), its round metrics.

    ``execution``: how every trial runs (``tune_trial.trial_execution``: its tracking store is the
    driver's), tagged ``execution.<key>`` on each trial's run; ``config_of(point)``: the study a trial
    runs for a sampled point (logged as params with the split's ``sizes``; a ConfigError is tagged, and
    the trial itself fails on it).
    """
    from ray.tune import Callback

    uri = tracking_uri(execution) if execution.tracking.enabled and parent_run_id else None

    class TrialRuns(Callback):
        def __init__(self):
            self.runs: dict[str, str] = {}
            self.placed: set[str] = set()  # trials whose device is logged (once per start: a restart may move it)

        def __getstate__(self):
            return {"runs": {}, "placed": set()}

        def _run(self, trial) -> Tracker:
            if uri is None:
                return Tracker.disabled()
            if trial.trial_id not in self.runs:
                self.runs[trial.trial_id] = self._open(trial)
            return Tracker(uri, self.runs[trial.trial_id])

        def _open(self, trial) -> str:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            name = f"{key}-trial-{trial.trial_id}"
            found = find_run(execution, name, parent_run_id)
            if found is not None:  # a restored search: the trial keeps its run
                if found.info.status == "KILLED":  # Ctrl-C ended it (kill_trial_runs); the trial runs again
                    client.update_run(found.info.run_id, status="RUNNING")
                return found.info.run_id
            exp = client.get_experiment_by_name(execution.tracking.experiment).experiment_id
            point = dict(trial.config or {})
            tags = {RUN_KEY_TAG: name, "toolkit.command": "tune-trial", "mlflow.parentRunId": parent_run_id,
                    "toolkit.tune.trial_id": trial.trial_id,
                    **{f"toolkit.tune.sample.{k}": str(v) for k, v in point.items()},
                    **{f"execution.{k}": v for k, v in safe_params(execution.flat()).items()}}
            run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
            try:
                Tracker(uri, run_id).log_params({**config_of(point).flat(), **sizes})
            except ConfigError as e:  # recorded as failed when the trial itself raises it
                Tracker(uri, run_id).set_tags({"toolkit.tune.config_error": str(e)[:500]})
            return run_id

        def _end(self, trial, status: str) -> None:
            t = self._run(trial)
            if t.enabled:
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri=uri).set_terminated(t.run_id, status)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)
            self.placed.discard(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run = self._run(trial)
            if DEVICE in result and trial.trial_id not in self.placed:
                self.placed.add(trial.trial_id)
                # where this start of the trial runs (the driver's "auto" until the trial says)
                run.set_tags({"execution.run.device": result[DEVICE],
                              "toolkit.device": result.get(DEVICE_NAME, result[DEVICE])})
            run.log_metrics({f"round/{k}": result[k] for k in ROUND_METRICS if k in result},
                            step=int(result.get("round", 0)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED")

    return TrialRuns()


def close_trial_runs(execution: Execution, key: str, parent_run_id: str | None, rows: list[TrialRow]) -> None:
    """Tag each trial's run with how it ended; a trial stopped by ASHA was killed mid-run and left RUNNING."""
    if not execution.tracking.enabled or not parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(execution))
    for r in rows:
        run = find_run(execution, f"{key}-trial-{r.trial_id}", parent_run_id)
        if run is None:
            continue
        client.set_tag(run.info.run_id, "toolkit.tune.status", r.status)
        client.set_tag(run.info.run_id, "toolkit.tune.rounds_done", str(r.rounds_done))
        if r.error:
            client.set_tag(run.info.run_id, "toolkit.tune.error", r.error)
        if run.info.status != RUN_STATUS[r.status]:
            client.set_terminated(run.info.run_id, RUN_STATUS[r.status])


def kill_trial_runs(execution: Execution, parent_run_id: str | None) -> int:
    """Mark KILLED every trial run of this search still RUNNING (after Ctrl-C); return how many.

    Tune stops the running trials without calling its callbacks' end hooks, so their runs would
    stay RUNNING beside a KILLED parent. Found by the parent tag, not by the callback's memory,
    which a restored search does not keep (``__getstate__``). A resumed trial sets its run
    RUNNING again (``_open``).
    """
    if not execution.tracking.enabled or not parent_run_id:
        return 0
    from mlflow.tracking import MlflowClient

    from toolkit.tracking.runs import check_run_id, filter_value

    client = MlflowClient(tracking_uri=tracking_uri(execution))
    exp = client.get_experiment_by_name(execution.tracking.experiment)
    if exp is None:
        return 0
    flt = (f"tags.`mlflow.parentRunId` = {filter_value(check_run_id(parent_run_id, 'parent run id'))} "
           "and attributes.status = 'RUNNING'")
    runs = client.search_runs([exp.experiment_id], filter_string=flt, max_results=10_000)
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(runs)
