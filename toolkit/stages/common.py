"""What every stage shares: run keys, stage folders, the persisted result that lets a re-run skip finished work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoints
from ..config import Config, to_yaml
from ..data import Mnist, Split, load_mnist, make_split
from ..engine import evaluate
from ..models import Classifier
from ..tracking import Tracker

RESULT_FILE = "result.json"


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
        (folder / RESULT_FILE).write_text(json.dumps(d, indent=2))


def run_key(cfg: Config, command: str, *sections: str) -> str:
    """``<run.name>-<command>`` when a name is given, else ``<command>-<hash of the sections that matter>``.

    The same command with the same config gets the same key, so re-running it resumes
    (Ray Train storage, local checkpoints, the MLflow run) instead of starting over.
    """
    if cfg.run.name:
        return f"{cfg.run.name}-{command}"
    return f"{command}-{cfg.digest(*sections)}"


def stage_dir(cfg: Config, key: str) -> Path:
    d = (Path(cfg.run.output_dir).expanduser() / "stages" / key).resolve()
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
    d = json.loads(p.read_text())
    if d.get("model_path") and not Path(d["model_path"]).is_file():
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
    (folder / "config.yaml").write_text(to_yaml(cfg))
    split.save(folder / "split.json")
    tracker.log_artifact(folder / "config.yaml")
    tracker.log_artifact(folder / "split.json")
    tracker.log_params({
        "split.labeled_size": len(split.labeled),
        "split.val_size_actual": len(split.val),
        "split.pool_size": len(split.pool),
    })


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_classifier_file(path: str | Path, device: torch.device | None = None) -> Classifier:
    payload = checkpoints.load_model_file(path, "classifier")
    model = Classifier(checkpoints.config_of(payload).model)
    model.load_state_dict(payload["state_dict"])
    return model.to(device or eval_device()).to(memory_format=torch.channels_last).eval()


def report_test_metrics(model: torch.nn.Module, data: Mnist, prefix: str = "test_") -> tuple[dict[str, float], torch.Tensor]:
    """Test accuracy (reported, never used to decide anything) and the predictions."""
    dev = next(model.parameters()).device
    from ..engine import predict_logits

    x, y = data.test_images.to(dev), data.test_labels.to(dev)
    pred = predict_logits(model, x).argmax(1)
    acc = float((pred == y).float().mean())
    per_class = {f"{prefix}acc_digit{c}": float((pred[y == c] == c).float().mean()) for c in range(10) if (y == c).any()}
    return {f"{prefix}acc": acc, **per_class}, pred.cpu()


def val_metrics(model: torch.nn.Module, data: Mnist, split: Split) -> dict[str, float]:
    dev = next(model.parameters()).device
    idx = split.val
    m = evaluate(model, data.train_images[idx].to(dev), data.train_labels[idx].to(dev))
    return {"val_acc": m["acc"], "val_loss": m["loss"]}


def save_model_file(path: Path, kind: str, cfg: Config, state_dict: dict, **extra: Any) -> Path:
    return checkpoints.save(path, checkpoints.model_payload(kind, cfg, state_dict, **extra))
