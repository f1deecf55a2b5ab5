"""`toolkit tune`: a Ray Tune search over the iterative pseudo-labeler's schedule and its neighbours.

Each trial runs the pseudo-labeling rounds (``run_rounds``) inside its own Tune actor,
with the in-process backend and in-process pool inference: a trial holding one CPU
whose nested ``TorchTrainer`` asks for more would starve on a small machine (NOTES).
After every round the trial reports its validation accuracy, and ASHA stops weak
trials at round rungs. Validation accuracy is the only objective; the test set is
touched once, by the final model of the best trial.

Outputs (stage folder and the parent MLflow run): ``best.yaml`` (the tuned keys of the
best trial, a file ``toolkit pseudolabel --config best.yaml`` accepts), ``trials.csv``
(every trial), ``search.png`` (val acc against the thresholds, coloured by schedule),
the best trial's ``model.pt`` and its test report. One nested MLflow run per trial.

Nothing a trial needs is a path on the driver's disk: the base config, the SimCLR
weights and the base model travel through Ray's object store (``tune.with_parameters``);
each finished round is a Tune checkpoint in ``ray.storage_path`` (a shared mount or a
cloud URI on a multi-node cluster), which is how the driver gets the best trial's
model back and how a trial whose node died resumes at its last finished round. Only
the driver logs to MLflow (a Tune callback opens one nested run per trial).

The search is resumable: Tune keeps its state under ``<ray.storage_path>/tune/<key>``
and re-running the same command restores it (finished trials are not run again).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from .. import checkpoints
from ..config import Config, ConfigError, all_keys, config_from_dict, stage_digest
from ..data import Mnist, make_split, resolve_root
from ..jobs import ModelWeights
from ..storage import check_shared, storage_path
from ..tracking import RUN_KEY_TAG, Tracker, find_run, mlflow_run, run_url, safe_params, tracking_uri
from .common import (
    StageResult, finished_result, init_weights, load_data_and_split, log_test_report, resolve_model_ref,
    save_model_file, stage_dir,
)
from .pseudolabel import STATE_FILE, load_state, run_rounds, save_state

TUNABLE_SECTIONS = ("model", "augment", "classifier", "pseudolabel")
# fixed by the search itself: iterative rounds, in-process inference inside each trial
FIXED_KEYS = ("pseudolabel.mode", "pseudolabel.inference", "pseudolabel.inference_actors",
              "pseudolabel.inference_batch_size")
DOMAINS = ("choice", "uniform", "loguniform", "randint")
CLASS_ADAPTIVE = "class-adaptive"  # schedule choice: FlexMatch thresholds on a constant base threshold
SIMCLR = "simclr"                  # model.init choice: the base config's SimCLR checkpoint
METRIC = "val_acc"

BEST_FILE = "best.yaml"
RESULTS_FILE = "trials.csv"
PLOT_FILE = "search.png"
SPACE_FILE = "space.yaml"
SEARCH_FILE = "search.json"
BUILTIN_SPACE = Path(__file__).resolve().parents[1] / "profiles" / "tune_space.yaml"


# --------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: dotted key -> (domain, values), in file order."""

    entries: dict[str, tuple[str, list]]
    max_rounds: int
    source: str
    notes: tuple[str, ...] = ()

    def param_space(self) -> dict[str, Any]:
        """Ray Tune domains, one flat dotted key each (randint's upper end made exclusive, as Tune wants)."""
        from ray import tune as ray_tune

        out = {}
        for key, (domain, values) in self.entries.items():
            if domain == "choice":
                out[key] = ray_tune.choice(list(values))
            elif domain == "uniform":
                out[key] = ray_tune.uniform(*values)
            elif domain == "loguniform":
                out[key] = ray_tune.loguniform(*values)
            else:
                out[key] = ray_tune.randint(values[0], values[1] + 1)
        return out


def read_space(cfg: Config) -> tuple[str, str]:
    """(YAML text, where it came from): ``tune.space``, else the built-in space."""
    if not cfg.tune.space:
        return BUILTIN_SPACE.read_text(), "built-in"
    p = Path(cfg.tune.space).expanduser()
    if not p.is_file():
        raise ConfigError(f"tune.space={cfg.tune.space!r} is not allowed: the file does not exist")
    return p.read_text(), str(p.resolve())


def sample_overrides(base: Config, sample: dict[str, Any], simclr: str | None = None) -> dict[str, Any]:
    """A sampled point -> the dotted overrides of a valid trial config.

    Resolves the two special values (``class-adaptive``, ``simclr``) and repairs the
    combinations the schedules reject: the floor is clipped to the start, and the rate
    to < 1 (exponential) or <= 1 (step).
    """
    ov = dict(sample)
    if ov.get("pseudolabel.schedule") == CLASS_ADAPTIVE:
        ov["pseudolabel.schedule"] = "constant"
        ov["pseudolabel.class_adaptive"] = True
    if ov.get("model.init") == SIMCLR:
        if not simclr:
            raise ConfigError("model.init='simclr' is not allowed: the base config has no SimCLR checkpoint (model.init)")
        ov["model.init"] = f"simclr:{simclr}"
    pc = base.pseudolabel
    start = float(ov.get("pseudolabel.threshold_start", pc.threshold_start))
    floor = float(ov.get("pseudolabel.threshold_floor", pc.threshold_floor))
    if floor > start:
        ov["pseudolabel.threshold_floor"] = start
    schedule = ov.get("pseudolabel.schedule", pc.schedule)
    rate = float(ov.get("pseudolabel.threshold_rate", pc.threshold_rate))
    top = {"exponential": 0.99, "step": 1.0}.get(schedule)
    if top is not None and rate > top:
        ov["pseudolabel.threshold_rate"] = top
    return ov


def trial_config(base: Config, sample: dict[str, Any], simclr: str | None = None) -> Config:
    """The validated config of one trial (before the execution settings of ``_execution_overrides``)."""
    return base.replace(**sample_overrides(base, sample, simclr))


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"tune.space ({source}): unknown config key '{key}'{hint}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_number(x: Any) -> Any:
    """YAML reads ``1e-3`` (no dot) as a string: take it as the number it means."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def parse_space(text: str, source: str, base: Config, simclr: str | None = None,
                base_model: str | None = None) -> SearchSpace:
    """Parse and validate a space file; every value and range end must give a valid trial config.

    ``simclr``: resolved SimCLR checkpoint of the base config (else the ``simclr`` choice is
    dropped). With a shared ``base_model`` the round-0 model is fixed, so ``model.init`` is
    not searched.
    """
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"tune.space ({source}) is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"tune.space ({source}): expected a mapping of dotted keys, got {type(tree).__name__}")
    keys = all_keys()
    entries: dict[str, tuple[str, list]] = {}
    notes: list[str] = []
    for key, spec in tree.items():
        key = str(key)
        if key not in keys:
            raise _unknown_key(key, source)
        if key.split(".")[0] not in TUNABLE_SECTIONS or key in FIXED_KEYS:
            raise ConfigError(f"tune.space ({source}): '{key}' cannot be tuned (only {', '.join(s + '.*' for s in TUNABLE_SECTIONS)},"
                              f" less {', '.join(FIXED_KEYS)})")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise ConfigError(f"tune.space ({source}): '{key}' needs exactly one of "
                              f"{{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {spec!r}")
        domain, values = next(iter(spec.items()))
        where = f"tune.space ({source}): {key}: {domain}"
        default = keys[key].default
        if domain == "choice":
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where} needs a non-empty list")
            values = list(values)
            if key == "model.init" and base_model:
                notes.append("model.init is not searched: the trials share the given base model (its init is fixed)")
                continue
            if key == "model.init" and SIMCLR in values and not simclr:
                values = [v for v in values if v != SIMCLR]
                notes.append("model.init: no SimCLR checkpoint in the base config (model.init), searching without it")
                if not values or values == [base.model.init]:
                    continue
        else:
            values = [_as_number(v) for v in values] if isinstance(values, list) else values
            if not (isinstance(values, list) and len(values) == 2 and all(_number(v) for v in values)):
                raise ConfigError(f"{where} needs [lo, hi], two numbers; got {values!r}")
            lo, hi = values
            if domain == "randint":
                if isinstance(default, bool) or not isinstance(default, int):
                    raise ConfigError(f"{where} is for integer keys; '{key}' takes {type(default).__name__}: use choice")
                if not (float(lo).is_integer() and float(hi).is_integer()) or lo > hi:
                    raise ConfigError(f"{where} needs integers lo <= hi; got {values!r}")
                values = [int(lo), int(hi)]
            else:
                if not isinstance(default, float):
                    raise ConfigError(f"{where} is for float keys; '{key}' takes {type(default).__name__}: "
                                      f"use {'randint' if isinstance(default, int) and not isinstance(default, bool) else 'choice'}")
                if not lo < hi or (domain == "loguniform" and lo <= 0):
                    raise ConfigError(f"{where} needs lo < hi{' and lo > 0' if domain == 'loguniform' else ''}; got {values!r}")
                values = [float(lo), float(hi)]
        for v in values:  # each value (or range end) alone on the base config must make a valid trial
            if v == CLASS_ADAPTIVE and key != "pseudolabel.schedule" or v == SIMCLR and key != "model.init":
                raise ConfigError(f"{where}: {v!r} is only a value of {'pseudolabel.schedule' if v == CLASS_ADAPTIVE else 'model.init'}")
            try:
                trial_config(base, {key: v}, simclr)
            except ConfigError as e:
                extra = f" (or {CLASS_ADAPTIVE})" if key == "pseudolabel.schedule" else ""
                raise ConfigError(f"tune.space ({source}): {e}{extra}") from None
        entries[key] = (domain, values)
    if not entries:
        raise ConfigError(f"tune.space ({source}): nothing to search")
    if "pseudolabel.rounds" in entries:
        domain, values = entries["pseudolabel.rounds"]
        max_rounds = max(int(v) for v in values)
    else:
        max_rounds = base.pseudolabel.rounds
    if base.tune.grace_rounds > max_rounds:
        raise ConfigError(f"tune.grace_rounds={base.tune.grace_rounds} is not allowed: must be <= the most rounds "
                          f"a trial runs ({max_rounds})")
    return SearchSpace(entries, max_rounds, source, tuple(notes))


# what best.yaml carries besides the tuned keys: everything else that decided the trial's
# result (the split, the model, the augmentation, the training), not where it ran
REPRODUCE_SECTIONS = ("split", "model", "augment", "classifier", "pseudolabel")


def best_overrides(base: Config, tuned: Config, keys: Iterable[str]) -> dict[str, Any]:
    """What ``best.yaml`` holds: the tuned config's non-default keys that decide its result.

    The searched keys (always, even at their defaults), any key the repairs changed, and
    every other non-default key of the split, model, augmentation, classifier and
    pseudo-labeling sections of the base config (a CPU profile's narrow model, say): so
    that ``toolkit pseudolabel --config best.yaml`` trains the trial's model and not the
    default one. Never the data root, the pool subset or the infrastructure (run, ray,
    tracking): those belong to the machine, and the command line adds them.
    """
    b, t, d = base.flat(), tuned.flat(), Config().flat()
    chosen = set(keys) | {k for k in t if t[k] != b[k]}
    if "pseudolabel.schedule" in chosen:
        chosen.add("pseudolabel.class_adaptive")  # a kind is (schedule, class_adaptive): write both
    chosen |= {k for k in t if k.split(".")[0] in REPRODUCE_SECTIONS and k not in FIXED_KEYS and t[k] != d[k]}
    chosen.add("pseudolabel.mode")  # always iterative, whatever the default
    if t["run.seed"] != d["run.seed"]:
        chosen.add("run.seed")  # the training seed decides the result too
    return {k: t[k] for k in all_keys() if k in chosen}


def _nested(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for k, v in overrides.items():
        section, name = k.split(".", 1)
        out.setdefault(section, {})[name] = v
    return out


# --------------------------------------------------------------------------- one trial


def _execution_overrides(cfg: Config, train_subset: int) -> dict[str, Any]:
    """How every trial runs: in-process rounds and inference in its Tune actor, no MLflow of its own."""
    ov: dict[str, Any] = {
        "data.root": str(resolve_root(cfg.data.root)),  # each node's own copy, at the same path
        "run.backend": "local",
        "pseudolabel.inference": "local",
        "ray.use_gpu": False,  # the trial's own GPU (if any) is used through run.device=cuda
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


@dataclass(frozen=True)
class TrialJob:
    """What every trial gets through Ray's object store: values, never a path on the driver's disk."""

    base: dict                         # the base config (Config.to_dict())
    execution: dict[str, Any]          # _execution_overrides
    key: str
    simclr: ModelWeights | None        # the SimCLR weights of model.init=simclr (the searched 'simclr' choice)
    start: ModelWeights | None         # a base classifier every trial starts its rounds from (no round 0)
    simclr_choices: dict[str, ModelWeights]  # explicit 'simclr:<ref>' choices of model.init


def _trial_cfg(job: TrialJob, sample: dict, device: str) -> Config:
    base = config_from_dict(job.base)
    return trial_config(base, sample, SIMCLR_REF if job.simclr else None).replace(**job.execution, **{"run.device": device})


SIMCLR_REF = "weights"  # model.init=simclr:weights: the trial's SimCLR weights came by value


def _trial(sample: dict, job: TrialJob) -> None:
    """A Tune trial: the rounds in this process; after each, ``{"val_acc", "round", ...}`` and a checkpoint."""
    import tempfile

    import ray
    from ray import tune as ray_tune

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    cfg = _trial_cfg(job, sample, device)
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
            last = st["history"][-1]
            ray_tune.report(_round_result(last), checkpoint=ray_tune.Checkpoint.from_directory(d))
        reported.append(st["rounds_done"])

    # scratch: this process's own training checkpoints, on this node, removed at the end
    with tempfile.TemporaryDirectory(prefix="toolkit-trial-") as scratch:
        cfg = cfg.replace(**{"run.output_dir": scratch})
        final = run_rounds(cfg, Tracker.disabled(), f"{job.key}-trial-{trial_id}", Path(scratch), state, after_round,
                           start=job.start, start_id="base" if job.start else "round0", init=init)
    if not reported and final["history"]:
        # restored after its last round had finished: Tune still needs the final result
        ray_tune.report(_round_result(final["history"][-1]))


def _round_result(entry: dict) -> dict[str, Any]:
    return {METRIC: float(entry["val_acc"]), "round": int(entry["round"]), "threshold": float(entry["threshold"]),
            "added": int(entry["added"]), "pool_left": int(entry["pool_left"])}


def _trial_callback(cfg: Config, key: str, parent_run_id: str | None, job: TrialJob):
    """A Tune callback, in the driver: one nested MLflow run per trial, its round metrics, how it ended."""
    from ray.tune import Callback

    uri = tracking_uri(cfg) if cfg.tracking.enabled and parent_run_id else None
    experiment = cfg.tracking.experiment

    class TrialRuns(Callback):
        def __init__(self):
            self.runs: dict[str, str] = {}

        def __getstate__(self):
            return {"runs": {}}

        def _run(self, trial) -> Tracker:
            if uri is None:
                return Tracker.disabled()
            if trial.trial_id not in self.runs:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=uri)
                name = f"{key}-trial-{trial.trial_id}"
                exp = client.get_experiment_by_name(experiment).experiment_id
                found = client.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{name}'", max_results=1)
                if found:
                    self.runs[trial.trial_id] = found[0].info.run_id
                else:
                    sample = dict(trial.config or {})
                    tags = {RUN_KEY_TAG: name, "toolkit.command": "tune-trial", "mlflow.parentRunId": parent_run_id,
                            "toolkit.tune.trial_id": trial.trial_id,
                            **{f"toolkit.tune.sample.{k}": str(v) for k, v in sample.items()}}
                    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
                    self.runs[trial.trial_id] = run_id
                    try:
                        tcfg = _trial_cfg(job, sample, "cpu")
                        Tracker(uri, run_id).log_params(tcfg.flat())
                    except ConfigError as e:  # recorded as failed when the trial itself raises it
                        Tracker(uri, run_id).set_tags({"toolkit.tune.config_error": str(e)[:500]})
            return Tracker(uri, self.runs[trial.trial_id])

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._run(trial).log_metrics({f"round/{k}": result[k] for k in ("val_acc", "threshold", "added", "pool_left")
                                          if k in result}, step=int(result.get("round", 0)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            t = self._run(trial)
            if t.enabled:
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri=uri).set_terminated(t.run_id, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            t = self._run(trial)
            if t.enabled:
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri=uri).set_terminated(t.run_id, "FAILED")

    return TrialRuns()


def _trial_dirname(trial) -> str:
    return trial.trial_id  # the trial's folder under the experiment, and under <stage>/trials


# --------------------------------------------------------------------------- the search


def search_digest(cfg: Config, space_text: str, base_model: str | None = None) -> str:
    """Hash of what decides a search: its config sections, the space and the base model."""
    return hashlib.sha256((stage_digest(cfg, "tune") + space_text + (base_model or "")).encode()).hexdigest()[:10]


def search_key(cfg: Config, space_text: str, base_model: str | None = None) -> str:
    """``<run.name>-tune``, else ``tune-<search_digest>``."""
    return f"{cfg.run.name}-tune" if cfg.run.name else f"tune-{search_digest(cfg, space_text, base_model)}"


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("tune.search='optuna' is not allowed: optuna is not installed "
                          "(pip install 'toolkit[optuna]'), or use tune.search=random") from None


def base_point(base: Config, space: SearchSpace) -> dict[str, Any] | None:
    """The base config's own values of the searched keys, as a point of the space (None if one lies outside it).

    Evaluated as the first trial (``tune.include_base``): the search then starts from the
    hand-picked schedule, and its best trial is never worse than it on validation.
    """
    flat = base.flat()
    point: dict[str, Any] = {}
    for key, (domain, values) in space.entries.items():
        v = flat[key]
        if key == "pseudolabel.schedule" and base.pseudolabel.class_adaptive:
            if v != "constant":
                return None  # class-adaptive thresholds on another schedule: not a point of the space
            v = CLASS_ADAPTIVE
        if key == "model.init" and v != "scratch" and SIMCLR in values:
            v = SIMCLR
        if domain == "choice":
            if v not in values:
                return None
        elif not values[0] <= v <= values[1]:
            return None
        point[key] = v
    return point


def _searcher(cfg: Config, start: dict[str, Any] | None = None):
    """Random search (seeded by run.seed) or Optuna TPE, from ``start`` if given; capped at tune.max_concurrent."""
    points = [start] if start else None
    if cfg.tune.search == "optuna":
        _require_optuna()
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed, points_to_evaluate=points),
                                  max_concurrent=cfg.tune.max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=cfg.tune.max_concurrent,
                                 random_state=cfg.run.seed)


def _pool_train_subset(cfg: Config, data: Mnist) -> int:
    """``data.train_subset`` that leaves ``tune.pool_subset`` pool images per trial (0: leave it).

    run_rounds takes its pool from the split, so the pool is made smaller by splitting
    only the first images: labeled + validation + pool_subset. The split stays valid
    (checked here) but is drawn from those images, so trials see other labeled and
    validation images than a full run; all trials see the same ones, so they remain
    comparable, and best.yaml never carries data.train_subset.
    """
    n = cfg.tune.pool_subset
    if not n:
        return 0
    want = 10 * cfg.split.labels_per_class + cfg.split.val_size + n
    total = len(data.train_labels)
    if want >= total:
        print(f"[tune] tune.pool_subset={n}: the pool is already at most that large, using it whole", flush=True)
        return 0
    try:
        make_split(data.train_labels[:want], cfg.split.labels_per_class, cfg.split.val_size, cfg.split.seed)
    except ConfigError as e:
        raise ConfigError(f"tune.pool_subset={n} is not allowed: the first {want} training images cannot hold "
                          f"the split ({e})") from None
    return want


def _check_cluster(cfg: Config) -> None:
    """Trials that can never be placed fail now (embedded Ray), or after the autoscaler had its time (a cluster)."""
    from ..backends import require_resources

    require_resources(cfg, {"CPU": cfg.tune.cpus_per_trial, "GPU": cfg.tune.gpus_per_trial},
                      f"tune.cpus_per_trial={cfg.tune.cpus_per_trial:g}, tune.gpus_per_trial={cfg.tune.gpus_per_trial:g}")


def tune_storage(cfg: Config) -> str:
    """Where Tune keeps its experiments and trial checkpoints: ``<ray.storage_path>/tune``."""
    return storage_path(cfg).rstrip("/") + "/tune"


def _fit(cfg: Config, key: str, space: SearchSpace, job: TrialJob, folder: Path, parent_run_id: str | None,
         start: dict[str, Any] | None = None):
    """Run (or restore and finish) the Tune experiment ``key``; return (ResultGrid, trials it was started with)."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    storage = tune_storage(cfg)
    path = f"{storage}/{key}"
    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    trainable = ray_tune.with_resources(ray_tune.with_parameters(_trial, job=job), resources)
    started = folder / SEARCH_FILE  # the restored search keeps the settings it started with
    if ray_tune.Tuner.can_restore(path):
        print(f"[tune] resuming the search in {path}", flush=True)
        tuner = ray_tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        num_samples = json.loads(started.read_text())["num_samples"] if started.is_file() else cfg.tune.num_samples
    else:
        num_samples = cfg.tune.num_samples
        started.write_text(json.dumps({"num_samples": num_samples, "max_rounds": space.max_rounds}))
        scheduler = ASHAScheduler(time_attr="round", max_t=space.max_rounds, grace_period=cfg.tune.grace_rounds,
                                  reduction_factor=cfg.tune.reduction_factor)
        tuner = ray_tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=ray_tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=_searcher(cfg, start),
                                            num_samples=cfg.tune.num_samples, trial_dirname_creator=_trial_dirname),
            run_config=ray_tune.RunConfig(
                name=key, storage_path=storage, verbose=1,
                failure_config=ray_tune.FailureConfig(max_failures=cfg.tune.max_failures),
                checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_trial_callback(cfg, key, parent_run_id, job)],
            ),
        )
    return tuner.fit(), num_samples, path


def _ended_trials(path: str) -> int:
    """Trials that ended (finished, stopped by ASHA or errored) in the saved state of the experiment at ``path``.

    After Ctrl-C, Tune saves its state (running trials as RUNNING, to resume them) and
    then marks the trials it stops as TERMINATED in memory, so the ResultGrid alone
    cannot tell an interrupted search from a finished one; the saved state can.
    """
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(path).trials)


@dataclass
class TrialRow:
    """One trial as the search ended: what it tried, how far it got, where its model is."""

    trial_id: str
    status: str  # completed | stopped_early | failed
    kind: str
    rounds_done: int
    rounds: int
    val_acc: float
    values: dict[str, Any]  # the searched keys as the trial ran them (after the repairs)
    sample: dict[str, Any]  # what the searcher proposed
    error: str = ""
    checkpoint: Any = None  # the trial's last Tune checkpoint (its final round state), in ray.storage_path


def _kind(cfg: Config) -> str:
    pc = cfg.pseudolabel
    if pc.class_adaptive:
        return CLASS_ADAPTIVE if pc.schedule == "constant" else f"{pc.schedule}+{CLASS_ADAPTIVE}"
    return pc.schedule


def _collect(grid, base: Config, space: SearchSpace, simclr: str | None) -> list[TrialRow]:
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
            flat = tuned.flat()
            values, kind, rounds = {k: flat[k] for k in space.entries}, _kind(tuned), tuned.pseudolabel.rounds
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


def _write_csv(rows: list[TrialRow], keys: list[str], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "kind", "rounds_done", "rounds", "val_acc", *keys, "error"])
        for r in rows:
            w.writerow([r.trial_id, r.status, r.kind, r.rounds_done, r.rounds, r.val_acc,
                        *(r.values.get(k, "") for k in keys), r.error])
    return path


def plot_search(rows: list[TrialRow], path: Path, title: str, dpi: int = 120) -> Path:
    """Validation accuracy (last reported) against threshold_start and threshold_floor, coloured by kind.

    Filled markers: trials that ran all their rounds; hollow: stopped early by ASHA.
    """
    from matplotlib import colormaps

    from ..plots import _new_figure, _save

    pts = [r for r in rows if r.status != "failed" and math.isfinite(r.val_acc)]
    kinds = sorted({r.kind for r in pts})
    colors = {k: colormaps["tab10"](i % 10) for i, k in enumerate(kinds)}
    fig = _new_figure((10.0, 4.0))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in zip(axes, ("threshold_start", "threshold_floor"), ("threshold start", "threshold floor")):
        for kind in kinds:
            for stopped in (False, True):
                sel = [r for r in pts if r.kind == kind and (r.status == "stopped_early") == stopped]
                if not sel:
                    continue
                ax.scatter([r.values.get(f"pseudolabel.{key}", float("nan")) for r in sel], [r.val_acc for r in sel],
                           s=36, facecolors="none" if stopped else colors[kind], edgecolors=colors[kind],
                           label=f"{kind}{' (stopped early)' if stopped else ''}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (last reported round)")
    if pts:
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    return _save(fig, path, dpi)


def _close_child_runs(cfg: Config, key: str, parent_run_id: str | None, rows: list[TrialRow]) -> None:
    """Tag each trial's run with how it ended; a trial stopped by ASHA was killed mid-run and left RUNNING."""
    if not cfg.tracking.enabled or not parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    status = {"completed": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}
    for r in rows:
        run = find_run(cfg, f"{key}-trial-{r.trial_id}", parent_run_id)
        if run is None:
            continue
        client.set_tag(run.info.run_id, "toolkit.tune.status", r.status)
        client.set_tag(run.info.run_id, "toolkit.tune.rounds_done", str(r.rounds_done))
        if r.error:
            client.set_tag(run.info.run_id, "toolkit.tune.error", r.error)
        if run.info.status != status[r.status]:
            client.set_terminated(run.info.run_id, status[r.status])


def tune(cfg: Config, parent_run_id: str | None = None, key: str | None = None,
         base_model: str | None = None) -> StageResult:
    """Search the pseudo-labeling schedule on validation accuracy; write best.yaml; test the best trial's model once.

    ``base_model``: a classifier file every trial starts its rounds from (no round 0 per
    trial). A SimCLR encoder (``model.init``) is likewise resolved once and shared by path.
    """
    if cfg.pseudolabel.mode != "iterative":
        cfg = cfg.replace(**{"pseudolabel.mode": "iterative"})
    if cfg.tune.search == "optuna":
        _require_optuna()
    text, source = read_space(cfg)
    key = key or search_key(cfg, text, base_model)
    digest = search_digest(cfg, text, base_model)
    folder = stage_dir(cfg, key)
    done = finished_result(folder, digest)
    if done:
        print(f"[tune] {key} already finished: best val acc {done.metrics.get('best_val_acc', float('nan')):.4f}, "
              f"best config {best_config_path(done)}", flush=True)
        return done
    t0 = time.perf_counter()

    # resolved once in the driver; the trials get the weights by value through Ray's object store
    base, simclr = cfg, None
    simclr_weights = init_weights(cfg, folder)
    if simclr_weights is not None:
        simclr = SIMCLR_REF
        base = cfg.replace(**{"model.init": f"simclr:{SIMCLR_REF}"})
    start = None
    if base_model:
        start = ModelWeights.from_payload(checkpoints.load_model_file(base_model, "classifier", cfg.model))
    space = parse_space(text, source, base, simclr, base_model)
    choices: dict[str, ModelWeights] = {}
    if "model.init" in space.entries:  # explicit 'simclr:<path | run id>' choices: read once, shipped by value
        for v in space.entries["model.init"][1]:
            ref = str(v)[len("simclr:"):] if str(v).startswith("simclr:") else None
            if ref and ref != SIMCLR_REF:
                choices[ref] = init_weights(base.replace(**{"model.init": v}), folder)
    for note in space.notes:
        print(f"[tune] {note}", flush=True)
    data, _ = load_data_and_split(cfg)
    train_subset = _pool_train_subset(cfg, data)

    from ..backends import init_ray

    init_ray(cfg)
    _check_cluster(cfg)
    check_shared(cfg, storage_path(cfg))
    tags = {"toolkit.tune.search": cfg.tune.search, "toolkit.tune.space": source, "toolkit.init": cfg.model.init}
    with mlflow_run(cfg, "tune", key, parent_run_id, tags) as tracker:
        (folder / SPACE_FILE).write_text(text)
        tracker.log_artifact(folder / SPACE_FILE)
        execution = _execution_overrides(cfg, train_subset)
        job = TrialJob(base=base.to_dict(), execution=execution, key=key, simclr=simclr_weights, start=start,
                       simclr_choices=choices)
        first = base_point(base, space) if cfg.tune.include_base else None
        if first:
            print(f"[tune] the first trial runs the base config's values of the searched keys: {first}", flush=True)
            tracker.log_dict({"base_point": first}, "base_point.json")
        elif cfg.tune.include_base:
            print("[tune] tune.include_base: the base config's values lie outside the space; "
                  "every trial is sampled", flush=True)
        grid, num_samples, path = _fit(cfg, key, space, job, folder, tracker.run_id, first)
        ended = _ended_trials(path)
        if ended < num_samples:
            # Ctrl-C: Tune stopped gracefully and saved its state; the same command restores it
            print(f"[tune] search interrupted after {ended}/{num_samples} trials; re-run the same command "
                  f"to resume it", flush=True)
            raise KeyboardInterrupt

        rows = _collect(grid, base, space, simclr)
        _close_child_runs(cfg, key, tracker.run_id, rows)
        keys = list(space.entries)
        tracker.log_artifact(_write_csv(rows, keys, folder / RESULTS_FILE))
        tracker.log_artifact(plot_search(rows, folder / PLOT_FILE, f"{key}: {len(rows)} trials"), "plots")
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
        if best_cfg.model.init == f"simclr:{SIMCLR_REF}":  # the weights came by value: name them as the user did
            best_cfg = best_cfg.replace(**{"model.init": cfg.model.init})
        overrides = best_overrides(base.replace(**{"model.init": cfg.model.init}), best_cfg, keys)
        best_path = folder / BEST_FILE
        best_path.write_text(
            f"# best of `toolkit tune` {key}: trial {best.trial_id}, val acc {best.val_acc:.4f} ({best.kind})\n"
            f"# on the full pool:     toolkit pseudolabel --config {best_path}\n"
            f"# this trial, as it ran: toolkit pseudolabel --config {best_path} {reproduce_args(execution)}\n"
            + yaml.safe_dump(_nested(overrides), sort_keys=False)
        )
        tracker.log_artifact(best_path)
        tracker.set_tags({"toolkit.tune.best_trial": best.trial_id, "toolkit.tune.best_kind": best.kind})

        with best.checkpoint.as_directory() as d:  # from ray.storage_path (downloaded if it is a cloud URI)
            best_state = load_state(Path(d) / STATE_FILE)
        final = save_model_file(folder / checkpoints.MODEL_FILE, "classifier", best_cfg, best_state["state_dict"],
                                encoder_pretrained=bool(best_state["encoder_pretrained"]))
        tracker.log_artifact(final, "model")
        metrics = log_test_report(tracker, best_cfg, final, data, folder, f"tune: best trial ({best.kind})")
        seconds = time.perf_counter() - t0
        metrics.update({
            "best_val_acc": best.val_acc,
            "trials": len(rows),
            "trials_completed": counts["completed"],
            "trials_stopped_early": counts["stopped_early"],
            "trials_failed": counts["failed"],
            "stage_seconds": seconds,
        })
        tracker.log_metrics({k: v for k, v in metrics.items() if not k.startswith("test_")})
        result = StageResult("tune", key, tracker.run_id, str(final), metrics, seconds, config_digest=digest)
        result.save(folder)
        print(f"[tune] done in {seconds:.0f}s: best trial {best.trial_id} ({best.kind}) val acc {best.val_acc:.4f}, "
              f"test acc {metrics['test_acc']:.4f}\n[tune] best config: {best_path}  {run_url(cfg, tracker)}", flush=True)
        return result


def best_config_path(result: StageResult) -> Path:
    """The ``best.yaml`` of a finished search (beside its best model)."""
    if not result.model_path:
        raise ValueError(f"stage result {result.run_key} has no model path")
    return Path(result.model_path).parent / BEST_FILE
