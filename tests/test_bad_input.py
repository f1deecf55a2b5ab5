"""Bad input, table-driven: every case through ``toolkit.cli.main`` ends with exit 2, exactly one line on
stderr (``toolkit CMD: error: ...``) and no traceback.

Most cases fail while the config is parsed (no data, no Ray, no MLflow: milliseconds). The
data, checkpoint and Tune-space cases build small broken files in ``tmp_path`` (the intact
MNIST files are symlinked, never modified). Ray is never started in-process: ``init_ray`` is
replaced by a function that fails the test. A few cases run the real ``toolkit`` in a
subprocess (marked slow).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from toolkit import cli
from toolkit.config import ConfigError, all_keys, check_command_config, load_config, read_text_file

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HEX_ID = "0123456789abcdef0123456789abcdef"
FLOAT_KEYS = [k for k, f in all_keys().items() if isinstance(f.default, float)]


class Ctx:
    """Builds the broken files a case needs, inside ``tmp``."""

    def __init__(self, tmp: Path, data_root: str):
        self.tmp, self.data_root = tmp, Path(data_root)

    def file(self, name: str, content: str | bytes) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return str(p)

    def space(self, content: str | bytes) -> list[str]:
        return [f"tune.space={self.file('space.yaml', content)}"]

    def data(self, broken: str, content: bytes | None) -> str:
        """An MNIST root whose file ``broken`` holds ``content`` (None: missing); the others link to the real ones."""
        raw = self.tmp / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in MNIST_FILES:
            if name == broken:
                if content is not None:
                    (raw / name).write_bytes(content)
            else:
                (raw / name).symlink_to(self.data_root / "MNIST" / "raw" / name)
        return str(self.tmp / "data")

    def real(self, name: str) -> bytes:
        return (self.data_root / "MNIST" / "raw" / name).read_bytes()

    def ckpt(self, kind: str, width: int = 8, name: str | None = None) -> str:
        from toolkit.engine import checkpoints
        from toolkit.config import Config
        from toolkit.maths.models import Classifier, SimCLRModel

        cfg = Config().replace(**{"model.width": width})
        model = SimCLRModel(cfg.model) if kind == "simclr" else Classifier(cfg.model)
        path = self.tmp / (name or f"{kind}-w{width}.pt")
        checkpoints.save(path, checkpoints.model_payload(kind, cfg.study.to_dict(), model.state_dict()))
        return str(path)

    def truncated_ckpt(self) -> str:
        p = Path(self.ckpt("simclr"))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return str(p)

    def torch_file(self, obj) -> str:
        import torch

        p = self.tmp / "other.pt"
        torch.save(obj, p)
        return str(p)

    def pickle_file(self) -> str:
        import pickle

        class_ref = os.system  # a pickle that would call os.system if unpickled without weights_only
        p = self.tmp / "evil.pt"
        p.write_bytes(pickle.dumps(_Evil(class_ref)))
        return str(p)

    def store(self) -> str:
        """A sqlite MLflow store holding the 'toolkit' experiment (and no runs)."""
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{self.tmp}/mlflow.db"
        MlflowClient(uri).create_experiment("toolkit")
        return uri


class _Evil:
    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return (self.fn, ("echo pwned",))


def _idx(magic: int, dims: tuple[int, ...], payload: bytes = b"") -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]] | list[str]  # after the command
    expect: str  # a piece of the error line (case-insensitive)
    command: str = "pretrain"
    marks: tuple = ()


def C(id, argv, expect, command="pretrain", marks=()):
    return Case(id, argv, expect, command, marks)


LOCAL = ["--backend", "local"]

CASES: list[Case] = [
    # --- command line ------------------------------------------------------------------------------
    C("unknown-command", [], "invalid choice: 'bogus'", command="bogus"),
    C("unknown-option", ["--bogus"], "unrecognized arguments: --bogus"),
    C("unknown-option-after-assignment", ["pretrain.epochs=1", "--nope=1"], "unrecognized arguments: --nope=1"),
    C("bad-backend-choice", ["--backend", "spark"], "invalid choice: 'spark'"),
    C("config-without-file", ["--config"], "expected one argument"),
    C("assignment-without-equals", ["pretrain.epochs"], "key=value"),
    C("assignment-without-equals-after-option", [*LOCAL, "pretrain.epochs"], "key=value"),
    C("empty-key", ["=3"], "unknown config key ''"),
    # --- unknown keys --------------------------------------------------------------------------------
    C("unknown-key-suggests", ["pretrain.epoch=3"], "did you mean 'pretrain.epochs'"),
    C("unknown-key-after-backend", ["pretrain.epochs=1", *LOCAL, "pretrain.epoch=3"], "did you mean 'pretrain.epochs'"),
    C("unknown-key-no-match", ["foo=1"], "unknown config key 'foo'"),
    C("section-only", ["pretrain=3"], "unknown config key 'pretrain'"),
    C("too-deep", ["pretrain.epochs.x=3"], "unknown config key 'pretrain.epochs.x'"),
    C("unknown-ray-key", ["ray.num_gpus=1"], "unknown config key 'ray.num_gpus'"),
    C("unknown-tracking-key", ["tracking.url=http://x"], "did you mean 'tracking.uri'"),
    C("unknown-key-in-yaml", lambda c: ["-c", c.file("c.yaml", "model:\n  widht: 16\n")], "did you mean 'model.width'"),
    C("unknown-section-in-yaml", lambda c: ["-c", c.file("c.yaml", "modle:\n  width: 16\n")], "unknown config key 'modle.width'"),
    C("unknown-key-in-report", ["report.id=1"], "did you mean 'report.run_id'", command="report"),
    # --- wrong types ----------------------------------------------------------------------------------
    C("int-from-word", ["pretrain.epochs=abc"], "expected an integer"),
    C("int-from-fraction", ["pretrain.epochs=1.5"], "expected an integer"),
    C("int-from-bool", ["pretrain.epochs=true"], "expected an integer"),
    C("int-from-list", ["pretrain.epochs=[1, 2]"], "expected an integer"),
    C("int-from-mapping", ["pretrain.epochs={a: 1}"], "expected an integer"),
    C("int-from-null", ["pretrain.epochs=null"], "expected an integer"),
    C("float-from-word", ["pretrain.lr=fast"], "expected a number"),
    C("float-from-bool", ["pretrain.lr=true"], "expected a number"),
    C("float-from-list", ["classifier.lr=[0.1]"], "expected a number"),
    C("bool-from-word", ["model.sync_bn=maybe"], "expected true or false"),
    C("bool-from-int", ["tracking.enabled=1"], "expected true or false"),
    C("seeds-from-word", ["pipeline.seeds=abc"], "a non-empty list of integers", command="pipeline"),
    C("seeds-fractional", ["pipeline.seeds=[1.5]"], "a non-empty list of integers", command="pipeline"),
    C("seeds-bool", ["pipeline.seeds=[true]"], "a non-empty list of integers", command="pipeline"),
    C("seeds-empty", ["pipeline.seeds=[]"], "a non-empty list of integers", command="pipeline"),
    C("stages-unknown", ["pipeline.stages=[bogus]"], "stages among", command="pipeline"),
    C("tune-without-its-stage", ["pipeline.tune=true", "pipeline.stages=[pretrain,iterative]"],
      "needs 'simclr_iterative'", command="pipeline"),
    C("unparsable-value", ["pretrain.lr=[1,2"], "cannot parse"),
    C("deeply-nested-value", ["pretrain.lr=" + "[" * 5000], "pretrain.lr"),
    C("yaml-tag-in-value", ["pretrain.epochs=!!python/object/apply:os.system [echo]"], "cannot parse"),
    C("int-out-of-range", ["pretrain.epochs=1e30"], "out of range"),
    C("int-too-large", ["split.val_size=99999999999999999999999"], "out of range"),
    # --- impossible values ------------------------------------------------------------------------------
    C("temperature-zero", ["pretrain.temperature=0"], "pretrain.temperature=0"),
    C("epochs-zero", ["pretrain.epochs=0"], "pretrain.epochs=0"),
    C("width-too-small", ["model.width=4"], "model.width=4"),
    C("depth-too-large", ["model.depth=9"], "model.depth=9"),
    C("dropout-one", ["model.dropout=1"], "model.dropout=1.0"),
    C("val-size-zero", ["split.val_size=0"], "split.val_size=0"),
    C("labels-zero", ["split.labels_per_class=0"], "split.labels_per_class=0"),
    C("negative-subset", ["data.train_subset=-5"], "data.train_subset=-5"),
    C("negative-split-seed", ["split.seed=-1"], "split.seed=-1"),
    C("huge-run-seed", ["model.seed=8589934592"], "model.seed=8589934592"),
    C("duplicate-seeds", ["pipeline.seeds=[0, 0]"], "each seed once", command="pipeline"),
    C("threshold-above-one", ["pseudolabel.threshold_start=1.5"], "pseudolabel.threshold_start=1.5", command="pseudolabel"),
    C("floor-above-start", ["pseudolabel.threshold_floor=0.995"], "must be <= threshold_start", command="pseudolabel"),
    C("exponential-rate-one", ["pseudolabel.schedule=exponential", "pseudolabel.threshold_rate=1"],
      "must be in (0, 1) for exponential", command="pseudolabel"),
    C("bad-schedule", ["pseudolabel.schedule=sigmoid"], "pseudolabel.schedule='sigmoid'", command="pseudolabel"),
    C("bad-search", ["tune.search=grid"], "tune.search='grid'", command="tune"),
    C("bad-run-backend", ["run.backend=spark"], "run.backend='spark'"),
    C("bad-device", ["run.device=tpu"], "run.device='tpu'"),
    C("init-empty-simclr", ["model.init=simclr:"], "model.init='simclr:'", command="supervised"),
    C("init-unknown", ["model.init=imagenet"], "model.init='imagenet'", command="supervised"),
    C("label-smoothing-one", ["classifier.label_smoothing=1"], "classifier.label_smoothing=1.0", command="supervised"),
    C("scale-min-above-max", ["augment.scale_min=2"], "augment.scale_min=2.0"),
    C("probability-above-one", ["augment.blur_prob=1.5"], "augment.blur_prob=1.5"),
    C("empty-experiment", ["tracking.experiment= "], "tracking.experiment"),
    C("empty-output-dir", ["run.output_dir= "], "run.output_dir"),
    # --- inf / nan (every float key, then other spellings) -------------------------------------------------
    *[C(f"inf-{k}", [f"{k}=inf"], f"{k}=inf is not allowed: must be a finite number") for k in FLOAT_KEYS],
    C("yaml-inf", ["pretrain.lr=.inf"], "pretrain.lr=inf is not allowed"),
    C("minus-inf", ["pretrain.lr=-.inf"], "pretrain.lr=-inf is not allowed"),
    C("nan", ["pretrain.lr=nan"], "pretrain.lr=nan is not allowed"),
    C("yaml-nan", ["classifier.lr=.nan"], "classifier.lr=nan is not allowed", command="supervised"),
    C("overflow-to-inf", ["pretrain.warmup_epochs=1e999"], "pretrain.warmup_epochs=inf is not allowed"),
    C("Infinity", ["classifier.lr=Infinity"], "classifier.lr=inf is not allowed", command="supervised"),
    C("inf-in-yaml-file", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  lr: .inf\n")], "pretrain.lr=inf"),
    C("nan-in-yaml-file", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  warmup_epochs: .nan\n")],
      "pretrain.warmup_epochs=nan"),
    C("int-key-inf", ["pretrain.epochs=inf"], "expected an integer"),
    C("seeds-inf", ["pipeline.seeds=[.inf]"], "a non-empty list of integers", command="pipeline"),
    # --- YAML files ----------------------------------------------------------------------------------------
    C("config-missing", lambda c: ["-c", str(c.tmp / "nope.yaml")], "does not exist"),
    C("config-is-a-folder", lambda c: ["-c", str(c.tmp)], "is not a file"),
    C("config-invalid-yaml", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: [1, 2\n  lr: {\n")],
      "is not valid YAML"),
    C("config-tabs", lambda c: ["-c", c.file("c.yaml", "pretrain:\n\tepochs: 3\n")], "is not valid YAML"),
    C("config-top-level-list", lambda c: ["-c", c.file("c.yaml", "- 1\n- 2\n")], "expected a mapping"),
    C("config-top-level-scalar", lambda c: ["-c", c.file("c.yaml", "just text\n")], "expected a mapping"),
    C("config-section-scalar", lambda c: ["-c", c.file("c.yaml", "pretrain: 5\n")], "unknown config key 'pretrain'"),
    C("config-wrong-type", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: many\n")], "expected an integer"),
    C("config-python-tag", lambda c: ["-c", c.file("c.yaml", "pretrain: !!python/object/apply:os.system [echo]\n")],
      "is not valid YAML"),
    C("config-undefined-alias", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: *nope\n")], "is not valid YAML"),
    C("config-deep-nesting", lambda c: ["-c", c.file("c.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")], "config file"),
    C("config-not-utf8", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: 3 # caf\xe9\n".encode("latin-1"))],
      "is not UTF-8 text"),
    C("config-binary", lambda c: ["-c", c.file("c.bin", bytes(range(256)))], "is not UTF-8 text"),
    C("config-key-twice", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: 3\n  epochs: 30\n")],
      "key 'epochs' is given twice (lines 2 and 3)"),
    C("config-section-twice", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: 3\npretrain:\n  lr: 0.1\n")],
      "key 'pretrain' is given twice"),
    C("config-dotted-key-twice", lambda c: ["-c", c.file("c.yaml", "pretrain:\n  epochs: 3\npretrain.epochs: 4\n")],
      "key 'pretrain.epochs' is given twice"),
    C("config-value-hidden-by-assignment", lambda c: ["-c", c.file("c.yaml", "run:\n  backend: gpu\n"), "run.backend=local"],
      "run.backend='gpu' is not allowed"),
    # --- a value given twice: the later wins, but each one is checked ---------------------------------------
    C("backend-flag-hides-bad-backend", ["run.backend=gpu", *LOCAL], "run.backend='gpu' is not allowed"),
    C("assignment-hides-bad-value", ["pretrain.epochs=0", "pretrain.epochs=2"], "pretrain.epochs=0 is not allowed"),
    # --- names, ids and URIs ------------------------------------------------------------------------------------
    C("name-quote", ["run.name=it's"], "run.name=\"it's\" is not allowed"),
    C("name-double-quote", ['run.name=say"hi'], "run.name="),
    C("name-parent", ["run.name=../../../x"], "run.name='../../../x' is not allowed"),
    C("name-absolute", ["run.name=/etc/x"], "run.name='/etc/x' is not allowed"),
    C("name-separator", ["run.name=a/b"], "run.name='a/b' is not allowed"),
    C("name-backslash", ["run.name=a\\b"], "is not allowed"),
    C("name-dotdot", ["run.name=.."], "run.name='..' is not allowed"),
    C("name-hidden", ["run.name=.x"], "run.name='.x' is not allowed"),
    C("name-space", ["run.name=my run"], "run.name='my run' is not allowed"),
    C("name-injection", ["run.name=x' or '1'='1"], "run.name="),
    C("name-too-long", ["run.name=" + "a" * 101], "is not allowed"),
    C("name-newline", ["run.name=a\nb"], "is not allowed"),
    C("run-id-injection", ["report.run_id=x' or '1'='1"], "report.run_id=", command="report"),
    C("run-id-short", ["report.run_id=abc123"], "report.run_id='abc123' is not allowed", command="report"),
    C("run-id-upper", [f"report.run_id={HEX_ID.upper()}"], "32 hexadecimal digits", command="report"),
    C("uri-with-password", ["tracking.uri=http://alice:s3cret@127.0.0.1:5000"], "MLFLOW_TRACKING_PASSWORD"),
    C("uri-with-token-user", ["tracking.uri=https://tok3n@mlflow.example.com"], "MLFLOW_TRACKING_USERNAME"),
    C("uri-with-token-query", ["tracking.uri=https://mlflow.example.com/?token=tok3n"], "holds credentials"),
    C("db-uri-with-password", ["tracking.uri=postgresql://alice:s3cret@db/mlflow"], "holds a password"),
    C("tracking-unreachable", lambda c: [*LOCAL, "data.train_subset=3000", "tracking.enabled=true",
                                         f"tracking.uri=http://127.0.0.1:{_closed_port()}"], "is not reachable"),
    C("tracking-sqlite-missing-folder", lambda c: [*LOCAL, "data.train_subset=3000", "tracking.enabled=true",
                                                   f"tracking.uri=sqlite:///{c.tmp}/nope/mlflow.db"], "does not exist"),
    C("report-run-id-missing", lambda c: [f"tracking.uri={c.store()}", "tracking.enabled=true",
                                          f"report.run_id={HEX_ID}"], HEX_ID, command="report", marks=(pytest.mark.slow,)),
    C("report-no-experiment", lambda c: [f"tracking.uri=sqlite:///{c.tmp}/mlflow.db", "tracking.enabled=true",
                                         "tracking.experiment=nothing-here"], "does not exist", command="report",
      marks=(pytest.mark.slow,)),
    # --- resources larger than the cluster -------------------------------------------------------------------
    C("workers-beyond-embedded-ray", ["ray.num_workers=64"], "ray.num_workers=64 is not allowed"),
    C("num-cpus-one", ["ray.num_cpus=1"], "need 2 CPUs but the embedded Ray has 1"),
    C("cpus-per-worker", ["ray.num_cpus=4", "ray.cpus_per_worker=8"], "need 16 CPUs"),
    C("trial-cpus", ["ray.num_cpus=4", "trials.cpus=64"], "trials.cpus=64", command="tune"),
    C("batch-beyond-mnist", ["pretrain.batch_size=100000"], "pretrain.batch_size=100000 is not allowed"),
    C("batch-beyond-subset", ["data.train_subset=500", "split.val_size=100"], "pretrain.batch_size=512 is not allowed"),
    C("batch-beyond-max-images", ["pretrain.max_images=100"], "at most the 100 images"),
    C("val-size-beyond-data", ["data.train_subset=1000", "split.val_size=5000"], "split.val_size=5000"),
    C("pipeline-batch", ["data.train_subset=500", "split.val_size=100"], "pretrain.batch_size=512", command="pipeline"),
    C("ray-address-refused", lambda c: [f"ray.address=127.0.0.1:{_closed_port()}"], "is not reachable"),
    C("ray-address-malformed", ["ray.address=head:port"], "expected host:port"),
    C("labels-beyond-class", [*LOCAL, "data.train_subset=3000", "split.labels_per_class=1000"], "training images"),
    # --- data ------------------------------------------------------------------------------------------------
    C("data-root-missing", lambda c: [*LOCAL, f"run.data_root={c.tmp / 'nowhere'}"], "MNIST file missing"),
    C("data-file-missing", lambda c: [*LOCAL, f"run.data_root={c.data('t10k-labels-idx1-ubyte', None)}"],
      "MNIST file missing"),
    C("data-empty-file", lambda c: [*LOCAL, f"run.data_root={c.data('train-labels-idx1-ubyte', b'')}"], "truncated"),
    C("data-truncated-images", lambda c: [*LOCAL, f"run.data_root={c.data('train-images-idx3-ubyte', _idx(2051, (60000, 28, 28), bytes(4000)))}"],
      "truncated"),
    C("data-wrong-magic", lambda c: [*LOCAL, f"run.data_root={c.data('t10k-labels-idx1-ubyte', _idx(2051, (10000,), bytes(10000)))}"],
      "magic number 2051, expected 2049"),
    C("data-wrong-shape", lambda c: [*LOCAL, f"run.data_root={c.data('t10k-labels-idx1-ubyte', _idx(2049, (9999,), bytes(9999)))}"],
      "declares shape"),
    C("data-labels-out-of-range", lambda c: [*LOCAL, f"run.data_root={c.data('t10k-labels-idx1-ubyte', c.real('t10k-labels-idx1-ubyte')[:-1] + bytes([11]))}"],
      "labels corrupt"),
    C("data-root-is-a-file", lambda c: [*LOCAL, f"run.data_root={c.file('f.txt', 'x')}"], "MNIST file missing"),
    C("output-dir-under-a-file", lambda c: [*LOCAL, "data.train_subset=3000", f"run.output_dir={c.file('f.txt', 'x')}/runs"],
      "ENOTDIR"),
    # --- checkpoints -----------------------------------------------------------------------------------------
    C("probe-no-checkpoint", [], "probe.checkpoint is empty", command="probe"),
    C("probe-missing-file", lambda c: [f"probe.checkpoint={c.tmp / 'nope.pt'}"], "neither an existing checkpoint",
      command="probe"),
    C("probe-text-file", lambda c: [f"probe.checkpoint={c.file('notes.txt', 'hello')}"], "not a readable toolkit checkpoint",
      command="probe"),
    C("probe-empty-file", lambda c: [f"probe.checkpoint={c.file('empty.pt', b'')}"], "not a readable toolkit checkpoint",
      command="probe"),
    C("probe-truncated", lambda c: [f"probe.checkpoint={c.truncated_ckpt()}"], "not a readable toolkit checkpoint",
      command="probe"),
    C("probe-pickle", lambda c: [f"probe.checkpoint={c.pickle_file()}"], "not a readable toolkit checkpoint", command="probe"),
    C("probe-plain-tensor", lambda c: [f"probe.checkpoint={c.torch_file({'weights': [1, 2]})}"], "not a toolkit checkpoint",
      command="probe"),
    C("probe-classifier", lambda c: [f"probe.checkpoint={c.ckpt('classifier')}"], "holds a 'classifier' model, expected 'simclr'",
      command="probe"),
    C("probe-unknown-run-id", [f"probe.checkpoint={HEX_ID}"], HEX_ID, command="probe", marks=(pytest.mark.slow,)),
    C("init-text-file", lambda c: [*LOCAL, "data.train_subset=3000", f"model.init=simclr:{c.file('n.txt', 'hello')}"],
      "not a readable toolkit checkpoint", command="supervised"),
    C("init-classifier", lambda c: [*LOCAL, "data.train_subset=3000", f"model.init=simclr:{c.ckpt('classifier')}"],
      "expected 'simclr'", command="supervised"),
    C("init-other-width", lambda c: [*LOCAL, "data.train_subset=3000", "model.width=16", f"model.init=simclr:{c.ckpt('simclr', 8)}"],
      "model.width=8 in the checkpoint but 16 here", command="supervised"),
    C("init-missing", lambda c: [*LOCAL, "data.train_subset=3000", f"model.init=simclr:{c.tmp / 'gone.pt'}"],
      "neither an existing checkpoint", command="supervised"),
    C("init-unknown-run-id", [*LOCAL, "data.train_subset=3000", f"model.init=simclr:{HEX_ID}"], HEX_ID, command="supervised"),
    C("init-text-file-pseudolabel", lambda c: [*LOCAL, "data.train_subset=3000", f"model.init=simclr:{c.file('n.txt', 'hello')}"],
      "not a readable toolkit checkpoint", command="pseudolabel"),
    C("init-text-file-tune", lambda c: [f"model.init=simclr:{c.file('n.txt', 'hello')}"], "not a readable toolkit checkpoint",
      command="tune"),
    C("pipeline-data-missing", lambda c: [*LOCAL, f"run.data_root={c.tmp / 'nowhere'}"], "MNIST file missing", command="pipeline"),
    C("pseudolabel-data-corrupt", lambda c: [*LOCAL, f"run.data_root={c.data('train-labels-idx1-ubyte', b'')}"], "truncated",
      command="pseudolabel"),
    # --- Tune space files --------------------------------------------------------------------------------------
    C("space-missing", lambda c: [f"tune.space={c.tmp / 'nope.yaml'}"], "does not exist", command="tune"),
    C("space-unknown-key", lambda c: c.space('pseudolabel.treshold_start: {choice: [0.9]}\n'),
      "pseudolabel.treshold_start", command="tune"),
    C("space-untunable-key", lambda c: c.space('split.seed: {choice: [1, 2]}\n'),
      "cannot be tuned", command="tune"),
    C("space-bad-domain", lambda c: c.space('classifier.lr: {normal: [0.1, 0.2]}\n'),
      "needs exactly one of", command="tune"),
    C("space-reversed-range", lambda c: c.space('classifier.lr: {uniform: [0.2, 0.1]}\n'),
      "needs lo < hi", command="tune"),
    C("space-inf-range", lambda c: c.space('classifier.lr: {uniform: [0.1, .inf]}\n'),
      "must be a finite number", command="tune"),
    C("space-randint-on-float", lambda c: c.space('classifier.lr: {randint: [1, 3]}\n'),
      "is for integer keys", command="tune"),
    C("space-invalid-yaml", lambda c: c.space('classifier.lr: {uniform: [0.1\n'),
      "is not valid YAML", command="tune"),
    C("space-list", lambda c: c.space('- 1\n'), "expected a mapping", command="tune"),
    C("space-key-twice", lambda c: c.space('classifier.lr: {choice: [0.1]}\nclassifier.lr: {choice: [0.2]}\n'),
      "key 'classifier.lr' is given twice (lines 1 and 2)", command="tune"),
    C("space-empty", lambda c: c.space('{}\n'), "nothing to search", command="tune"),
    C("space-bad-value", lambda c: c.space('pseudolabel.schedule: {choice: [sigmoid]}\n'),
      "pseudolabel.schedule='sigmoid'", command="tune"),
    C("space-not-utf8", lambda c: c.space('classifier.lr: {choice: [0.1]} # \xe9\n'.encode('latin-1')),
      "not UTF-8 text", command="tune"),
]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params():
    return [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


def test_there_are_at_least_99_cases():
    assert len(CASES) >= 99
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Bad input must fail before Ray starts; starting it here would be a bug (and slow)."""
    def refuse(*a, **k):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr("toolkit.execution.backends.init_ray", refuse, raising=False)


def _running_runs(tmp: Path) -> list[str]:
    out = []
    for db in tmp.rglob("*.db"):
        con = sqlite3.connect(db)
        try:
            out += [r[0] for r in con.execute("select run_uuid from runs where status = 'RUNNING'")]
        except sqlite3.Error:
            pass
        finally:
            con.close()
    return out


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, data_root, capsys):
    ctx = Ctx(tmp_path, data_root)
    args = case.argv(ctx) if callable(case.argv) else list(case.argv)
    # safe defaults first (a case's own assignments come later and win)
    safe = [f"run.output_dir={tmp_path / 'runs'}", "tracking.enabled=false", f"run.data_root={data_root}"]
    argv = [case.command, *safe, *args]
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors (the console script exits with the code)
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = f"toolkit {case.command}: error: " if case.command in cli.COMMANDS else "toolkit: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert case.expect.lower() in lines[0].lower(), lines[0]
    assert "s3cret" not in err and "tok3n" not in err  # credentials are never echoed
    assert not _running_runs(tmp_path)


# --- exceptions from deeper down: one line, exit 2, the cause kept ------------------------------------------


def _ray_worker_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = ValueError("pretrain.batch_size=100000 is larger than the 2000 training images\nmore detail")
    return WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  ...", {1: cause, 0: cause})


def _ray_task_error():
    from ray.exceptions import RayTaskError

    from toolkit.datasets.mnist import DataError

    e = RayTaskError("fn", "Traceback (most recent call last):\n  File x\nDataError: ...", DataError("MNIST file truncated: /x"))
    return e.as_instanceof_cause()


def _ray_controller_error():
    from ray.train.v2.api.exceptions import ControllerError

    return ControllerError(RuntimeError("placement group could not be scheduled\nsecond line"))


def _ray_actor_died():
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def _mlflow_error():
    from mlflow.exceptions import MlflowException

    return MlflowException("Run with id=0123 not found\nsecond line")


def _decode_error(tmp: Path):
    p = tmp / "space.yaml"
    p.write_bytes(b"\xff\xfe bad")
    try:
        p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return e
    raise AssertionError("decoded")


RAISED = [
    ("mlflow", lambda t: _mlflow_error(), "MLflow: Run with id=0123 not found"),
    ("read-only", lambda t: OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/runs/stages/k"),
     "EROFS: Read-only file system: /ro/runs/stages/k (the folder is read-only"),
    ("disk-full", lambda t: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/ckpt.pt"),
     "ENOSPC: No space left on device: /full/ckpt.pt (the disk is full"),
    ("permission", lambda t: PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x"), "EACCES: Permission denied: /x"),
    ("oserror-without-errno", lambda t: OSError("socket closed"), "OSError: socket closed"),
    ("nan-loss", lambda t: FloatingPointError("pretrain loss became nan in epoch 3: lower pretrain.lr"),
     "pretrain loss became nan in epoch 3: lower pretrain.lr"),
    ("decode", _decode_error, "space.yaml' is not UTF-8 text"),
    ("ray-worker", lambda t: _ray_worker_error(),
     "a Ray Train worker failed: ValueError: pretrain.batch_size=100000 is larger than the 2000 training images"),
    ("ray-task", lambda t: _ray_task_error(), "MNIST file truncated: /x"),
    ("ray-controller", lambda t: _ray_controller_error(), "RuntimeError: placement group could not be scheduled"),
    ("ray-actor-died", lambda t: _ray_actor_died(), "Ray: ActorDiedError"),
    ("credentials-in-a-message", lambda t: OSError("cannot reach https://bob:s3cret@host/api"), "https://***@host/api"),
]


@pytest.mark.parametrize("make, expect", [pytest.param(m, e, id=i) for i, m, e in RAISED])
def test_exceptions_reaching_the_cli_are_one_line(make, expect, tmp_path, data_root, capsys, monkeypatch):
    exc = make(tmp_path)

    def command(study, execution):
        raise exc

    monkeypatch.setattr(cli, "_dispatch", lambda name: command)
    capsys.readouterr()
    rc = cli.main(["pretrain", "--backend", "local", f"run.output_dir={tmp_path / 'runs'}", "tracking.enabled=false",
                   f"run.data_root={data_root}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("toolkit pretrain: error: ")
    assert expect in lines[0], lines[0]
    assert "s3cret" not in err


def test_interrupt_is_exit_130(tmp_path, data_root, capsys, monkeypatch):
    def command(study, execution):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", lambda name: command)
    assert cli.main(["pretrain", "--backend", "local", f"run.output_dir={tmp_path}", "tracking.enabled=false",
                     f"run.data_root={data_root}"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, data_root, monkeypatch):
    """A bug is not bad input: it is not disguised as one line."""
    def command(study, execution):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_dispatch", lambda name: command)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["pretrain", "--backend", "local", f"run.output_dir={tmp_path}", "tracking.enabled=false",
                  f"run.data_root={data_root}"])


# --- argument order -----------------------------------------------------------------------------------------


def test_backend_between_assignments_is_accepted(tmp_path, data_root, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_dispatch", lambda name: lambda study, execution: seen.update(study=study, execution=execution))
    argv = ["pretrain", "pretrain.epochs=2", "--backend", "local", "pretrain.epochs=3", "--config",
            str(Path(cli.__file__).parent / "profiles" / "cpu.yaml") if (Path(cli.__file__).parent / "profiles" / "cpu.yaml").is_file() else "",
            f"run.output_dir={tmp_path}", "tracking.enabled=false", f"run.data_root={data_root}"]
    if not argv[6]:
        del argv[5:7]
    assert cli.main(argv) == 0
    assert seen["execution"].run.backend == "local" and seen["study"].pretrain.epochs == 3  # the later assignment still wins


def test_backend_flag_wins_over_an_assignment(tmp_path, data_root, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_dispatch", lambda name: lambda study, execution: seen.update(study=study, execution=execution))
    assert cli.main(["pretrain", "run.backend=ray", "--backend", "local", "pretrain.epochs=2",
                     f"run.output_dir={tmp_path}", "tracking.enabled=false", f"run.data_root={data_root}"]) == 0
    assert seen["execution"].run.backend == "local" and seen["study"].pretrain.epochs == 2


# --- the config helpers on their own -----------------------------------------------------------------------------


def test_read_text_file(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_bytes("\ufeffa: 1\n".encode("utf-8"))
    assert read_text_file(ok, "space file") == "a: 1\n"  # a BOM is dropped
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: \xe9\n")
    with pytest.raises(ConfigError, match=r"space file '.*bad.yaml' is not UTF-8 text: byte 0xe9 at offset 3"):
        read_text_file(bad, "space file")
    with pytest.raises(ConfigError, match="does not exist"):
        read_text_file(tmp_path / "none", "space file")
    with pytest.raises(ConfigError, match="is not a file"):
        read_text_file(tmp_path, "space file")


def test_command_checks_concern_only_the_command():
    small = load_config(None, ["data.train_subset=500", "split.val_size=100"])  # fine for supervised
    check_command_config(small, cli.command_sections("supervised"))
    with pytest.raises(ConfigError, match="pretrain.batch_size=512"):
        check_command_config(small, cli.command_sections("pretrain"))
    many = load_config(None, ["ray.num_workers=64"])
    check_command_config(many, cli.command_sections("probe"))  # probe does not use Ray Train
    check_command_config(load_config(None, ["ray.num_workers=64", "run.backend=local"]), cli.command_sections("pretrain"))
    check_command_config(load_config(None, ["ray.num_workers=64", "ray.address=auto"]), cli.command_sections("pretrain"))


def test_every_float_key_rejects_inf_also_when_built_directly():
    import dataclasses

    from toolkit.config import Config

    for key in FLOAT_KEYS:
        section, name = key.split(".")
        cfg = Config()
        bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: float("nan")})})
        with pytest.raises(ConfigError, match=f"{key}=nan is not allowed: must be a finite number"):
            bad.validate()


# --- the real command, in a subprocess -------------------------------------------------------------------------

SUBPROCESS = [
    (["pretrain", "pretrain.lr=inf"], "pretrain.lr=inf is not allowed"),
    (["supervised", "classifier.lr=inf", "--backend", "local"], "classifier.lr=inf is not allowed"),
    (["pretrain", "run.name=it's"], "run.name=\"it's\" is not allowed"),
    (["pretrain", "pretrain.batch_size=100000", "--backend", "local", "pretrain.epochs=1"], "pretrain.batch_size=100000"),
    (["report", "report.run_id=x' or '1'='1"], "report.run_id="),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, expect", SUBPROCESS, ids=[" ".join(a) for a, _ in SUBPROCESS])
def test_bad_input_in_a_subprocess(argv, expect, tmp_path):
    p = subprocess.run([sys.executable, "-m", "toolkit.cli", *argv, f"run.output_dir={tmp_path}"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    lines = p.stderr.strip("\n").splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert expect in lines[0]


@pytest.mark.slow
def test_non_utf8_config_in_a_subprocess(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"pretrain:\n  epochs: \xff\n")
    p = subprocess.run([sys.executable, "-m", "toolkit.cli", "pretrain", "-c", str(f)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not UTF-8 text" in p.stderr, p.stderr
