"""`toolkit predict`: every accepted input format and model reference, on a small trained classifier.

The classifier is trained here for a few seconds on 2,000 real MNIST digits (width 8), so
that "the labels are right" can be checked, not only the file format. Bad input must end
in one line on stderr and exit code 2.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.engine import checkpoints
from toolkit.engine.checkpoints import CheckpointError
from toolkit.cli import main
from toolkit.config import Config, ConfigError
from toolkit.datasets.mnist import DataError, load_mnist
from toolkit.maths.models import Classifier, SimCLRModel
from toolkit.stages.predict import predict, predict_images, read_images

N_TEST = 300


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded


@pytest.fixture(scope="module")
def data(data_root):
    return load_mnist(data_root, train_subset=2000, test_subset=N_TEST)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_root) -> Config:
    root = tmp_path_factory.mktemp("predict")
    return Config().replace(**{
        "run.data_root": data_root,
        "model.width": 8,
        "model.depth": 2,
        "run.output_dir": str(root / "runs"),
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
    })


@pytest.fixture(scope="module")
def trained(cfg, data):
    """A classifier trained for 120 steps of 64 on 2,000 labelled digits (83% test accuracy, ~10 s)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Classifier(cfg.model)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(120):
            idx = torch.randint(0, len(data.train_images), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(data.train_images[idx].unsqueeze(1).float() / 255), data.train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_file(trained, cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    checkpoints.save(path, checkpoints.model_payload("classifier", cfg.study.to_dict(), trained.state_dict()))
    return str(path)


@pytest.fixture(scope="module")
def reference(trained, data) -> np.ndarray:
    """The trained model's own probabilities for the test digits."""
    with torch.no_grad():
        return trained(data.test_images.unsqueeze(1).float() / 255).softmax(1).numpy()


def write_idx3(path, images: np.ndarray, gz: bool = False) -> str:
    header = (2051).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    raw = header + images.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)
    return str(path)


def write_pngs(folder, images: np.ndarray, suffix: str = ".png") -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"digit{i:03d}{suffix}")
    return str(folder)


# ------------------------------------------------------------------ inputs


def test_the_labels_are_right_and_match_the_model(model_file, data, reference, tmp_path):
    path = write_idx3(tmp_path / "t10k-images-idx3-ubyte", data.test_images.numpy())
    out = predict_images(model_file, path)
    assert out.names[:2] == ["t10k-images-idx3-ubyte:0", "t10k-images-idx3-ubyte:1"]
    # the same code path as the model's own forward (predict_logits): same probabilities
    np.testing.assert_allclose(out.probs, reference, atol=1e-5)
    top2 = np.sort(reference, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # a near-tie may flip with the last float bits
    np.testing.assert_array_equal(out.labels[clear], reference.argmax(1)[clear])
    np.testing.assert_allclose(out.confidences, reference.max(1), atol=1e-5)
    # and they are digits, not noise: seen 83% (chance 10%); labels read in the wrong order, a
    # transposed or inverted image give 4-10% (checked)
    acc = float((out.labels == data.test_labels.numpy()).mean())
    assert acc > 0.6, acc


def test_every_input_format_gives_the_same_images(data, tmp_path):
    images = data.test_images[:12].numpy()
    forms = {
        "idx3": write_idx3(tmp_path / "imgs-idx3-ubyte", images),
        "idx3.gz": write_idx3(tmp_path / "imgs-idx3-ubyte.gz", images, gz=True),
        "npy": str(tmp_path / "imgs.npy"),
        "png folder": write_pngs(tmp_path / "pngs", images),
    }
    np.save(forms["npy"], images)
    for form, path in forms.items():
        got, names = read_images(path)  # converted to MNIST's spec: (N, 1, 28, 28), the pixels untouched
        assert got.dtype == torch.uint8 and len(names) == 12, form
        np.testing.assert_array_equal(got.numpy(), images[:, None], err_msg=form)
    assert read_images(forms["png folder"])[1][:2] == ["digit000.png", "digit001.png"]
    one, names = read_images(tmp_path / "pngs" / "digit003.png")
    np.testing.assert_array_equal(one.numpy(), images[3:4, None])
    assert names == ["digit003.png"]
    # JPEG is lossy: the same digit, within a few grey levels on average
    jpg, _ = read_images(write_pngs(tmp_path / "jpgs", images[:2], ".jpg"))
    assert float(np.abs(jpg.numpy()[:, 0].astype(float) - images[:2]).mean()) < 8


def test_csv_output_and_printed_rows(model_file, data, cfg, tmp_path, capsys):
    path = write_idx3(tmp_path / "few-idx3-ubyte", data.test_images[:5].numpy())
    out_csv = tmp_path / "out" / "labels.csv"
    assert main(["predict", f"predict.model={model_file}", f"predict.input={path}", f"predict.output={out_csv}"]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == [f"few-idx3-ubyte:{i}" for i in range(5)]
    assert all(r["label"] in "0123456789" and 0.1 <= float(r["confidence"]) <= 1.0 for r in rows)
    captured = capsys.readouterr()
    assert captured.out == ""  # written to the file, not printed
    assert "[predict] 5 images" in captured.err and str(out_csv) in captured.err
    # without predict.output the CSV goes to stdout, the summary to stderr
    assert main(["predict", f"predict.model={model_file}", f"predict.input={path}"]) == 0
    printed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert printed == rows


# ------------------------------------------------------------------ models from MLflow


@pytest.fixture(scope="module")
def mlflow_runs(cfg, trained, model_file, data):
    """A run with a logged MLflow model (and registered), and an older-style run with only model/model.pt."""
    from mlflow.tracking import MlflowClient

    from toolkit.tracking import logged_models as mlflow_models
    from toolkit.tracking.stores import tracking_uri

    uri = tracking_uri(cfg.execution)
    client = MlflowClient(tracking_uri=uri)
    # artifacts beside the store: left to MLflow they would go to ./mlruns in the current folder
    artifacts = Path(uri[len("sqlite:///"):]).parent / "artifacts"
    exp = client.create_experiment("predict-test", artifact_location=artifacts.as_uri())
    with_model = client.create_run(exp).info.run_id
    model_uri = mlflow_models.log_classifier(uri, with_model, trained, input_example=data.test_images[:3],
                                             registered_name="predict-test")
    artifact_only = client.create_run(exp).info.run_id
    client.log_artifact(artifact_only, model_file, "model")
    encoder_run = client.create_run(exp).info.run_id
    encoder_uri = mlflow_models.log_encoder(uri, encoder_run, SimCLRModel(cfg.model))
    return {"with_model": with_model, "model_uri": model_uri, "artifact_only": artifact_only,
            "encoder_uri": encoder_uri, "encoder_run": encoder_run}


def test_models_from_mlflow_run_ids_and_uris(cfg, mlflow_runs, data, reference, tmp_path):
    path = write_idx3(tmp_path / "imgs-idx3-ubyte", data.test_images[:50].numpy())
    refs = {
        "run id (MLflow model)": mlflow_runs["with_model"],
        "run id (model.pt artifact)": mlflow_runs["artifact_only"],
        "models:/<model id>": mlflow_runs["model_uri"],
        "runs:/<id>/model": f"runs:/{mlflow_runs['with_model']}/model",
        "models:/<name>/<version>": "models:/predict-test/1",
        "models:/<name>@best": "models:/predict-test@best",
    }
    for what, ref in refs.items():
        run_cfg = cfg.replace(**{"predict.model": ref, "predict.input": path, "predict.output": str(tmp_path / "o.csv")})
        out = predict(run_cfg.study, run_cfg.execution)
        np.testing.assert_allclose(out.probs, reference[:50], atol=1e-5, err_msg=what)
        assert (out.labels == reference[:50].argmax(1)).mean() >= 0.98, what  # a near-tie may flip


# ------------------------------------------------------------------ bad input: one line, exit 2


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, data, cfg):
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.png").write_text("not a picture")  # any size is converted now: a non-image is what is refused
    np.save(d / "floats.npy", data.test_images[:3].numpy() / 255.0)
    np.save(d / "wrong_shape.npy", np.zeros((3, 5, 32, 32), np.uint8))  # 5 channels in neither layout
    labels = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    (d / "labels-idx1-ubyte").write_bytes(labels)
    (d / "truncated-idx3-ubyte").write_bytes(open(write_idx3(d / "full", data.test_images[:3].numpy()), "rb").read()[:-10])
    (d / "notes.txt").write_text("hello")
    (d / "empty").mkdir()
    checkpoints.save(d / "simclr.pt", checkpoints.model_payload("simclr", cfg.study.to_dict(), SimCLRModel(cfg.model).state_dict()))
    bad_recipe = {"views": 4, "augment": {"strength": 0.5, "swirl": 3.0}}  # a key no augmentation has
    checkpoints.save(d / "bad_tta.pt", checkpoints.model_payload("classifier", cfg.study.to_dict(), Classifier(cfg.model).state_dict(),
                                                                 tta=bad_recipe))
    return d


@pytest.mark.parametrize("model, images, error, words", [
    ("MODEL", "broken.png", DataError, "not a readable image"),
    ("MODEL", "missing.idx3", DataError, "no such file"),
    ("MODEL", "floats.npy", DataError, "dtype float64, expected uint8"),
    ("MODEL", "wrong_shape.npy", DataError, "shape (3, 5, 32, 32)"),
    ("MODEL", "labels-idx1-ubyte", DataError, "idx1 (labels) file"),
    ("MODEL", "truncated-idx3-ubyte", DataError, "truncated"),
    ("MODEL", "notes.txt", DataError, "unknown format"),
    ("MODEL", "empty", DataError, "no PNG/JPEG images"),
    ("missing-model.pt", "IMAGES", CheckpointError, "no such file, and not an MLflow run id or model URI"),
    ("simclr.pt", "IMAGES", CheckpointError, "SimCLR encoder gives features"),
    ("bad_tta.pt", "IMAGES", CheckpointError, "unreadable test-time augmentation recipe"),
    ("models:/no-such-model/1", "IMAGES", CheckpointError, "not a loadable MLflow model"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "IMAGES", CheckpointError, "not a loadable MLflow model"),
    ("0123456789abcdef0123456789abcdef", "IMAGES", CheckpointError, "no MLflow run with this id"),
    ("", "IMAGES", ConfigError, "predict.model is empty"),
])
def test_bad_input_is_one_line_and_exit_2(cfg, bad_files, model_file, data, tmp_path, capsys, model, images, error, words):
    images_path = write_idx3(tmp_path / "ok-idx3-ubyte", data.test_images[:3].numpy()) if images == "IMAGES" else str(bad_files / images)
    model_ref = model_file if model == "MODEL" else (str(bad_files / model) if model.endswith(".pt") else model)
    run_cfg = cfg.replace(**{"predict.model": model_ref, "predict.input": images_path})
    with pytest.raises(error, match=__import__("re").escape(words)):
        predict(run_cfg.study, run_cfg.execution)
    # the CLI: one line on stderr, exit code 2, nothing on stdout
    over = [f"{k}={v}" for k, v in {"predict.model": model_ref, "predict.input": images_path,
                                    "tracking.uri": cfg.tracking.uri, "run.output_dir": cfg.run.output_dir}.items()]
    assert main(["predict", *over]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("toolkit predict: error:") and words in err[0], captured.err
    assert captured.out == ""


def test_an_mlflow_encoder_is_refused(cfg, mlflow_runs, data, tmp_path):
    path = write_idx3(tmp_path / "imgs-idx3-ubyte", data.test_images[:3].numpy())
    with pytest.raises(CheckpointError, match="SimCLR encoder"):
        run_cfg = cfg.replace(**{"predict.model": mlflow_runs["encoder_uri"], "predict.input": path})
        predict(run_cfg.study, run_cfg.execution)
    # a run that logged only an encoder has no classifier to offer
    with pytest.raises(CheckpointError, match="has no classifier"):
        run_cfg = cfg.replace(**{"predict.model": mlflow_runs["encoder_run"], "predict.input": path})
        predict(run_cfg.study, run_cfg.execution)


def test_predict_is_a_cli_command_and_a_submit_command():
    import importlib.util
    from pathlib import Path

    from toolkit.cli import COMMANDS, build_parser

    assert "predict" in COMMANDS
    assert "predict.model" in build_parser()._subparsers._group_actions[0].choices["predict"].epilog
    spec = importlib.util.spec_from_file_location("submit", Path(__file__).resolve().parents[1] / "launch" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    assert "predict" in submit.COMMANDS


def test_a_student_file_predicts_with_its_test_time_augmentation(trained, cfg, data, reference, tmp_path):
    """A model file that carries a TTA recipe (the student's) predicts as the mean over its views;
    the same weights without the recipe predict plainly."""
    from toolkit.engine.loops import predict_probs_tta, tta_recipe

    recipe = tta_recipe(cfg.augment, 4, 0.5)
    path = tmp_path / "student.pt"
    checkpoints.save(path, checkpoints.model_payload("classifier", cfg.study.to_dict(), trained.state_dict(), tta=recipe))
    images = write_idx3(tmp_path / "imgs-idx3-ubyte", data.test_images.numpy())
    out = predict_images(str(path), images)
    from dataclasses import replace
    expected = predict_probs_tta(trained, data.test_images, replace(cfg.augment, strength=0.5), views=4).numpy()
    np.testing.assert_allclose(out.probs, expected, atol=1e-5)
    assert np.abs(out.probs - reference).max() > 1e-3  # not the plain predictions
    acc = float((out.labels == data.test_labels.numpy()).mean())
    assert acc > 0.6, acc


# ------------------------------------------------------------------ any dataset: colour, any size, class names

COLOUR_SPEC_ARGS = (3, 32, 4, (0.5,) * 3, (0.25,) * 3)
COLOUR_NAMES = ["cat", "dog", "ship", "truck"]


@pytest.fixture(scope="module")
def colour_model(cfg, tmp_path_factory):
    """A 3-channel 32 px classifier of 4 named classes, saved as a stage saves it (``input``, ``class_names``)."""
    from toolkit.datasets.spec import ImageSpec

    spec = ImageSpec(*COLOUR_SPEC_ARGS)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = Classifier(cfg.model, spec)
        # a few steps on random colour images: BatchNorm statistics move, the head is not uniform
        model.train()(torch.rand(32, 3, 32, 32))
    path = tmp_path_factory.mktemp("colour") / "model.pt"
    checkpoints.save(path, checkpoints.model_payload("classifier", cfg.study.to_dict(), model.state_dict(),
                                                     input=spec.to_dict(), class_names=COLOUR_NAMES))
    return model.eval(), str(path)


def mixed_pictures(folder: Path) -> list[Path]:
    """Images of several sizes (none 32 px, some not square) and modes, as PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {
        "a_rgb.png": Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)),
        "b_gray.png": Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
        "c_rgba.png": Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA"),
        "d_palette.png": Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).convert("P"),
        "e_photo.jpg": Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)),
        "f_gray16.png": Image.fromarray(rng.integers(0, 65536, (28, 28), dtype=np.uint16)),
    }
    for name, im in pictures.items():
        im.save(folder / name)
    (folder / "notes.txt").write_text("not an image: skipped in a folder")
    return sorted(folder / name for name in pictures)


def test_a_colour_model_predicts_any_picture_with_its_class_names(colour_model, cfg, tmp_path, capsys):
    """Each picture is converted to the model's 3 x 32 x 32 by training's own conversion, and the
    label column holds the model file's class names."""
    from PIL import Image

    from toolkit.datasets.convert import image_to_chw

    model, path = colour_model
    files = mixed_pictures(tmp_path / "pictures")
    expected_pixels = []
    for f in files:
        with Image.open(f) as im:
            expected_pixels.append(image_to_chw(im, 32, 3))
    expected_pixels = torch.from_numpy(np.stack(expected_pixels))
    with torch.no_grad():
        reference = model(expected_pixels.float() / 255).softmax(1).numpy()

    out = predict_images(path, str(tmp_path / "pictures"))
    assert out.names == [f.name for f in files]
    assert out.class_names == tuple(COLOUR_NAMES)
    torch.testing.assert_close(torch.from_numpy(out.probs), torch.from_numpy(reference), atol=1e-5, rtol=1e-4)
    clear = np.diff(np.sort(reference, 1)[:, -2:], axis=1)[:, 0] > 1e-4  # a near-tie may flip with the last bits
    np.testing.assert_array_equal(out.labels[clear], reference.argmax(1)[clear])

    out_csv = tmp_path / "labels.csv"
    assert main(["predict", f"predict.model={path}", f"predict.input={tmp_path / 'pictures'}",
                 f"predict.output={out_csv}", f"run.output_dir={cfg.run.output_dir}"]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == out.names
    assert [r["label"] for r in rows] == [COLOUR_NAMES[int(y)] for y in out.labels]
    assert "per class {'cat'" in capsys.readouterr().err


def test_a_colour_model_takes_arrays_and_grey_digits(colour_model, data, tmp_path):
    """A .npy in channels-last layout and an idx3 of 28 px grey digits are converted like files are."""
    from toolkit.datasets.convert import array_to_chw
    from toolkit.datasets.spec import ImageSpec

    model, path = colour_model
    hwc = np.random.default_rng(1).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "hwc.npy", hwc)
    digits = write_idx3(tmp_path / "digits-idx3-ubyte", data.test_images[:5].numpy())
    for source, want in ((str(tmp_path / "hwc.npy"), [array_to_chw(x.transpose(2, 0, 1), 32, 3) for x in hwc]),
                         (digits, [array_to_chw(x[None], 32, 3) for x in data.test_images[:5].numpy()])):
        pixels = torch.from_numpy(np.stack(want))
        with torch.no_grad():
            reference = model(pixels.float() / 255).softmax(1)
        out = predict_images(path, source)
        torch.testing.assert_close(torch.from_numpy(out.probs), reference, atol=1e-5, rtol=1e-4)
    # a grey digit becomes three equal planes, 32 px
    got, _ = read_images(digits, ImageSpec(*COLOUR_SPEC_ARGS))
    assert got.shape == (5, 3, 32, 32) and bool((got[:, 0] == got[:, 2]).all())
