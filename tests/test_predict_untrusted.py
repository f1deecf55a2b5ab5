"""`toolkit predict` runs no code from a model: crafted MLflow models (a folder, a registered model in
a sqlite store) and a crafted pickle are refused in one line, and the file their code would write is
never created; the opt-in runs a trusted one; the command the pipeline prints for its registered
model works as printed, from any folder.

Each crafted model really is hostile: the test ends by loading it the way MLflow does, and the
file appears.
"""

from __future__ import annotations

import csv
import io
import pickle
import shlex
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded

SIGNATURE = """signature:
  inputs: '[{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, 28, 28]}}]'
  outputs: '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 10]}}]'
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, client, experiment id) of a fresh sqlite store with artifacts beside it."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("untrusted", artifact_location=(root / "artifacts").as_uri())


@pytest.fixture
def images(tmp_path) -> str:
    path = tmp_path / "few-idx3-ubyte"
    path.write_bytes((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28)) + bytes(3 * 784))
    return str(path)


class _Exec:
    """Unpickling this runs ``code``."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _writes(marker: Path, what: str) -> str:
    return f"open({str(marker)!r}, 'w').write({what!r})"


def crafted_pytorch_model(folder: Path, marker: Path) -> Path:
    """An MLflow PyTorch model whose loading writes ``marker``: MLflow puts its ``code/`` on sys.path,
    imports the module its pickle_module_info.txt names (which writes the file) and unpickles
    ``data/model.pth`` (which would write it too)."""
    module = f"toolkit_test_probe_{uuid.uuid4().hex}"
    (folder / "code").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "code" / f"{module}.py").write_text(_writes(marker, "imported") + "\nfrom pickle import *  # noqa\n")
    (folder / "data" / "pickle_module_info.txt").write_text(module)
    (folder / "data" / "model.pth").write_bytes(pickle.dumps(_Exec(_writes(marker, "unpickled"))))
    (folder / "MLmodel").write_text(f"""flavors:
  python_function:
    loader_module: mlflow.pytorch
    data: data
    code: code
    pickle_module_name: {module}
    python_version: 3.11.7
  pytorch:
    model_data: data
    pytorch_version: {torch.__version__.split('+')[0]}
    code: code
    pickle_module_name: {module}
mlflow_version: 3.17.2
metadata:
  toolkit.kind: classifier
{SIGNATURE}""")
    return folder


def _predict_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(["predict", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def _assert_refused(code: int, err: list[str], out: str, marker: Path) -> None:
    assert code == 2 and len(err) == 1 and err[0].startswith("toolkit predict: error:"), err
    assert "was not logged by the toolkit" in err[0] and "predict.trust_pickled_model=true" in err[0], err
    assert out == ""
    assert not marker.exists(), f"the model's code ran: {marker.read_text()}"


def test_a_crafted_model_folder_runs_no_code(tmp_path, images, capsys):
    import mlflow

    marker = tmp_path / "pwned"
    folder = crafted_pytorch_model(tmp_path / "crafted", marker)
    _assert_refused(*_predict_cli([f"predict.model={folder}", f"predict.input={images}",
                                   f"run.output_dir={tmp_path / 'runs'}"], capsys), marker)
    # it is hostile: MLflow's loader imports its module and unpickles its file (each writes the marker)
    with pytest.raises(Exception):
        mlflow.pytorch.load_model(str(folder))
    assert marker.read_text() in ("imported", "unpickled")


def test_a_crafted_registered_model_runs_no_code(store, tmp_path, images, capsys):
    import mlflow

    uri, client, exp = store
    marker = tmp_path / "pwned"
    folder = crafted_pytorch_model(tmp_path / "crafted", marker)
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    client.create_registered_model("crafted")
    version = client.create_model_version("crafted", source=f"{client.get_run(run_id).info.artifact_uri}/model",
                                          run_id=run_id)
    client.set_registered_model_alias("crafted", "best", version.version)
    for ref in ("models:/crafted@best", "models:/crafted/1", f"runs:/{run_id}/model"):
        _assert_refused(*_predict_cli([f"predict.model={ref}", f"predict.input={images}", f"tracking.uri={uri}"],
                                      capsys), marker)
    from toolkit.tracking.logged_models import using_tracking_uri

    with using_tracking_uri(uri), pytest.raises(Exception):  # it is hostile, through the registry too
        mlflow.pytorch.load_model("models:/crafted@best")
    assert marker.read_text() in ("imported", "unpickled")


def test_trusting_a_model_loads_it_with_mlflow(tmp_path, images, capsys):
    """A model the toolkit did not log, shaped like a classifier: refused by default; with
    ``predict.trust_pickled_model=true`` MLflow loads it (its code runs) and it predicts."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    marker = tmp_path / "ran"
    code = tmp_path / "uniform.py"
    code.write_text(f"""import mlflow
import numpy as np
{_writes(marker, "ran")}


class Uniform(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        return np.full((len(model_input), 10), 0.1, dtype=np.float32)


mlflow.models.set_model(Uniform())
""")
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))
    folder = tmp_path / "uniform"
    mlflow.pyfunc.save_model(str(folder), python_model=str(code), signature=signature, pip_requirements=["mlflow"])
    marker.unlink()  # saving ran it once
    argv = [f"predict.model={folder}", f"predict.input={images}", f"run.output_dir={tmp_path / 'runs'}"]
    _assert_refused(*_predict_cli(argv, capsys), marker)
    code_, err, out = _predict_cli([*argv, "predict.trust_pickled_model=true"], capsys)
    assert code_ == 0, err
    assert marker.read_text() == "ran"
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and all(float(r["confidence"]) == pytest.approx(0.1) for r in rows)


def test_a_crafted_pickle_is_one_line_without_torch_advice(tmp_path, images, capsys):
    """A pickle whose unpickling runs code: one line on stderr (torch's protocol warning swallowed),
    naming the file and not passing on torch's advice to load it with weights_only=False."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"kind": "classifier", "state_dict": _Exec(_writes(marker, "unpickled"))}))
    code, err, out = _predict_cli([f"predict.model={path}", f"predict.input={images}",
                                   f"run.output_dir={tmp_path / 'runs'}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(path) in err[0] and "not a readable toolkit checkpoint" in err[0] and "damaged" in err[0]
    assert "weights_only" not in err[0] and "trusted source" not in err[0]
    assert not marker.exists() and out == ""
    pickle.loads(path.read_bytes())  # it is hostile
    assert marker.read_text() == "unpickled"


# ------------------------------------------------------------------ the command the pipeline prints


def test_the_predict_command_the_pipeline_prints_works_as_pasted(tmp_path, data_root, monkeypatch, capsys):
    """The pipeline registers its best model in the profile's store (``runs/cpu/mlflow.db``); the
    command it prints names that store, so it works in a fresh shell in any folder, with no --config."""
    from mlflow.tracking import MlflowClient

    from toolkit.config import Config, ModelConfig
    from toolkit.datasets.mnist import load_mnist
    from toolkit.engine.loops import predict_probs
    from toolkit.tracking.logged_models import log_classifier
    from toolkit.maths.models import Classifier
    from toolkit.stages.skeleton import StageResult
    from toolkit.stages.pipeline import _register_best
    from toolkit.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path / 'project' / 'runs' / 'cpu' / 'mlflow.db'}"
    (tmp_path / "project" / "runs" / "cpu").mkdir(parents=True)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toolkit", artifact_location=(tmp_path / "project" / "runs" / "cpu" / "art").as_uri())
    stage_run, parent_run = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Classifier(ModelConfig(width=8, depth=2)).eval()
    client.set_tag(stage_run, "toolkit.model_uri", log_classifier(uri, stage_run, net))
    cfg = Config().replace(**{"tracking.uri": uri, "run.data_root": data_root})
    results = {0: {"supervised": StageResult("supervised", "key", run_id=stage_run, metrics={"val_acc": 0.9})}}
    _register_best(cfg.study, cfg.execution, Tracker(uri, parent_run), results)
    printed = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("toolkit predict")]
    assert len(printed) == 1, printed
    argv = shlex.split(printed[0])
    assert argv[:2] == ["toolkit", "predict"] and "predict.model=models:/toolkit-mnist-classifier@best" in argv

    fresh = tmp_path / "fresh-shell"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    for var in ("MLFLOW_TRACKING_URI", "TOOLKIT_OUTPUT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    assert main(argv[1:]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    test_images = load_mnist(data_root).test_images
    ref = predict_probs(net, test_images).numpy()
    assert len(rows) == len(test_images)
    clear = np.diff(np.sort(ref, 1)[:, -2:], axis=1)[:, 0] > 1e-3  # a near-tie may flip with the last float bits
    np.testing.assert_array_equal(np.array([int(r["label"]) for r in rows])[clear], ref.argmax(1)[clear])
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], ref.max(1), atol=1e-4)

    # the alias alone (what the pipeline printed before) finds no store here: one line that says
    # where it looked and what to give, and no empty store made in this folder
    code, err, _ = _predict_cli(["predict.model=models:/toolkit-mnist-classifier@best",
                                 f"predict.input={argv[-1].split('=', 1)[1]}"], capsys)
    assert code == 2 and len(err) == 1 and str(fresh / "runs" / "mlflow.db") in err[0] and "tracking.uri" in err[0], err
    assert list(fresh.iterdir()) == []
    from toolkit.engine.checkpoints import CheckpointError
    from toolkit.stages.predict import predict

    with pytest.raises(CheckpointError, match="the tracking store .* does not exist .*give the tracking.uri="):  # the same without the CLI's own checks
        cfg = Config().replace(**{"predict.model": "models:/toolkit-mnist-classifier@best",
                                  "predict.input": argv[-1].split("=", 1)[1], "run.output_dir": str(fresh / "runs")})
        predict(cfg.study, cfg.execution)
    assert list(fresh.iterdir()) == []


def test_a_foreign_signature_says_the_images_and_classes():
    """A model the toolkit did not log is fed what its signature takes: (N, S, S) or (N, C, S, S)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from toolkit.stages.predict import _signature_spec

    def sig(shape, out):
        return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
                              outputs=Schema([TensorSpec(np.dtype(np.float32), out)]))

    spec, flat = _signature_spec(sig((-1, 28, 28), (-1, 10)))
    assert (spec.input_shape(), spec.num_classes, flat) == ((1, 28, 28), 10, True)
    spec, flat = _signature_spec(sig((-1, 3, 32, 32), (-1, 4)))
    assert (spec.input_shape(), spec.num_classes, flat) == ((3, 32, 32), 4, False)
    for shape, out in (((-1, 5, 32, 32), (-1, 4)), ((-1, 3, 32, 16), (-1, 4)), ((-1, 28, 28), (-1, 2, 5))):
        assert _signature_spec(sig(shape, out)) is None
    assert _signature_spec(None) is None
