"""MLflow Models, dataset inputs and the Model Registry, logged into runs opened by id (no fluent run).

One sqlite store for the module (creating one costs seconds of migrations); a small
classifier with non-trivial BatchNorm statistics and dropout, so that a model logged in
train mode would show it; real MNIST digits as inputs.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from toolkit.tracking import logged_models as mm
from toolkit.tracking import model_package
from toolkit.config import ModelConfig
from toolkit.datasets.mnist import load_mnist, make_split
from toolkit.maths.models import Classifier, SimCLRModel

MODEL_CFG = ModelConfig(width=8, depth=2, dropout=0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, client, experiment id) of a fresh sqlite store with artifacts beside it."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toolkit", artifact_location=(root / "artifacts").as_uri())
    return uri, client, exp


@pytest.fixture
def run_id(store):
    _, client, exp = store
    return client.create_run(exp).info.run_id


@pytest.fixture(scope="module")
def digits(data_root):
    data = load_mnist(data_root, train_subset=2000, test_subset=200)
    return data


@pytest.fixture(scope="module")
def classifier(digits):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Classifier(MODEL_CFG)
    model.train()(digits.train_images[:64].unsqueeze(1).float() / 255)  # BatchNorm running stats move
    return model  # left in train mode on purpose: the logged model must be in eval mode anyway


def reference_probs(model, images_u8: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        m = Classifier(MODEL_CFG)
        m.load_state_dict(model.state_dict())
        return m.eval()(images_u8.unsqueeze(1).float() / 255).softmax(1).numpy()


@pytest.fixture(scope="module")
def logged(store, classifier, digits, tmp_path_factory):
    """A classifier logged into a fresh run: (run id, model URI)."""
    uri, client, exp = store
    rid = client.create_run(exp).info.run_id
    # stages also keep the toolkit file as the run artifact model/model.pt: runs:/<id>/model must still
    # resolve to the MLflow model of that name
    toolkit_file = tmp_path_factory.mktemp("artifact") / "model.pt"
    toolkit_file.write_bytes(b"toolkit file")
    client.log_artifact(rid, str(toolkit_file), "model")
    model_uri = mm.log_classifier(uri, rid, classifier, input_example=digits.test_images[:4])
    return rid, model_uri


def _predict(uri, model_uri, images_u8) -> torch.Tensor:
    """``mlflow.pyfunc.load_model(model_uri).predict(images)`` against this store: MLflow's own loader."""
    import mlflow

    with mm.using_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    return torch.from_numpy(np.asarray(model.predict(images_u8.numpy())))


def _read_as_toolkit(uri, model_uri, dst) -> "model_package.ImageModel":
    """What ``toolkit predict`` does with a model URI: download the files, read weights and description."""
    return model_package.read_mlflow_model(mm.download_model(uri, model_uri, str(dst)))[0]


def test_logged_classifier_loads_back_with_the_same_predictions(store, logged, classifier, digits):
    uri, client, exp = store
    rid, model_uri = logged
    assert model_uri.startswith("models:/m-")
    x = digits.test_images[:200]  # 200 images, though the example had 4: the batch dimension is dynamic
    ref = reference_probs(classifier, x)
    # Rows of different digits differ by far more than the tolerance below (seen >= 1e-3), and the
    # exported graph runs the same kernels (seen: identical); dropout left on would change ~half the logits.
    assert np.abs(np.diff(ref, axis=0)).max(1).min() > 1e-4
    for uri_form in (model_uri, f"runs:/{rid}/model"):
        got = _predict(uri, uri_form, x)
        assert got.dtype == torch.float32 and got.shape == (200, 10)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
        np.testing.assert_array_equal(got.numpy().argmax(1), ref.argmax(1))
    # the run lists it (the UI's "Logged models"), in the run's own experiment
    outputs = client.get_run(rid).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model_uri.split("/")[-1]]
    logged_model = client.get_logged_model(outputs[0].model_id)
    assert logged_model.experiment_id == exp and logged_model.source_run_id == rid
    assert logged_model.tags[mm.KIND_KEY] == mm.CLASSIFIER


def test_signature_input_example_and_requirements(store, logged):
    import mlflow
    from mlflow.models import get_model_info

    uri, _, _ = store
    _, model_uri = logged
    with mm.using_tracking_uri(uri):
        info = get_model_info(model_uri)
        folder = mlflow.artifacts.download_artifacts(model_uri)
    (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inp.type, inp.shape) == (np.dtype(np.uint8), (-1, 28, 28))
    assert (out.type, out.shape) == (np.dtype(np.float32), (-1, 10))
    assert info.metadata[mm.KIND_KEY] == mm.CLASSIFIER
    example = np.asarray(json.load(open(os.path.join(folder, "input_example.json"))))  # the images as nested lists
    assert example.shape == (4, 28, 28) and example.max() > 100  # real digits, not blanks
    # the network is two plain files; MLflow's loader runs the toolkit's code file, and nothing is pickled
    assert os.path.isfile(os.path.join(folder, "artifacts", model_package.WEIGHTS_FILE))
    assert json.load(open(os.path.join(folder, "artifacts", model_package.DESCRIPTION_FILE)))["architecture"] == {
        "name": "cnn", "width": 8, "depth": 2, "convs_per_stage": MODEL_CFG.convs_per_stage, "pool": MODEL_CFG.pool}
    assert os.path.isfile(os.path.join(folder, "code", "toolkit", "maths/models.py"))  # serving needs no installed toolkit
    assert info.flavors.keys() == {"python_function"}
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    pickles = [f for _, _, files in os.walk(folder) for f in files if f.endswith((".pkl", ".pth", ".pickle"))]
    assert pickles == []
    reqs = open(os.path.join(folder, "requirements.txt")).read().split()
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("mlflow==") for r in reqs)


def test_pyfunc_and_models_predict_serve_it(store, logged, classifier, digits, tmp_path):
    import mlflow

    uri, _, _ = store
    _, model_uri = logged
    x = digits.test_images[:16]
    ref = reference_probs(classifier, x)
    with mm.using_tracking_uri(uri):
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        np.testing.assert_allclose(np.asarray(pyfunc.predict(x.numpy())), ref, atol=1e-5)
        # what `mlflow models predict -m <uri> -i input.json --env-manager local` runs: JSON in, JSON out
        mlflow.models.predict(model_uri, input_data=x.numpy(), env_manager="local", output_path=str(tmp_path / "out.json"))
    served = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.float32)
    np.testing.assert_allclose(served, ref, atol=1e-5)


def test_logged_encoder_gives_the_features(store, run_id, digits):
    uri, _, _ = store
    with torch.random.fork_rng():
        torch.manual_seed(1)
        simclr = SimCLRModel(MODEL_CFG)
    model_uri = mm.log_encoder(uri, run_id, simclr, input_example=digits.test_images[:3])
    x = digits.test_images[:20]
    with torch.no_grad():
        ref = simclr.encoder.eval()(x.unsqueeze(1).float() / 255).numpy()
    got = _predict(uri, model_uri, x).numpy()
    assert got.shape == (20, simclr.encoder.feature_dim)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_split_is_logged_as_training_and_validation_datasets(store, run_id, digits, data_root):
    uri, client, _ = store
    split = make_split(digits.train_labels, labels_per_class=10, val_size=200, seed=3)
    names = mm.log_split_dataset(uri, run_id, split, source=data_root)
    assert names == ["mnist-seed3-10x10", "mnist-seed3-10x10-val"]
    mm.log_split_dataset(uri, run_id, split)  # a resumed run logs it again: nothing is added
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 2
    by_context = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d for d in inputs}
    assert set(by_context) == {"training", "validation"}
    train, val = by_context["training"], by_context["validation"]
    assert (train.dataset.name, val.dataset.name) == tuple(names)
    assert train.dataset.digest == val.dataset.digest == mm.split_digest(split)
    profile = json.loads(train.dataset.profile)
    assert (profile["labeled"], profile["val"], profile["pool"]) == (100, 200, 2000 - 300)
    assert {t.key: t.value for t in train.tags}["toolkit.pool"] == "1700"
    # the digest follows the split: another seed, another digest
    assert mm.split_digest(make_split(digits.train_labels, 10, 200, seed=4)) != mm.split_digest(split)


def test_register_best_creates_versions_and_moves_the_alias(store, logged, classifier, digits):
    uri, client, exp = store
    _, model_uri = logged
    name = "toolkit-test-best"
    assert mm.register_best(uri, model_uri, name) == f"models:/{name}/1"
    second_run = client.create_run(exp).info.run_id
    assert mm.log_classifier(uri, second_run, classifier, name="model", registered_name=name).startswith("models:/m-")
    assert name in [m.name for m in client.search_registered_models()]
    versions = mm.registered_versions(uri, name)
    assert [int(v.version) for v in versions] == [2, 1]
    assert versions[0].run_id == second_run
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {"best": "2"}
    ref = reference_probs(classifier, digits.test_images[:10])
    np.testing.assert_allclose(_predict(uri, f"models:/{name}@best", digits.test_images[:10]).numpy(), ref, atol=1e-5)


def test_registered_version_is_linked_from_the_logged_model(store, logged):
    """The UI's logged-model page reads the model's ``mlflow.modelVersions`` tag ("Not registered"
    and "Model versions: None" without it); a sqlite registry does not write it by itself."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    uri, client, _ = store
    _, model_uri = logged
    model_id = model_uri[len("models:/"):]
    name = "toolkit-test-linked"

    def linked() -> list:
        return [v for v in json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS]) if v["name"] == name]

    assert mm.register_best(uri, model_uri, name) == f"models:/{name}/1"
    assert [str(v["version"]) for v in linked()] == ["1"]
    others = json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS])
    # written already (as a tracking server does): not repeated; other registrations are kept
    mm._link_version_to_logged_model(mm._client(uri), model_id, name, "1")
    assert json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS]) == others
    assert mm.register_best(uri, model_uri, name) == f"models:/{name}/2"
    assert [str(v["version"]) for v in linked()] == ["1", "2"]


def test_test_metrics_reach_the_logged_model_page(store, logged):
    """A stage's test accuracy is logged on its run and on its logged model (the UI's model page)."""
    from toolkit.tracking.runs import Tracker

    uri, client, _ = store
    rid, model_uri = logged
    model_id = model_uri[len("models:/"):]
    Tracker(uri, rid).log_metrics({"test_acc": 0.987}, model_id=model_id)
    assert client.get_run(rid).data.metrics["test_acc"] == pytest.approx(0.987)
    assert {m.key: m.value for m in client.get_logged_model(model_id).metrics} == {"test_acc": pytest.approx(0.987)}


def test_runs_name_their_user_for_the_ui(store, tmp_path):
    """``mlflow.user`` is what the UI shows as a run's "Created by" (MLflow's fluent runs set it)."""
    import getpass

    from toolkit.config import Config
    from toolkit.tracking.runs import mlflow_run

    uri, client, _ = store
    cfg = Config().replace(**{"tracking.uri": uri, "tracking.experiment": "toolkit", "run.output_dir": str(tmp_path)})
    with mlflow_run(cfg.study, cfg.execution, "supervised", "user-tag-test") as tracker:
        pass
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == "toolkit supervised"


def test_global_tracking_uri_and_environment_are_restored(store, monkeypatch):
    import mlflow

    uri, _, _ = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with mm.using_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_tracking_uri() == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ  # nothing leaks to Ray workers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    with pytest.raises(RuntimeError, match="boom"):
        with mm.using_tracking_uri(uri):
            raise RuntimeError("boom")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////somewhere/else.db"
    assert mlflow.get_tracking_uri() == "sqlite:////somewhere/else.db"


def test_disabled_tracker_is_a_no_op_and_bad_examples_are_refused(classifier, run_id, store):
    from toolkit.tracking.runs import Tracker

    off = Tracker.disabled()
    assert mm.log_classifier(off, None, classifier) == ""
    assert mm.log_split_dataset(off, None, None) == []
    assert mm.register_best(off, "models:/m-x") == ""
    uri, _, _ = store
    with pytest.raises(ValueError, match="uint8"):
        mm.log_classifier(uri, run_id, classifier, input_example=np.zeros((2, 28, 28), np.float32))


# ------------------------------------------------------------------ what `toolkit predict` reads


def test_the_toolkit_reads_its_model_without_mlflow_loaders(store, logged, classifier, digits, tmp_path, monkeypatch):
    """``toolkit predict``'s path: the files downloaded, weights and description read, the network
    built by the toolkit; MLflow's loaders (which run a model's code) are never called."""
    import mlflow

    def refuse(*a, **k):
        raise AssertionError("an MLflow loader was called")

    for module, name in ((mlflow.pyfunc, "load_model"), (mlflow.pytorch, "load_model")):
        monkeypatch.setattr(module, name, refuse)
    uri, _, _ = store
    rid, model_uri = logged
    x = digits.test_images[:50]
    for i, uri_form in enumerate((model_uri, f"runs:/{rid}/model")):
        model = _read_as_toolkit(uri, uri_form, tmp_path / str(i))
        assert (model.kind, model.out_dim, model.tta) == (mm.CLASSIFIER, 10, None)
        np.testing.assert_allclose(model(x).numpy(), reference_probs(classifier, x), atol=1e-5)


def test_the_test_time_recipe_travels_with_the_model(store, run_id, classifier, digits, tmp_path):
    """A student's recipe (its model file's ``tta``) logged with it: MLflow and the toolkit both
    predict the mean over the augmented views, as the model file does."""
    from toolkit.config import AugmentConfig
    from toolkit.engine.loops import predict_probs, tta_recipe

    uri, _, _ = store
    recipe = tta_recipe(AugmentConfig(), views=3, strength=0.5)
    model_uri = mm.log_classifier(uri, run_id, classifier, tta=recipe)
    x = digits.test_images[:30]
    with torch.no_grad():
        plain_net = Classifier(MODEL_CFG)
        plain_net.load_state_dict(classifier.state_dict())
        expected = predict_probs(plain_net.eval(), x, recipe).numpy()
    assert np.abs(expected - reference_probs(classifier, x)).max() > 1e-3  # not the plain predictions
    np.testing.assert_allclose(_read_as_toolkit(uri, model_uri, tmp_path)(x).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(_predict(uri, model_uri, x).numpy(), expected, atol=1e-5)


def test_only_toolkit_networks_are_logged(store, run_id, classifier):
    uri, client, _ = store
    with pytest.raises(ValueError, match="not Linear"):
        mm.log_classifier(uri, run_id, torch.nn.Linear(784, 10))
    with pytest.raises(ValueError, match="log_classifier was given a encoder"):
        mm.log_classifier(uri, run_id, SimCLRModel(MODEL_CFG))
    with pytest.raises(ValueError, match="log_encoder was given a classifier"):
        mm.log_encoder(uri, run_id, classifier)
    with pytest.raises(TypeError):  # a misspelt option is not silently dropped
        mm.log_classifier(uri, run_id, classifier, input_exmaple=None)
    assert client.get_run(run_id).outputs.model_outputs == []  # refused before anything was logged


class _Exec:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_a_tampered_toolkit_model_runs_no_code(store, logged, tmp_path):
    """The two files are all the toolkit reads, and neither can run code: a weights file that is a
    crafted pickle and a description that names something else are each refused in one line."""
    import pickle

    from toolkit.engine.checkpoints import CheckpointError

    uri, _, _ = store
    folder = mm.download_model(uri, logged[1], str(tmp_path / "model"))
    weights = folder / "artifacts" / model_package.WEIGHTS_FILE
    description = folder / "artifacts" / model_package.DESCRIPTION_FILE
    good = description.read_text()
    marker = tmp_path / "pwned"
    description.write_text(good.replace(model_package.FORMAT, "someone-else/1"))
    with pytest.raises(CheckpointError, match="not a toolkit model description"):
        model_package.read_mlflow_model(folder)
    description.write_text(good.replace('"width": 8', '"width": 16'))
    with pytest.raises(CheckpointError, match="does not fit its description") as e:
        model_package.read_mlflow_model(folder)
    assert "\n" not in str(e.value)
    description.write_text(good)
    weights.write_bytes(pickle.dumps({"state_dict": _Exec(f"open({str(marker)!r}, 'w').write('pwned')")}))
    with pytest.raises(CheckpointError, match="not a readable toolkit weights file") as e:
        model_package.read_mlflow_model(folder)
    assert "weights_only" not in str(e.value) and not marker.exists()


# ------------------------------------------------------------------ any dataset: a colour model, names, other encoders

COLOUR_NAMES = ["cat", "dog", "ship", "truck"]


def _colour_spec():
    from toolkit.datasets.spec import ImageSpec

    return ImageSpec(3, 32, 4, (0.5,) * 3, (0.25,) * 3)


def _colour_classifier(cfg: ModelConfig = MODEL_CFG):
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = Classifier(cfg, _colour_spec())
        model.train()(torch.rand(16, 3, 32, 32))  # BatchNorm running stats move
    return model.eval()


def test_a_logged_colour_model_says_its_shape_and_reads_back_the_same(store, run_id, tmp_path):
    """A 3-channel 32 px model of 4 named classes: signature (-1, 3, 32, 32) -> (-1, 4); read back by
    the toolkit (``model_package``, ``toolkit predict``) and by MLflow with the model's probabilities."""
    import mlflow
    from mlflow.models import get_model_info
    from PIL import Image

    from toolkit.stages.predict import predict_images

    uri, _, _ = store
    model = _colour_classifier()
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (12, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        reference = model(images.float() / 255).softmax(1)
    model_uri = mm.log_classifier(uri, run_id, model, input_example=images[:3], spec=_colour_spec(),
                                  class_names=COLOUR_NAMES)
    with mm.using_tracking_uri(uri):
        info = get_model_info(model_uri)
        served = torch.from_numpy(np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images.numpy())))
    (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inp.type, inp.shape) == (np.dtype(np.uint8), (-1, 3, 32, 32))
    assert (out.type, out.shape) == (np.dtype(np.float32), (-1, 4))
    assert info.metadata[model_package.CLASS_NAMES_KEY] == COLOUR_NAMES
    torch.testing.assert_close(served, reference, atol=1e-5, rtol=1e-4)

    read = _read_as_toolkit(uri, model_uri, tmp_path / "download")
    assert (read.kind, read.out_dim, read.spec, read.class_names) == (mm.CLASSIFIER, 4, _colour_spec(), tuple(COLOUR_NAMES))
    torch.testing.assert_close(read(images), reference, atol=1e-5, rtol=1e-4)

    # `toolkit predict` on the same pixels as PNG files: the same probabilities, labelled by name
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, x in enumerate(images.numpy()):
        Image.fromarray(x.transpose(1, 2, 0)).save(folder / f"img{i:02d}.png")
    got = predict_images(model_uri, str(folder), tracking_uri=uri)
    torch.testing.assert_close(torch.from_numpy(got.probs), reference, atol=1e-5, rtol=1e-4)
    assert [label for _, label, _ in got.rows()] == [COLOUR_NAMES[int(y)] for y in got.labels]


def test_input_examples_follow_the_spec():
    """MNIST-shaped examples keep (N, 28, 28); others are (N, C, S, S); an empty one gives blank images."""
    from toolkit.datasets.spec import MNIST_SPEC

    digits = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert mm._example_images(digits, MNIST_SPEC).shape == (4, 28, 28)
    assert mm._example_images(digits[:, 0], MNIST_SPEC).shape == (4, 28, 28)
    empty = mm._example_images(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), _colour_spec())
    assert empty.shape == (2, 3, 32, 32) and empty.max() == 0
    assert mm._example_images(None, _colour_spec()).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        mm._example_images(digits, _colour_spec())


def test_a_resnet_package_and_an_old_description_read_back(tmp_path):
    """``describe`` knows the ResNet-18 encoder; a description from before specs and encoder names
    reads as the MNIST CNN it was."""
    from toolkit.datasets.spec import MNIST_SPEC

    resnet_cfg = ModelConfig(name="resnet18", width=8, pool=1)
    model = _colour_classifier(resnet_cfg)
    kind, weights, description = model_package.write(tmp_path / "resnet", model, spec=_colour_spec(),
                                                     class_names=COLOUR_NAMES)
    doc = json.loads(description.read_text())
    assert (kind, doc["architecture"]) == (mm.CLASSIFIER, {"name": "resnet18", "width": 8, "pool": 1})
    assert doc["input"]["shape"] == [-1, 3, 32, 32] and doc["input"]["channels"] == 3
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        reference = model(images.float() / 255).softmax(1)
    read = model_package.read(weights, description)
    torch.testing.assert_close(read(images), reference, atol=1e-5, rtol=1e-4)
    encoder_kind, _, _ = model_package.write(tmp_path / "encoder", SimCLRModel(resnet_cfg, _colour_spec()),
                                             spec=_colour_spec())
    assert encoder_kind == mm.ENCODER
    with pytest.raises(ValueError, match="standardises with mean"):  # the spec must be the one it was built for
        model_package.write(tmp_path / "wrong", model)

    mnist = Classifier(MODEL_CFG).eval()
    _, weights, description = model_package.write(tmp_path / "mnist", mnist)
    doc = json.loads(description.read_text())
    del doc["architecture"]["name"], doc["class_names"]
    doc["input"] = {k: doc["input"][k] for k in ("dtype", "shape", "transform")}
    description.write_text(json.dumps(doc))
    old = model_package.read(weights, description)
    assert (old.spec, old.class_names) == (MNIST_SPEC, None)
    digits = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(old(digits), mnist(digits[:, None].float() / 255).softmax(1), atol=1e-5, rtol=1e-4)
