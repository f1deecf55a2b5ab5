"""The bad-input table of `edge_check.py`: each case a `toolkit` command line and the broken files it needs.

A case's files are built in its own folder; MNIST damage is done to new files beside links to
the intact copies (which are never written). ``mentions`` is what the error line must name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HEX_ID = "0123456789abcdef0123456789abcdef"
SECRET = "s3cret"  # a credential in a bad URI: it must never be echoed

# ----------------------------------------------------------------------------- the files bad cases need


class CaseFiles:
    """Builds the broken files of one case inside its own folder; ``pristine`` holds intact MNIST copies."""

    def __init__(self, root: Path, pristine: Path):
        self.root, self.pristine = root, pristine
        self.marker = root / "PWNED"  # a crafted pickle would create this file if it were ever unpickled

    def file(self, name: str, content: str | bytes) -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(p)

    def real(self, name: str) -> bytes:
        return (self.pristine / "MNIST" / "raw" / name).read_bytes()

    def data(self, broken: str = "", content: bytes | None = None) -> str:
        """A data root whose file ``broken`` holds ``content`` (None: missing); the others link to the intact copies."""
        raw = self.root / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in MNIST_FILES:
            if name != broken:
                (raw / name).symlink_to(self.pristine / "MNIST" / "raw" / name)
            elif content is not None:
                (raw / name).write_bytes(content)  # a new file: the intact copy is never written
        return str(self.root / "data")

    def ckpt(self, kind: str, width: int = 8, cut: bool = False) -> str:
        from toolkit.engine import checkpoints
        from toolkit.config import Config
        from toolkit.maths.models import Classifier, SimCLRModel

        cfg = Config().replace(**{"model.width": width})
        model = SimCLRModel(cfg.model) if kind == "simclr" else Classifier(cfg.model)
        path = self.root / f"{kind}-w{width}.pt"
        checkpoints.save(path, checkpoints.model_payload(kind, cfg.study.to_dict(), model.state_dict()))
        if cut:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return str(path)

    def evil_pickle(self) -> str:
        """A torch file whose unpickling (without weights_only) would create ``marker``."""
        import torch

        p = self.root / "evil.pt"
        torch.save({"state_dict": _Evil(str(self.marker))}, p)
        return str(p)

    def evil_mlflow_model(self) -> str:
        """An MLflow model folder (pytorch flavor, pickle format) whose model file creates ``marker`` when loaded."""
        import torch

        folder = self.root / "mlflow-model"
        (folder / "data").mkdir(parents=True)
        (folder / "MLmodel").write_text(
            "flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: " + torch.__version__.split("+")[0] + "\n"
            "    code: null\n  python_function:\n    data: data\n    env:\n      virtualenv: python_env.yaml\n"
            "    loader_module: mlflow.pytorch\n    pickle_module_name: mlflow.pytorch.pickle_module\n"
            "    python_version: 3.11.0\nmlflow_version: 3.17.0\nmodel_uuid: " + HEX_ID + "\n"
            "utc_time_created: '2026-01-01 00:00:00.000000'\n")
        (folder / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")
        torch.save(_Evil(str(self.marker)), folder / "data" / "model.pth")
        return str(folder)

    def idx3(self, n: int = 5, cut: int = 0) -> str:
        raw = self.real("t10k-images-idx3-ubyte")
        body = raw[16: 16 + n * 784]
        data = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + body
        return self.file("digits.idx3", data[: len(data) - cut])

    def store(self) -> str:
        """A sqlite MLflow store holding the 'toolkit' experiment and no runs."""
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its "creating tables" notice
        uri = f"sqlite:///{self.root}/store/mlflow.db"
        (self.root / "store").mkdir(exist_ok=True)
        MlflowClient(uri).create_experiment("toolkit")
        return uri


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling opens (creates) the marker file


def _idx(magic: int, dims: tuple[int, ...], payload: bytes = b"") -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


# ----------------------------------------------------------------------------- bad inputs


@dataclass
class BadCase:
    name: str
    command: str
    args: Callable[[CaseFiles], list[str]]  # after the command and the safe settings
    mentions: str  # a piece of the error line (case-insensitive): the key, file or value at fault
    env: dict | None = None


def B(name, command, args, mentions, env=None) -> BadCase:
    return BadCase(name, command, args if callable(args) else (lambda c, a=tuple(args): list(a)), mentions, env)


def yaml_case(name: str, text: str | bytes, mentions: str, command: str = "pretrain") -> BadCase:
    return B(name, command, lambda c: ["--config", c.file("c.yaml", text)], mentions)


def space_case(name: str, text: str | bytes, mentions: str) -> BadCase:
    return B(name, "tune", lambda c: [f"tune.space={c.file('space.yaml', text)}"], mentions)


def data_case(name: str, broken: str, content: Callable[[CaseFiles], bytes | None], mentions: str) -> BadCase:
    return B(name, "pretrain", lambda c: ["--backend", "local", f"run.data_root={c.data(broken, content(c))}"], mentions)


LOCAL = ["--backend", "local"]
TRAIN_IMAGES, TEST_LABELS = MNIST_FILES[0], MNIST_FILES[3]

BAD_CASES: list[BadCase] = [
    # the command line and unknown keys
    B("unknown-command", "bogus", [], "bogus"),
    B("unknown-option", "pretrain", ["--bogus"], "--bogus"),
    B("assignment-without-equals", "pretrain", ["pretrain.epochs"], "key=value"),
    B("mistyped-key", "pretrain", ["pretrain.epoch=3"], "pretrain.epochs"),
    B("unknown-key", "pretrain", ["foo=1"], "foo"),
    B("unknown-section", "pretrain", ["pretrian.epochs=1"], "pretrian"),
    B("mistyped-key-report", "report", ["report.id=1"], "report.run_id"),
    B("backend-flag-and-bad-assignment", "pretrain", ["--backend", "local", "run.backend=gpu"], "gpu"),
    B("bad-backend-choice", "pretrain", ["--backend", "spark"], "spark"),
    # wrong types, impossible values
    B("int-from-word", "pretrain", ["pretrain.epochs=abc"], "pretrain.epochs"),
    B("int-from-fraction", "pretrain", ["pretrain.epochs=1.5"], "pretrain.epochs"),
    B("bool-from-word", "pretrain", ["model.sync_bn=maybe"], "model.sync_bn"),
    B("negative-lr", "pretrain", ["pretrain.lr=-0.1"], "pretrain.lr"),
    B("negative-classifier-lr", "supervised", [*LOCAL, "classifier.lr=-1"], "classifier.lr"),
    B("zero-epochs", "pretrain", ["pretrain.epochs=0"], "pretrain.epochs"),
    B("zero-workers", "pretrain", ["ray.num_workers=0"], "ray.num_workers"),
    B("zero-inference-actors", "pseudolabel", ["inference.actors=0"], "inference.actors"),
    B("zero-trials", "tune", ["tune.num_samples=0"], "tune.num_samples"),
    B("zero-predict-batch", "predict", ["predict.batch_size=0"], "predict.batch_size"),
    B("threshold-zero", "pseudolabel", ["pseudolabel.threshold_start=0"], "pseudolabel.threshold_start"),
    B("threshold-above-one", "pseudolabel", ["pseudolabel.threshold_start=1.5"], "pseudolabel.threshold_start"),
    B("floor-above-start", "pseudolabel", ["pseudolabel.threshold_floor=0.995"], "threshold_floor"),
    B("width-too-small", "pretrain", ["model.width=4"], "model.width"),
    B("temperature-zero", "pretrain", ["pretrain.temperature=0"], "pretrain.temperature"),
    B("bad-schedule", "pseudolabel", ["pseudolabel.schedule=sigmoid"], "sigmoid"),
    B("negative-subset", "pretrain", ["data.train_subset=-5"], "data.train_subset"),
    B("int-out-of-range", "pretrain", ["pretrain.epochs=1e30"], "pretrain.epochs"),
    B("empty-seeds", "pipeline", ["pipeline.seeds=[]"], "pipeline.seeds"),
    B("unknown-stage", "pipeline", ["pipeline.stages=[bogus]"], "bogus"),
    # non-finite numbers
    B("inf-lr", "pretrain", ["pretrain.lr=inf"], "pretrain.lr"),
    B("nan-lr", "pretrain", ["pretrain.lr=nan"], "pretrain.lr"),
    B("yaml-inf-classifier-lr", "supervised", [*LOCAL, "classifier.lr=.inf"], "classifier.lr"),
    B("overflow-to-inf", "pretrain", ["pretrain.warmup_epochs=1e999"], "pretrain.warmup_epochs"),
    B("nan-threshold", "pseudolabel", ["pseudolabel.threshold_start=.nan"], "pseudolabel.threshold_start"),
    yaml_case("nan-in-yaml-file", "pretrain:\n  warmup_epochs: .nan\n", "pretrain.warmup_epochs"),
    # config files
    B("config-missing", "pretrain", lambda c: ["--config", str(c.root / "nope.yaml")], "nope.yaml"),
    B("config-is-a-folder", "pretrain", lambda c: ["--config", str(c.root)], "not a file"),
    yaml_case("broken-yaml", "pretrain:\n  epochs: [1, 2\n  lr: {\n", "c.yaml"),
    yaml_case("yaml-tabs", "pretrain:\n\tepochs: 3\n", "c.yaml"),
    yaml_case("yaml-top-level-list", "- 1\n- 2\n", "mapping"),
    yaml_case("yaml-python-tag", "pretrain: !!python/object/apply:os.system [echo]\n", "c.yaml"),
    yaml_case("yaml-unknown-key", "model:\n  widht: 16\n", "model.width"),
    yaml_case("yaml-duplicate-key", "pretrain:\n  epochs: 2\n  epochs: 3\n", "epochs"),
    yaml_case("yaml-duplicate-section", "pretrain:\n  epochs: 2\nmodel:\n  width: 8\npretrain:\n  lr: 0.01\n", "pretrain"),
    yaml_case("yaml-not-utf8", "pretrain:\n  epochs: 3 # caf\xe9\n".encode("latin-1"), "UTF-8"),
    yaml_case("yaml-binary", bytes(range(256)), "UTF-8"),
    # names, ids, URIs, credentials
    B("name-parent", "pretrain", ["run.name=../../x"], "run.name"),
    B("name-separator", "pretrain", ["run.name=a/b"], "run.name"),
    B("name-quote", "pretrain", ["run.name=it's"], "run.name"),
    B("name-space", "pretrain", ["run.name=my run"], "run.name"),
    B("report-run-id-injection", "report", ["report.run_id=x' or '1'='1"], "report.run_id"),
    B("report-run-id-short", "report", ["report.run_id=abc123"], "report.run_id"),
    B("report-run-id-unknown", "report", lambda c: [f"tracking.uri={c.store()}", f"report.run_id={HEX_ID}"], HEX_ID),
    B("uri-with-password", "pretrain", [f"tracking.uri=http://alice:{SECRET}@127.0.0.1:5000"], "tracking.uri"),
    B("uri-with-token-query", "pretrain", [f"tracking.uri=https://mlflow.example.com/?token={SECRET}"], "tracking.uri"),
    B("env-uri-with-password", "pretrain", [], "MLFLOW_TRACKING_URI",
      env={"MLFLOW_TRACKING_URI": f"http://alice:{SECRET}@127.0.0.1:5000"}),
    B("tracking-sqlite-missing-folder", "pretrain", lambda c: [*LOCAL, f"tracking.uri=sqlite:///{c.root}/nope/mlflow.db"],
      "nope"),
    B("output-dir-under-a-file", "pretrain", lambda c: [*LOCAL, f"run.output_dir={c.file('f.txt', 'x')}/runs"], "f.txt"),
    # resources larger than the embedded Ray, a GPU that is not there
    B("workers-beyond-embedded-ray", "pretrain", ["ray.num_workers=64"], "ray.num_workers"),
    B("embedded-ray-one-cpu", "pretrain", ["ray.num_cpus=1"], "ray.num_cpus"),
    B("trial-cpus-beyond-ray", "tune", ["ray.num_cpus=4", "trials.cpus=64"], "trials.cpus"),
    B("batch-beyond-subset", "pretrain", ["pretrain.batch_size=100000"], "pretrain.batch_size"),
    B("use-gpu-without-gpu", "pretrain", ["ray.use_gpu=true"], "GPU"),
    B("local-cuda-without-gpu", "supervised", [*LOCAL, "run.device=cuda"], "cuda"),
    # MNIST files (copies in a temporary root, damaged there)
    B("data-root-missing", "pretrain", lambda c: [*LOCAL, f"run.data_root={c.root / 'nowhere'}"], "MNIST"),
    data_case("data-file-missing", TEST_LABELS, lambda c: None, TEST_LABELS),
    data_case("data-empty-file", TRAIN_IMAGES, lambda c: b"", TRAIN_IMAGES),
    data_case("data-truncated-images", TRAIN_IMAGES, lambda c: c.real(TRAIN_IMAGES)[:4_000_000], TRAIN_IMAGES),
    data_case("data-wrong-magic", TEST_LABELS, lambda c: _idx(2051, (10000,), bytes(10000)), TEST_LABELS),
    data_case("data-wrong-count", TEST_LABELS, lambda c: _idx(2049, (9999,), bytes(9999)), TEST_LABELS),
    data_case("data-label-out-of-range", TEST_LABELS, lambda c: c.real(TEST_LABELS)[:-1] + bytes([11]), TEST_LABELS),
    data_case("data-random-bytes", TRAIN_IMAGES, lambda c: os.urandom(5000), TRAIN_IMAGES),
    # checkpoints
    B("probe-checkpoint-text", "probe", lambda c: [f"probe.checkpoint={c.file('notes.txt', 'hello')}"], "notes.txt"),
    B("probe-checkpoint-truncated", "probe", lambda c: [f"probe.checkpoint={c.ckpt('simclr', cut=True)}"], "simclr-w8.pt"),
    B("probe-checkpoint-classifier", "probe", lambda c: [f"probe.checkpoint={c.ckpt('classifier')}"], "classifier"),
    B("probe-checkpoint-pickle", "probe", lambda c: [f"probe.checkpoint={c.evil_pickle()}"], "evil.pt"),
    B("init-simclr-text", "supervised", lambda c: [*LOCAL, f"model.init=simclr:{c.file('n.txt', 'hello')}"], "n.txt"),
    B("init-simclr-classifier", "supervised", lambda c: [*LOCAL, f"model.init=simclr:{c.ckpt('classifier')}"], "simclr"),
    B("init-simclr-other-width", "supervised",
      lambda c: [*LOCAL, "model.width=16", f"model.init=simclr:{c.ckpt('simclr', 8)}"], "model.width"),
    # Tune spaces
    space_case("space-unknown-key", "pseudolabel.treshold_start: {choice: [0.9]}\n", "pseudolabel.treshold_start"),
    space_case("space-untunable-key", "split.seed: {choice: [1, 2]}\n", "split.seed"),
    space_case("space-reversed-range", "classifier.lr: {uniform: [0.2, 0.1]}\n", "classifier.lr"),
    space_case("space-inf-range", "classifier.lr: {uniform: [0.1, .inf]}\n", "classifier.lr"),
    space_case("space-broken-yaml", "classifier.lr: {uniform: [0.1\n", "space.yaml"),
    space_case("space-empty", "{}\n", "space"),
    space_case("space-duplicate-key", "classifier.lr: {choice: [0.1]}\nclassifier.lr: {choice: [0.2]}\n", "classifier.lr"),
    space_case("space-bad-value", "pseudolabel.schedule: {choice: [sigmoid]}\n", "sigmoid"),
    # predict
    B("predict-no-model", "predict", lambda c: [f"predict.input={c.idx3()}"], "predict.model"),
    B("predict-missing-model", "predict", lambda c: [f"predict.model={c.root / 'gone.pt'}", f"predict.input={c.idx3()}"],
      "gone.pt"),
    B("predict-pickle-model", "predict", lambda c: [f"predict.model={c.evil_pickle()}", f"predict.input={c.idx3()}"],
      "evil.pt"),
    B("predict-crafted-mlflow-model", "predict",
      lambda c: [f"predict.model={c.evil_mlflow_model()}", f"predict.input={c.idx3()}"], "mlflow-model"),
    B("predict-simclr-model", "predict", lambda c: [f"predict.model={c.ckpt('simclr')}", f"predict.input={c.idx3()}"],
      "simclr"),
    B("predict-unknown-run-id", "predict", lambda c: [f"tracking.uri={c.store()}", f"predict.model={HEX_ID}",
                                                      f"predict.input={c.idx3()}"], HEX_ID),
    B("predict-input-text", "predict", lambda c: [f"predict.model={c.ckpt('classifier')}",
                                                  f"predict.input={c.file('x.bin', 'not images')}"], "x.bin"),
    B("predict-input-truncated", "predict", lambda c: [f"predict.model={c.ckpt('classifier')}",
                                                       f"predict.input={c.idx3(cut=100)}"], "digits.idx3"),
    B("predict-input-missing", "predict", lambda c: [f"predict.model={c.ckpt('classifier')}",
                                                     f"predict.input={c.root / 'none.npy'}"], "none.npy"),
]
