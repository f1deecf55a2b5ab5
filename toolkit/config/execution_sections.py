"""The execution's sections: where and how a run executes (backend, devices, Ray, pool inference,
Tune's trial resources, MLflow, folders) and the inputs of the commands that train nothing
(report, predict). None of these changes a figure, so none enters a stage's key.

A key, its default and its rule are written together so adding a setting touches one place;
checks that need more than one section live in ``checks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.redaction import redact
from toolkit.config.credentials import uri_credentials_problem
from toolkit.config.fields import RUN_ID_PATTERN, RUN_NAME_PATTERN, ConfigError, _check, _opt


@dataclass(frozen=True)
class RunConfig:
    name: str = _opt("", "run name: keys checkpoints and resumption (empty: derived from command and config)")
    output_dir: str = _opt("runs", "folder for checkpoints, Ray storage and the default MLflow store")
    data_root: str = _opt("", "dataset root (holds MNIST/raw); empty: $TOOLKIT_DATA_DIR, else ./data")
    download: bool = _opt(False, "let torchvision download the dataset when its files are missing (needs internet)")
    backend: str = _opt("ray", "'ray' (Ray Train TorchTrainer) or 'local' (same loop in-process, no Ray)")
    classifiers_local: bool = _opt(False, "on one machine (an embedded Ray), train the classifiers (supervised, "
                                          "pseudo-labeling rounds, student) in-process even when run.backend=ray; SimCLR "
                                          "pretraining stays on Ray Train. There a Ray Train run's fixed start-up (~23 s) "
                                          "and DDP over a few cores cost more than they give. On a Ray cluster (ray.address "
                                          "or $RAY_ADDRESS) it changes nothing: classifiers train on Ray Train's workers. "
                                          "Switched mid-stage, that training restarts: each backend keeps its own "
                                          "checkpoints")
    device: str = _opt("auto", "local backend: 'auto', 'cpu' or 'cuda'")
    resident_mb: int = _opt(0, "training images held whole in memory (and on the device) up to this many MB; larger "
                               "ones are read from the image cache a batch at a time (0: half the free memory)")
    threads: int = _opt(0, "torch threads per process (0: torch's default)")
    verbose: bool = _opt(False, "show Ray's own output (worker prefixes, Ray Train/Data/Tune progress) on the console; "
                                "it is always in Ray's log files")

    def validate(self) -> None:
        _check(self.backend in ("ray", "local"), "run.backend", "'ray' or 'local'", self.backend)
        _check(self.device in ("auto", "cpu", "cuda"), "run.device", "'auto', 'cpu' or 'cuda'", self.device)
        _check(self.resident_mb >= 0, "run.resident_mb", "must be >= 0 (0: half the free memory)", self.resident_mb)
        _check(self.threads >= 0, "run.threads", "must be >= 0", self.threads)
        # the name becomes folder names and MLflow filter values: no path separators, '..', quotes or spaces
        _check(not self.name or (bool(RUN_NAME_PATTERN.match(self.name)) and ".." not in self.name), "run.name",
               "up to 100 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..' "
               "(it names folders under run.output_dir)", self.name)
        _check(bool(self.output_dir.strip()), "run.output_dir", "a folder", self.output_dir)


@dataclass(frozen=True)
class RayConfig:
    address: str = _opt("", "Ray cluster address (empty: $RAY_ADDRESS, else an embedded local Ray)")
    num_workers: int = _opt(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = _opt(False, "one GPU per worker / inference actor")
    cpus_per_worker: float = _opt(1.0, "CPUs reserved per training worker")
    num_cpus: int = _opt(0, "logical CPUs of an embedded local Ray (0: max(4, cores))")
    storage_path: str = _opt("", "where Ray Train and Tune keep checkpoints (empty: <run.output_dir>/ray): on a multi-node "
                                 "cluster a mount every node shares, or a cloud URI (s3://bucket/path, gs://...)")
    max_failures: int = _opt(3, "Ray Train / Tune restarts from the last checkpoint after a worker or node is lost")
    resource_wait_s: float = _opt(600.0, "on a cluster: seconds to wait for the autoscaler to add the CPUs/GPUs a job "
                                         "asks for (an embedded Ray cannot grow: it fails at once)")

    def validate(self) -> None:
        _check(self.num_workers >= 1, "ray.num_workers", "must be >= 1", self.num_workers)
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0", self.cpus_per_worker)
        _check(self.num_cpus >= 0, "ray.num_cpus", "must be >= 0", self.num_cpus)
        _check(self.max_failures >= 0, "ray.max_failures", "must be >= 0", self.max_failures)
        _check(self.resource_wait_s >= 0, "ray.resource_wait_s", "must be >= 0", self.resource_wait_s)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = _opt("", "MLflow tracking URI (empty: $MLFLOW_TRACKING_URI, else sqlite under run.output_dir)")
    experiment: str = _opt("toolkit", "MLflow experiment name")
    enabled: bool = _opt(True, "log to MLflow")
    log_models: bool = _opt(True, "log each trained classifier (and the SimCLR encoder) as an MLflow Model with a "
                                  "signature and an input example")
    tsne_points: int = _opt(2000, "test points in the probe run's t-SNE plot (0: no plot)")
    registered_model: str = _opt("toolkit-mnist-classifier", "Model Registry name the pipeline registers its best "
                                                              "model under (alias 'best'); empty: no registration")

    def validate(self) -> None:
        problem = uri_credentials_problem(self.uri)
        if problem:  # never echo the secret itself
            raise ConfigError(f"tracking.uri={redact(self.uri)!r} is not allowed: {problem}")
        _check(bool(self.experiment.strip()), "tracking.experiment", "a non-empty name", self.experiment)
        _check(self.tsne_points >= 0, "tracking.tsne_points", "must be >= 0", self.tsne_points)


@dataclass(frozen=True)
class ReportConfig:
    run_id: str = _opt("", "MLflow run id of the pipeline to report (empty: the newest pipeline run)")

    def validate(self) -> None:
        _check(not self.run_id or bool(RUN_ID_PATTERN.match(self.run_id)), "report.run_id",
               "an MLflow run id (32 hexadecimal digits) or empty", self.run_id)


@dataclass(frozen=True)
class PredictConfig:
    model: str = _opt("", "classifier (required): toolkit model.pt path, MLflow run id, or MLflow model URI "
                          "(runs:/<run id>/model, models:/<name>/<version>, models:/<name>@best)")
    input: str = _opt("", "images (required): an idx3 file (.gz too), a .npy uint8 array (N, H, W), (N, C, H, W) "
                          "or (N, H, W, C), or an image file or folder of them (any size and mode: converted "
                          "to the model's channels and size, as its training data were)")
    output: str = _opt("", "CSV file for image,label,confidence (empty: print the rows)")
    batch_size: int = _opt(1024, "images per forward pass (on a CPU at most engine.CPU_FORWARD_BATCH)")
    trust_pickled_model: bool = _opt(False, "also load MLflow models the toolkit did not log, with MLflow's loader, "
                                            "which runs the model's code: only for a model from a trusted source")

    def validate(self) -> None:
        _check(self.batch_size >= 1, "predict.batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class InferenceConfig:
    backend: str = _opt("ray", "pool inference: 'ray' (Ray Data actor pool) or 'local' (in-process)")
    actors: int = _opt(2, "Ray Data actors (each gets a GPU when ray.use_gpu)")
    batch_size: int = _opt(2048, "images per inference batch (a CPU runs them in forward passes of at most "
                                 "engine.CPU_FORWARD_BATCH)")

    def validate(self) -> None:
        _check(self.backend in ("ray", "local"), "inference.backend", "'ray' or 'local'", self.backend)
        _check(self.actors >= 1, "inference.actors", "must be >= 1", self.actors)
        _check(self.batch_size >= 1, "inference.batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class TrialsConfig:
    max_concurrent: int = _opt(2, "Tune trials running at once")
    cpus: float = _opt(1.0, "CPUs reserved per Tune trial")
    gpus: float = _opt(0.0, "GPUs per Tune trial (fractions share a GPU)")
    max_failures: int = _opt(1, "retries of a crashed Tune trial")

    def validate(self) -> None:
        _check(self.max_concurrent >= 1, "trials.max_concurrent", "must be >= 1", self.max_concurrent)
        _check(self.cpus > 0, "trials.cpus", "must be > 0", self.cpus)
        _check(self.gpus >= 0, "trials.gpus", "must be >= 0", self.gpus)
        _check(self.max_failures >= 0, "trials.max_failures", "must be >= 0", self.max_failures)
