"""The whole pipeline on data that is not MNIST: a folder of real 8x8 digit scans (scikit-learn's
``load_digits``, saved as PNG and JPEG in mixed sizes and modes), an ``.npz`` with unknown labels,
and CIFAR-10 / Fashion-MNIST files in their download layouts (tiny, generated here).

Each run is in-process (``toolkit.cli.main``) with tiny settings; decoded images go to a cache in
``tmp_path`` (``$TOOLKIT_CACHE_DIR``), never the home folder. The Ray-backed run is ``slow``.
"""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_datasets import write_idx  # the idx writer of the registry's own tests (tests/ is on sys.path)

DIGIT_CLASSES = tuple(str(d) for d in range(10))
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# measured to run in seconds on the CPU; every test adds its data and extra keys
TINY = ["run.backend=local", "inference.backend=local", "run.device=cpu", "model.width=8", "pretrain.epochs=1",
        "pretrain.batch_size=64", "classifier.steps=20", "classifier.eval_every=10", "pseudolabel.rounds=2",
        "pseudolabel.steps_per_round=20", "student.steps=20", "pipeline.seeds=[0]",
        "pipeline.stages=[pretrain,probe,iterative,student]", "split.labels_per_class=3", "student.tta_views=1",
        "tracking.tsne_points=0"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Decoded images in this test's folder; torch on one thread (two busy cores)."""
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_pipeline(tmp_path: Path, *args: str) -> int:
    from toolkit.cli import main

    return main(["pipeline", *TINY, f"run.output_dir={tmp_path / 'runs'}",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *args])


# --------------------------------------------------------------------------- data writers

def digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 scans as uint8 (0..16 scaled to 0..255) and their digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def _variant(pixels: np.ndarray, i: int) -> tuple[Image.Image, str, dict]:
    """Scan ``pixels`` as one of six file kinds, by ``i``: (image, suffix, save options).

    PNG L 8x8, JPEG L 12x12, PNG RGB 9x7, PNG palette 8x8, PNG RGBA 12x12 (opaque), JPEG RGB 8x8."""
    gray = Image.fromarray(pixels)
    kind = i % 6
    if kind == 0:
        return gray, ".png", {}
    if kind == 1:
        return gray.resize((12, 12), Image.Resampling.BILINEAR), ".jpg", {"quality": 95}
    if kind == 2:
        return gray.convert("RGB").resize((9, 7), Image.Resampling.BILINEAR), ".png", {}
    if kind == 3:
        return gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64), ".png", {}
    if kind == 4:
        rgba = gray.convert("RGBA").resize((12, 12), Image.Resampling.BILINEAR)
        rgba.putalpha(255)
        return rgba, ".png", {}
    return gray.convert("RGB"), ".jpg", {"quality": 95}


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def write_digits_folder(root: Path, labeled_per_class: int = 4, unlabeled: int = 90, test_per_class: int = 0,
                        classes: tuple[int, ...] = tuple(range(10))) -> list[str]:
    """``root``/labeled/<digit>/, unlabeled/ (some one folder deeper) and, if asked, test/<digit>/ of real
    digit scans in mixed formats, sizes and modes; returns the unlabeled files relative to unlabeled/."""
    pixels, target = digit_pixels()
    used = 0
    for c in classes:
        rows = np.flatnonzero(target == c)
        for i in rows[:labeled_per_class]:
            image, suffix, options = _variant(pixels[i], used)
            _save(root / "labeled" / str(c) / f"{i:04d}{suffix}", image, **options)
            used += 1
        for i in rows[labeled_per_class: labeled_per_class + test_per_class]:
            image, suffix, options = _variant(pixels[i], used)
            _save(root / "test" / str(c) / f"{i:04d}{suffix}", image, **options)
            used += 1
    taken = {int(p.stem) for p in root.rglob("*.*")}
    pool = [i for i in range(len(pixels)) if i not in taken and int(target[i]) in classes][:unlabeled]
    names = []
    for k, i in enumerate(pool):
        image, suffix, options = _variant(pixels[i], k)
        name = f"{'batch2/' if k % 3 == 0 else ''}{i:04d}{suffix}"
        _save(root / "unlabeled" / name, image, **options)
        names.append(name)
    return names


def write_fake_cifar(root: Path, per_batch: int = 60, test: int = 60) -> None:
    """``root``/cifar-10-batches-py as torchvision downloads it (five training batches, test_batch,
    batches.meta), tiny: class c is a filled square of colour ``c`` at a position of its own on noise."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    palette = rng.integers(40, 256, (10, 3))

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = (np.arange(n) % 10)[rng.permutation(n)]
        x = rng.integers(0, 60, (n, 3, 32, 32), dtype=np.int64)
        for j, c in enumerate(labels):
            top, left = 2 + 6 * (c // 4), 2 + 8 * (c % 4)
            x[j, :, top: top + 10, left: left + 10] = palette[c][:, None, None]
        return x.astype(np.uint8).reshape(n, 3072), [int(c) for c in labels]

    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        data, labels = images(n)
        entry = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{name}_{j}.png" for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR_CLASSES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_fake_fashion(root: Path, n_train: int = 300, n_test: int = 100) -> None:
    """``root``/FashionMNIST/raw: the four idx files, 28x28, class c a bar of its own on noise."""
    rng = np.random.default_rng(6)
    raw = root / "FashionMNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10)[rng.permutation(n)]
        x = rng.integers(0, 50, (n, 28, 28))
        for j, c in enumerate(labels):
            x[j, 2 + 2 * c: 5 + 2 * c, 3:25] = 230
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


# --------------------------------------------------------------------------- what a run left

def stage_model(tmp_path: Path, stage: str) -> dict:
    (path,) = sorted((tmp_path / "runs" / "stages").glob(f"{stage}-*/model.pt"))
    return torch.load(path, map_location="cpu", weights_only=True)


def stage_results(tmp_path: Path) -> dict[str, dict]:
    """{stage name (pretrain, probe, pseudolabel-iterative, student): result.json} of every finished stage."""
    import json

    out = {}
    for p in (tmp_path / "runs" / "stages").glob("*/result.json"):
        d = json.loads(p.read_text())
        out[d["stage"]] = d
    return out


def mlflow_runs(tmp_path: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=1000)


def read_pool_labels(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- a folder of real digits

def test_a_folder_of_digit_scans_is_labeled_end_to_end(tmp_path):
    """40 labeled scans and 90 unlabeled ones, PNG / JPEG, L / RGB / P / RGBA, 8x8 / 12x12 / 9x7, made 16x16 gray
    (``data.channels=1`` is stated: a palette or RGB file makes a folder's default 3 channels)."""
    root = tmp_path / "digits"
    pool = write_digits_folder(root)
    rc = run_pipeline(tmp_path, "data.name=folder", f"run.data_root={root}", "data.image_size=16", "data.channels=1")
    assert rc == 0

    rows = read_pool_labels(tmp_path / "runs" / "pool_labels.csv")
    files = [r["file"] for r in rows]
    assert sorted(files) == sorted(pool) and len(files) == len(set(files)) == 90  # each unlabeled file once
    assert {r["label"] for r in rows} <= set(DIGIT_CLASSES)
    conf = [float(r["confidence"]) for r in rows]
    assert all(0.0 <= c <= 1.0 for c in conf) and conf == sorted(conf)  # the most doubtful first

    model = stage_model(tmp_path, "student")
    spec = model["input"]
    assert (spec["channels"], spec["image_size"], spec["num_classes"]) == (1, 16, 10)
    assert len(spec["mean"]) == len(spec["std"]) == 1 and 0 < spec["mean"][0] < 1 and spec["std"][0] > 0
    assert list(model["class_names"]) == list(DIGIT_CLASSES)

    client, runs = mlflow_runs(tmp_path)
    staged = [r for r in runs if "toolkit.stage" in r.data.tags]
    assert {r.data.tags["toolkit.stage"] for r in staged} == {"pretrain", "probe", "iterative", "student"}
    for r in staged:
        assert (r.data.tags.get("data.kind"), r.data.tags.get("split.kind")) == ("real", "real"), r.data.tags
    for r in runs:  # no pool label exists: a diagnostic read from one would be invented
        for key in r.data.metrics:  # diagnostic/..., round/diagnostic/..., final/diagnostic/...
            if key.startswith("diagnostic/") or "/diagnostic/" in key:
                values = [m.value for m in client.get_metric_history(r.info.run_id, key)]
                assert not any(math.isfinite(v) for v in values), (r.data.tags.get("toolkit.stage"), key, values)
    (probe,) = [r for r in staged if r.data.tags["toolkit.stage"] == "probe"]
    assert 0.0 <= probe.data.metrics["estimate/linear_cv_acc"] <= 1.0
    results = stage_results(tmp_path)
    assert math.isnan(results["student"]["metrics"]["test_acc"])  # no test/ folder: no test figure
    m = results["pseudolabel-iterative"]["metrics"]
    assert m["pool_left"] + m["pseudo_labels"] == 90


def test_a_folder_with_a_test_set_reports_the_students_test_accuracy(tmp_path):
    root = tmp_path / "digits"
    write_digits_folder(root, unlabeled=60, test_per_class=3)
    rc = run_pipeline(tmp_path, "data.name=folder", f"run.data_root={root}", "data.image_size=16", "data.channels=1")
    assert rc == 0
    results = stage_results(tmp_path)
    assert math.isfinite(results["student"]["metrics"]["test_acc"])
    assert 0.0 <= results["student"]["metrics"]["test_acc"] <= 1.0
    assert math.isfinite(results["probe"]["metrics"]["linear_cv/test_acc"])


def test_a_student_smooths_by_the_pixels_without_any_pretraining(tmp_path, capsys):
    root = tmp_path / "digits"
    write_digits_folder(root, unlabeled=60)
    rc = run_pipeline(tmp_path, "data.name=folder", f"run.data_root={root}", "data.image_size=16", "data.channels=1",
                      "pipeline.stages=[iterative,student]", "student.smooth_space=pixels")
    assert rc == 0
    assert "kNN-smoothed (k=5) by the images' pixels" in capsys.readouterr().out
    results = stage_results(tmp_path)
    assert "student" in results and not any(k.startswith("pretrain") for k in results)  # no encoder was needed
    assert len(read_pool_labels(tmp_path / "runs" / "pool_labels.csv")) == 60


# --------------------------------------------------------------------------- arrays, CIFAR-10, Fashion-MNIST

def test_an_npz_with_unknown_labels_labels_each_of_them(tmp_path):
    pixels, target = digit_pixels()
    rows = np.concatenate([np.flatnonzero(target == c)[:4] for c in range(10)] + [np.arange(1000, 1070)])
    labels = target[rows].copy()
    labels[40:] = -1
    labels[[3, 17]] = -1  # unknown labels among the known ones too: still 3 per class known
    np.savez(tmp_path / "d.npz", images=pixels[rows], labels=labels,
             class_names=np.array([f"digit{c}" for c in range(10)]))
    rc = run_pipeline(tmp_path, "data.name=npz", f"run.data_root={tmp_path / 'd.npz'}")
    assert rc == 0
    table = read_pool_labels(tmp_path / "runs" / "pool_labels.csv")
    unknown = np.flatnonzero(labels == -1)
    assert len(table) == len(unknown) == 72
    files = [r["file"] for r in table]
    # each row named as the user's array names it: the rows whose label is -1, and no other
    assert sorted(files) == sorted(f"images[{i}]" for i in unknown)
    assert {r["label"] for r in table} <= {f"digit{c}" for c in range(10)}
    model = stage_model(tmp_path, "student")
    assert model["input"]["image_size"] == 8 and model["input"]["channels"] == 1
    assert list(model["class_names"]) == [f"digit{c}" for c in range(10)]


def test_cifar10_batches_run_the_pipeline_in_colour(tmp_path):
    write_fake_cifar(tmp_path / "data")
    rc = run_pipeline(tmp_path, "data.name=cifar10", f"run.data_root={tmp_path / 'data'}", "data.train_subset=300",
                      "data.test_subset=60", "split.val_size=30", "augment.hflip_prob=0.5", "probe.all_labels=false")
    assert rc == 0
    spec = stage_model(tmp_path, "pretrain")["input"]
    assert (spec["channels"], spec["image_size"], len(spec["mean"])) == (3, 32, 3)
    results = stage_results(tmp_path)
    assert math.isfinite(results["student"]["metrics"]["test_acc"])
    assert list(stage_model(tmp_path, "student")["class_names"]) == list(CIFAR_CLASSES)


def test_fashion_mnist_idx_files_run_the_pipeline(tmp_path):
    write_fake_fashion(tmp_path / "data")
    rc = run_pipeline(tmp_path, "data.name=fashion_mnist", f"run.data_root={tmp_path / 'data'}",
                      "split.val_size=30", "probe.all_labels=false")
    assert rc == 0
    results = stage_results(tmp_path)
    for stage in ("pseudolabel-iterative", "student"):
        assert math.isfinite(results[stage]["metrics"]["test_acc"]), stage
    assert stage_model(tmp_path, "student")["class_names"][0] == "T-shirt_top"


# --------------------------------------------------------------------------- on Ray

@pytest.fixture(scope="module")
def embedded_ray():
    """Ray as every command starts it (``init_ray``: 127.0.0.1, token, quiet workers), shut down after the module."""
    ray = pytest.importorskip("ray")
    from toolkit.config import Execution
    from toolkit.execution.backends import init_ray

    started = not ray.is_initialized()
    init_ray(Execution())
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_a_folder_on_ray_train_and_ray_data(tmp_path, embedded_ray):
    """Ray Train's 2 gloo workers train on the folder's images (carried to them through the object store,
    ``TrainJob.images``) and Ray Data's actor labels the pool, for pretraining and one pseudo-label round."""
    root = tmp_path / "digits"
    pool = write_digits_folder(root, unlabeled=60)
    rc = run_pipeline(tmp_path, "data.name=folder", f"run.data_root={root}", "data.image_size=16", "data.channels=1",
                      "run.backend=ray", "ray.num_workers=2", "inference.backend=ray", "inference.actors=1",
                      "pipeline.stages=[pretrain,iterative]", "pseudolabel.rounds=1")
    assert rc == 0
    results = stage_results(tmp_path)
    assert set(results) == {"pretrain", "pseudolabel-iterative"}
    spec = stage_model(tmp_path, "pseudolabel-iterative")["input"]
    assert (spec["channels"], spec["image_size"], spec["num_classes"]) == (1, 16, 10)
    m = results["pseudolabel-iterative"]["metrics"]
    assert m["pool_left"] + m["pseudo_labels"] == len(pool) == 60 and math.isnan(m["test_acc"])


# --------------------------------------------------------------------------- bad input: exit 2, one line

def _one_class(root: Path) -> None:
    write_digits_folder(root, classes=(3,), unlabeled=10)


def _too_few_labels(root: Path) -> None:
    write_digits_folder(root, labeled_per_class=4, unlabeled=10)
    for p in sorted((root / "labeled" / "7").iterdir())[:2]:
        p.unlink()


def _zero_bytes(root: Path) -> None:
    write_digits_folder(root, unlabeled=10)
    (root / "unlabeled" / "blank.png").write_bytes(b"")


def _all_labeled(root: Path) -> None:
    write_digits_folder(root, unlabeled=0)
    assert sorted(p.name for p in root.iterdir()) == ["labeled"]


BAD = {
    "one class": (_one_class, ["has one class ('3')", "at least two"]),
    "too few labels": (_too_few_labels, ["class '7' has 2 labeled images", "split.labels_per_class=3"]),
    "zero-byte image": (_zero_bytes, ["empty image file (0 bytes)", "unlabeled/blank.png"]),
    "nothing to label": (_all_labeled, ["no unlabeled images", "unlabeled/"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_exit_2_with_one_line(tmp_path, capsys, case):
    build, words = BAD[case]
    root = tmp_path / "digits"
    build(root)
    capsys.readouterr()
    rc = run_pipeline(tmp_path, "data.name=folder", f"run.data_root={root}", "data.image_size=16")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("toolkit pipeline: error: ")
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "runs" / "stages").exists()  # refused before any stage folder
