"""What every stage shares: run keys, stage folders, the persisted result that lets a re-run skip finished work,
model references and loading, classifier training through a backend, and the test report."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoints
from ..config import Config, ConfigError, stage_digest, to_yaml
from ..data import Mnist, Split, check_mnist, load_mnist, make_split, resolve_root
from ..engine import predict_probs
from ..inference import device_for
from ..jobs import ModelWeights, TrainJob
from ..models import Classifier, SimCLRModel
from ..redaction import redact
from ..storage import resolve_output_dir
from ..tracking import MetricsLogger, Tracker

RESULT_FILE = "result.json"
STAGE_RUN_TAG = "toolkit.stage_run"  # on a pipeline's run: toolkit.stage_run.<seed>.<stage> = the stage's run id


@dataclass
class StageResult:
    """What a finished stage leaves behind (also written as ``result.json`` in its folder)."""

    stage: str
    run_key: str
    run_id: str | None = None
    model_path: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    config_digest: str = ""
    skipped: bool = False

    def save(self, folder: Path) -> None:
        d = asdict(self)
        d.pop("skipped")
        tmp = folder / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, folder / RESULT_FILE)  # atomic: a kill mid-write never leaves a half result


def run_key(cfg: Config, command: str, stage: str | None = None) -> str:
    """``<run.name>-<command>`` when a name is given, else ``<command>-<hash of what decides the stage>``.

    The same command with the same config gets the same key, so re-running it resumes
    (Ray Train storage, local checkpoints, the MLflow run) instead of starting over.
    ``stage`` names the entry of ``config.STAGE_SECTIONS`` (default: the command).
    """
    if cfg.run.name:
        return f"{cfg.run.name}-{command}"
    return f"{command}-{stage_digest(cfg, stage or command)}"


def with_inputs(key: str, inputs: list[str]) -> str:
    """``key`` plus a short hash of the input files a stage starts from (``-from-<hash>``).

    Two runs of the same config from different models (another seed's teacher, another
    encoder) must not share a folder, and the config alone does not name those files.
    """
    return key + "-from-" + hashlib.sha256("\n".join(str(i) for i in inputs).encode()).hexdigest()[:6]


def stage_path(cfg: Config, key: str) -> Path:
    """The folder of stage ``key``, not created."""
    return resolve_output_dir(cfg.run.output_dir) / "stages" / key


def stage_dir(cfg: Config, key: str) -> Path:
    """The folder of stage ``key``, created if missing."""
    d = stage_path(cfg, key)
    d.mkdir(parents=True, exist_ok=True)
    return d


def finished_result(folder: Path, digest: str | None = None) -> StageResult | None:
    """The saved result of a finished stage with this config, or None (then the stage runs, resuming what it can).

    A stage re-run under the same key with another config (say more epochs) is not
    finished: it continues from its checkpoints.
    """
    p = folder / RESULT_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"[warning] {p} is damaged: the stage runs again", flush=True)
        return None
    if d.get("model_path"):
        try:
            checkpoints.load(d["model_path"])  # a truncated model file means the stage is not finished
        except checkpoints.CheckpointError as e:
            print(f"[warning] {e}: the stage runs again", flush=True)
            return None
    if digest is not None and d.get("config_digest") and d["config_digest"] != digest:
        return None
    return StageResult(**d, skipped=True)


def load_data_and_split(cfg: Config) -> tuple[Mnist, Split]:
    data = load_mnist(cfg.data.root, cfg.data.download, cfg.data.train_subset, cfg.data.test_subset)
    split = make_split(data.train_labels, cfg.split.labels_per_class, cfg.split.val_size, cfg.split.seed)
    return data, split


def log_config_and_split(tracker: Tracker, cfg: Config, split: Split, folder: Path) -> None:
    """The resolved config and the split indices as artifacts; the split sizes as params."""
    (folder / "config.yaml").write_text(redact(to_yaml(cfg)))  # shown and logged: credentials masked
    split.save(folder / "split.json")
    tracker.log_artifact(folder / "config.yaml")
    tracker.log_artifact(folder / "split.json")
    tracker.log_params({
        "split.labeled_size": len(split.labeled),
        "split.val_size_actual": len(split.val),
        "split.pool_size": len(split.pool),
    })


def load_classifier_file(path: str | Path, device: torch.device | None = None) -> Classifier:
    payload = checkpoints.load_model_file(path, "classifier")
    model = Classifier(checkpoints.config_of(payload).model)
    model.load_state_dict(payload["state_dict"])
    return model.to(device or device_for()).to(memory_format=torch.channels_last).eval()


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load_encoder(path: str | Path, device: torch.device) -> torch.nn.Module:
    """The frozen encoder of a SimCLR checkpoint, in eval mode on ``device``."""
    payload = checkpoints.load_model_file(path, "simclr")
    model = SimCLRModel(checkpoints.config_of(payload).model)
    model.load_state_dict(payload["state_dict"])
    return model.encoder.to(device).to(memory_format=torch.channels_last).eval()


def resolve_model_ref(cfg: Config, ref: str, dest: Path) -> Path:
    """A checkpoint path, or the MLflow run id of a stage that logged ``model/model.pt`` (fetched into ``dest``)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p.resolve()
    if _RUN_ID.match(ref):
        import mlflow

        from ..preflight import readable_tracking_uri

        # a store that does not exist cannot hold the run: say so, without creating it
        uri = readable_tracking_uri(cfg, f"cannot fetch model/{checkpoints.MODEL_FILE} of MLflow run {ref}")
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=ref, artifact_path=f"model/{checkpoints.MODEL_FILE}", dst_path=str(dest), tracking_uri=uri
            )
        except Exception as e:  # noqa: BLE001 - any MLflow failure means the reference is unusable
            raise ConfigError(f"cannot fetch model/{checkpoints.MODEL_FILE} of MLflow run {ref}: {e}".splitlines()[0]) from None
        return Path(local)
    raise ConfigError(f"model reference {ref!r} is neither an existing checkpoint file nor an MLflow run id")


def init_weights(cfg: Config, folder: Path) -> ModelWeights | None:
    """``model.init`` -> the SimCLR model's weights, read once by the driver (checked against the model now,
    not inside a worker), or None for a start from scratch."""
    if not cfg.model.init.startswith("simclr:"):
        return None
    path = resolve_model_ref(cfg, cfg.model.init[len("simclr:"):], folder)
    return ModelWeights.from_payload(checkpoints.load_model_file(path, "simclr", cfg.model))


def data_root_for_workers(cfg: Config) -> str:
    """The MNIST root as an absolute path, checked here first: one line in the driver, not a traceback per worker."""
    check_mnist(cfg.data.root, cfg.data.download)
    return str(resolve_root(cfg.data.root))


def train_classifier(cfg: Config, tracker: Tracker, run_name: str, folder: Path, out_file: str, split: Split, *,
                     init: ModelWeights | None = None, encoder_pretrained: bool = False,
                     pseudo_indices: torch.Tensor | None = None, pseudo_labels: torch.Tensor | None = None,
                     steps: int = 0, step_offset: int = 0, label: str = "supervised",
                     file_extra: dict[str, Any] | None = None) -> tuple[Path, dict]:
    """Train on the labeled (+ pseudo-labeled) images; save the last weights as a model file.

    ``init``: a classifier to warm-start from, or a SimCLR model whose encoder starts the
    classifier. Returns (model file, {"state_dict", "val_acc", "step", ...}); ``val_acc`` is
    the logged validation accuracy of those weights, which chose nothing. ``file_extra``: more
    entries for the model file (the student's test-time augmentation).
    """
    from ..backends import classifiers_in_process, run_training
    from ..train_loops import final_model_state

    none = torch.zeros(0, dtype=torch.long)
    # in this process on the device the driver uses (run.device; ray.use_gpu asks for Ray's
    # workers, and the CLI checked that a GPU is here)
    fit_cfg = cfg.replace(**{"run.backend": "local", "ray.use_gpu": False}) if classifiers_in_process(cfg) else cfg
    job = TrainJob(
        loop="classifier", config=fit_cfg.to_dict(), data_root=data_root_for_workers(cfg), split=split,
        steps=steps or cfg.classifier.steps, init_kind=init.kind if init else "",
        init_state=init.state_dict if init else None, encoder_pretrained=encoder_pretrained, label=label,
        pseudo_indices=none if pseudo_indices is None else pseudo_indices,
        pseudo_labels=none if pseudo_labels is None else pseudo_labels,
    )
    payload, _ = run_training(fit_cfg, job, run_name, MetricsLogger(tracker, "step", step_offset))
    final = final_model_state(payload)
    path = save_model_file(folder / out_file, "classifier", cfg, final["state_dict"], val_acc=final["val_acc"],
                           step=final["step"], encoder_pretrained=final["encoder_pretrained"], **(file_extra or {}))
    return path, final


def log_test_report(tracker: Tracker, cfg: Config, model: torch.nn.Module, data, folder: Path, title: str,
                    tta: dict[str, Any] | None = None) -> dict[str, float]:
    """Test accuracy of the final model (once), per-digit accuracy and a confusion matrix plot; the model
    itself as an MLflow Model (``tracking.log_models``), whose URI is the run's tag ``toolkit.model_uri``.

    ``model``: the classifier, loaded (``load_classifier_file``). With ``tta`` (an ``engine.tta_recipe``)
    the figures are those of the test-time augmented predictions, and ``test_acc_plain`` is the
    network's own accuracy without it. The test set reports; it never decides anything."""
    from ..plots import plot_confusion_matrix
    from ..probes import confusion_matrix

    model_id = None
    if tracker.enabled and cfg.tracking.log_models:
        from ..mlflow_models import log_classifier

        uri = log_classifier(tracker, tracker.run_id, model, input_example=data.test_images[:4])
        tracker.set_tags({"toolkit.model_uri": uri})
        model_id = uri[len("models:/"):] if uri.startswith("models:/m-") else None
    dev = next(model.parameters()).device
    images = data.test_images.to(dev)
    plain = predict_probs(model, images)  # once: the views' mean starts from it
    probs = predict_probs(model, images, tta, plain=plain) if tta else plain
    metrics, pred = accuracy_metrics(probs, data.test_labels)
    cm = confusion_matrix(pred, data.test_labels, 10)
    png = plot_confusion_matrix(cm, folder / "confusion_test.png", f"{title}: test acc {metrics['test_acc']:.4f}")
    tracker.log_artifact(png, "plots")
    if not tta:
        tracker.log_metrics(metrics, model_id=model_id)  # on the run, and on the logged model's page
        return metrics
    tracker.log_metrics(metrics)
    # the logged MLflow Model is the plain network: its page gets the plain figure alone
    plain_acc = accuracy_metrics(plain, data.test_labels)[0]["test_acc"]
    tracker.log_metrics({"test_acc_plain": plain_acc}, model_id=model_id)
    return {**metrics, "test_acc_plain": plain_acc}


def accuracy_metrics(probs: torch.Tensor, labels: torch.Tensor, prefix: str = "test_") -> tuple[dict[str, float], torch.Tensor]:
    """Accuracy and per-digit accuracy of predicted probabilities (N, 10) against ``labels``, and the
    predicted classes (on the CPU, wherever the two came from)."""
    pred, labels = probs.argmax(1).cpu(), labels.cpu()
    acc = float((pred == labels).float().mean())
    per_class = {f"{prefix}acc_digit{c}": float((pred[labels == c] == c).float().mean())
                 for c in range(10) if (labels == c).any()}
    return {f"{prefix}acc": acc, **per_class}, pred


def save_model_file(path: Path, kind: str, cfg: Config, state_dict: dict, **extra: Any) -> Path:
    return checkpoints.save(path, checkpoints.model_payload(kind, cfg, state_dict, **extra))


@dataclass
class StageRun:
    """What a stage's body works with: its folder, MLflow run, config, data and split."""

    cfg: Config
    key: str
    folder: Path
    tracker: Tracker
    data: Mnist
    split: Split


@dataclass
class StageOutput:
    """What a stage's body returns: its model file (if any), its metrics, and the words of its last line."""

    model_path: Path | None
    metrics: dict[str, float]
    summary: str


def run_stage(cfg: Config, name: str, key: str, digest: str, parent_run_id: str | None, tags: dict[str, Any],
              body, skipped_line=None, command: str | None = None) -> StageResult:
    """The skeleton every stage shares, written once.

    Skip if a finished result with this config exists -> read the data and make the split
    -> hold the run's lock (one writer; it creates the folder) -> open (or resume) its MLflow
    run -> log the config and the split -> run ``body(StageRun)`` -> log the stage time, save
    ``result.json`` atomically, print one closing line. Bad data fail before the folder exists.
    ``name``: the stage's name in results and lines; ``command``: its MLflow command tag (default: name).
    """
    from ..locks import run_lock
    from ..tracking import mlflow_run, run_url

    folder = stage_path(cfg, key)
    done = finished_result(folder, digest)
    if done:
        print(f"[{name}] {key} already finished" + (f": {skipped_line(done)}" if skipped_line else ""), flush=True)
        return done
    t0 = time.perf_counter()
    data, split = load_data_and_split(cfg)  # only reads: a missing or corrupt file leaves no folder, lock or run
    with run_lock(folder, f"run '{key}'"):
        with mlflow_run(cfg, command or name, key, parent_run_id, tags) as tracker:
            log_config_and_split(tracker, cfg, split, folder)
            if tracker.enabled:  # the split as the run's MLflow dataset inputs (training / validation)
                from ..mlflow_models import log_split_dataset

                log_split_dataset(tracker, tracker.run_id, split, source=str(resolve_root(cfg.data.root)))
            out: StageOutput = body(StageRun(cfg, key, folder, tracker, data, split))
            seconds = time.perf_counter() - t0
            metrics = {**out.metrics, "stage_seconds": seconds}
            tracker.log_metrics({"stage_seconds": seconds})
            result = StageResult(name, key, tracker.run_id, str(out.model_path) if out.model_path else None, metrics,
                                 seconds, config_digest=digest)
            result.save(folder)
            print(f"[{name}] done in {seconds:.0f}s: {out.summary}  {run_url(cfg, tracker)}", flush=True)
            return result
