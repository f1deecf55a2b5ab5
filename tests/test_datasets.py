"""The dataset registry on tiny datasets written here in each on-disk format: idx files, CIFAR-10's
pickled batches, npz / npy arrays, and scikit-learn's real 8x8 digit scans as a PNG folder.

Nothing is downloaded. The folder reader's bad-input and cache tests are in test_datasets_folder.py.
"""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
from PIL import Image

from toolkit.datasets import DataError, check_labels_per_class, load_dataset
from toolkit.datasets import cache, registry
from toolkit.errors import describe_error

IDX = registry._IDX_FILES


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """An idx file as MNIST's: magic (0, 0, 0x08 = unsigned bytes, ndim), big-endian dims, the bytes."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_idx_dataset(root, subdir: str, n_train: int = 30, n_test: int = 10, gz: bool = False):
    rng = np.random.default_rng(0)
    x, tx = rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 256, (n_test, 28, 28))
    y, ty = np.arange(n_train) % 10, np.arange(n_test)[::-1] % 10
    for name, a in zip(IDX, (x, y, tx, ty)):
        write_idx(root / subdir / name, a, gz)
    return x, y, tx, ty


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_idx_benchmarks_load_with_their_classes(tmp_path, name):
    subdir = registry.BENCHMARKS[name].subdir
    x, y, tx, ty = make_idx_dataset(tmp_path, subdir, gz=(name == "kmnist"))
    ds = load_dataset(name, tmp_path, cache_dir=tmp_path / "cache")
    assert ds.labeled.shape == (30, 1, 28, 28) and ds.labeled.dtype == np.uint8
    assert np.array_equal(ds.labeled[:, 0], x) and np.array_equal(ds.test[:, 0], tx)
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, y) and np.array_equal(ds.test_labels, ty)
    assert ds.unlabeled.shape == (0, 1, 28, 28)
    info = ds.info
    assert (info.kind, info.channels, info.image_size, info.num_classes) == ("benchmark", 1, 28, 10)
    assert info.class_names == registry.BENCHMARKS[name].class_names
    assert info.flips_allowed == (name == "fashion_mnist")
    assert info.mean[0] == pytest.approx(x.mean() / 255, abs=1e-4)
    assert info.std[0] == pytest.approx(x.std() / 255, abs=1e-4)
    assert not (tmp_path / "cache").exists()  # no conversion asked: nothing cached


def test_idx_reader_matches_the_real_mnist_and_toolkit_data(data_root):
    from toolkit.datasets.mnist import load_mnist

    ds = load_dataset("mnist", data_root)
    mnist = load_mnist(data_root, test_subset=100)
    assert ds.labeled.shape == (60000, 1, 28, 28) and ds.info.mean == (0.1307,) and ds.info.std == (0.3081,)
    assert np.array_equal(ds.labeled[:, 0], mnist.train_images.numpy())
    assert np.array_equal(ds.test_labels[:100], mnist.test_labels.numpy())


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:-1], "truncated or corrupt"),
    (lambda b: b[:10], "less than its 16-byte header"),
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "magic number 2307, expected 2051"),
])
def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path, damage, words):
    make_idx_dataset(tmp_path, "MNIST/raw")
    path = tmp_path / "MNIST/raw" / IDX[0]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    assert words in str(err.value) and str(path) in str(err.value)
    assert describe_error(err.value) == str(err.value) and "\n" not in str(err.value)


def test_download_is_asked_only_for_missing_files(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(registry, "_download", lambda name, base: asked.append((name, base)))
    make_idx_dataset(tmp_path, "FashionMNIST/raw")
    assert load_dataset("fashion_mnist", tmp_path, download=True).labeled.shape == (30, 1, 28, 28)
    assert asked == []
    with pytest.raises(DataError, match="CIFAR-10 file missing"):
        load_dataset("cifar10", tmp_path, download=True)  # the stand-in downloader fetched nothing
    assert asked == [("cifar10", tmp_path)]


def test_a_missing_benchmark_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="KMNIST file missing: .*run.download=true"):
        load_dataset("kmnist", tmp_path)


def test_conversion_goes_through_the_cache_once(tmp_path, monkeypatch):
    x, *_ = make_idx_dataset(tmp_path, "MNIST/raw", n_train=12, n_test=4)
    calls = []
    real = registry.array_to_chw
    monkeypatch.setattr(registry, "array_to_chw", lambda *a: calls.append(1) or real(*a))
    ds = load_dataset("mnist", tmp_path, image_size=32, channels=3, cache_dir=tmp_path / "cache")
    assert ds.labeled.shape == (12, 3, 32, 32) and ds.test.shape == (4, 3, 32, 32) and len(calls) == 16
    assert isinstance(ds.labeled, np.memmap) and ds.info.mean[0] == ds.info.mean[1] == ds.info.mean[2]
    # gray to colour repeats the plane; a 28 -> 32 resize keeps the picture (correlated with the original)
    assert np.array_equal(ds.labeled[:, 0], ds.labeled[:, 2])
    small = np.asarray(Image.fromarray(ds.labeled[0, 0]).resize((28, 28), Image.Resampling.BILINEAR), np.float64)
    assert np.corrcoef(small.ravel(), x[0].ravel())[0, 1] > 0.5
    again = load_dataset("mnist", tmp_path, image_size=32, channels=3, cache_dir=tmp_path / "cache")
    assert len(calls) == 16 and np.array_equal(again.labeled, ds.labeled) and again.info == ds.info


def write_cifar(root, n: int = 4, protocol: int = 2, byte_keys: bool = False):
    """cifar-10-batches-py as torchvision downloads it: five training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = (lambda k: k.encode()) if byte_keys else (lambda k: k)
    batches = {}
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batches[name] = (data, labels)
        entry = {key("batch_label"): name, key("labels"): labels, key("data"): data,
                 key("filenames"): [f"img{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {key("num_cases_per_batch"): n, key("label_names"): names, key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return batches, names


@pytest.mark.parametrize("protocol, byte_keys", [(2, False), (2, True), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar10_batches_load_as_3x32x32(tmp_path, protocol, byte_keys):
    batches, names = write_cifar(tmp_path, protocol=protocol, byte_keys=byte_keys)
    ds = load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert ds.labeled.shape == (20, 3, 32, 32) and ds.test.shape == (4, 3, 32, 32)
    assert ds.info.class_names == tuple(names) and ds.info.channels == 3 and ds.info.flips_allowed
    first, labels = batches["data_batch_1"]
    # a row is the red, green then blue 32x32 planes
    assert np.array_equal(ds.labeled[0, 1], first[0, 1024:2048].reshape(32, 32))
    assert ds.labels[:4].tolist() == labels and ds.test_labels.tolist() == batches["test_batch"][1]


side_effects: list[str] = []


def record_side_effect(text: str) -> str:
    side_effects.append(text)
    return text


class _Payload:
    def __reduce__(self):
        return record_side_effect, ("unpickled and ran",)


def test_a_cifar_batch_naming_another_global_is_refused_unrun(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    entry = pickle.loads(path.read_bytes())
    entry["batch_label"] = _Payload()
    path.write_bytes(pickle.dumps(entry, protocol=2))
    refused = r"CIFAR-10 file refused: .*data_batch_3: global '.*record_side_effect' is not allowed"
    with pytest.raises(DataError, match=refused):
        load_dataset("cifar10", tmp_path)
    assert side_effects == []


def test_cifar_labels_out_of_range_name_the_file(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["labels"][0] = 12
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=r"labels corrupt in .*test_batch: labels span \(\d+, 12\)"):
        load_dataset("cifar10", tmp_path)


def test_npz_with_unknown_labels_is_a_real_dataset(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.random((12, 10, 10, 3))  # floats in [0, 1], channels last
    labels = np.array([0, 1, 2, -1, 0, 1, 2, -1, -1, 0, 1, 2])
    np.savez(tmp_path / "d.npz", images=images, labels=labels, class_names=np.array(["ant", "bee", "cow"]),
             test_images=(images[:2] * 255).astype(np.uint8), test_labels=np.array([2, 0]))
    ds = load_dataset("npz", tmp_path / "d.npz", cache_dir=tmp_path / "cache")
    assert ds.info.kind == "real" and ds.info.class_names == ("ant", "bee", "cow")
    assert ds.labeled.shape == (9, 3, 10, 10) and ds.unlabeled.shape == (3, 3, 10, 10)
    assert ds.test.shape == (2, 3, 10, 10)
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2] and ds.test_labels.tolist() == [2, 0]
    assert np.array_equal(ds.unlabeled[0], np.rint(images[3] * 255).astype(np.uint8).transpose(2, 0, 1))
    check_labels_per_class(ds, 3)
    with pytest.raises(DataError, match=r"class 'ant' has 3 labeled images, fewer than split.labels_per_class=4"):
        check_labels_per_class(ds, 4)


def test_npy_folder_without_labels_is_memory_mapped(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (7, 1, 9, 9), dtype=np.uint8)
    (tmp_path / "arrays").mkdir()
    np.save(tmp_path / "arrays" / "images.npy", images)
    ds = load_dataset("npz", tmp_path / "arrays", cache_dir=tmp_path / "cache")
    assert ds.labels is None and ds.labeled.shape == (0, 1, 9, 9) and ds.info.class_names == ()
    assert isinstance(ds.unlabeled, np.memmap) and np.array_equal(ds.unlabeled, images)
    assert ds.info.mean[0] == pytest.approx(images.mean() / 255, abs=1e-4)
    resized = load_dataset("npz", tmp_path / "arrays", image_size=4, cache_dir=tmp_path / "cache")
    assert resized.unlabeled.shape == (7, 1, 4, 4) and resized.info.digest != ds.info.digest


@pytest.mark.parametrize("arrays, words", [
    ({"images": np.zeros((3, 4, 4)), "labels": np.array([1, 1, -1])}, "the known labels name one class ('1')"),
    ({"image": np.zeros((3, 4, 4))}, "unknown array 'image'"),
    ({"images": np.full((3, 4, 4), 300)}, "int64 pixels in [300, 300]"),
    ({"images": np.zeros((3, 4, 4)), "labels": np.array([0, 1])}, "expected 3 integer labels"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 1]), "class_names": np.array(["a/b", "c"])},
     "class name 'a/b'"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "test_images": np.zeros((1, 4, 4), np.uint8)}, "come together"),
])
def test_bad_arrays_are_one_line(tmp_path, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_dataset("npz", tmp_path / "bad.npz", cache_dir=tmp_path / "cache")
    assert words in str(err.value) and "bad.npz" in str(err.value)


def test_an_object_array_is_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", images=np.array([{"x": 1}], dtype=object))
    with pytest.raises(DataError, match="cannot read array file .*obj.npz"):
        load_dataset("npz", tmp_path / "obj.npz")


def test_registry_refuses_unknown_names_and_targets(tmp_path):
    with pytest.raises(DataError, match="data.name='imagenet' is not a registered dataset: choose one of mnist"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="data.image_size=0 is not allowed"):
        load_dataset("mnist", tmp_path, image_size=0)
    with pytest.raises(DataError, match="data.channels=2 is not allowed"):
        load_dataset("mnist", tmp_path, channels=2)
    with pytest.raises(DataError, match="data.name=folder needs run.data_root"):
        load_dataset("folder", "")


def test_chunks_give_the_same_bytes_under_a_small_limit(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (23, 3, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    limit = 4 * images[0].nbytes + 7  # 4 images a chunk
    chunks = list(cache.iter_chunks(mapped, limit))
    assert [start for start, _ in chunks] == [0, 4, 8, 12, 16, 20]
    assert all(c.nbytes <= limit and not isinstance(c, np.memmap) for _, c in chunks)
    assert np.concatenate([c for _, c in chunks]).tobytes() == images.tobytes()
    assert cache.residency(images.nbytes, limit) == "streamed" and cache.residency(images.nbytes, 10**9) == "resident"
    assert cache.memory_budget("cpu") > 0
    with pytest.raises(ValueError, match="more than max_bytes"):
        next(cache.iter_chunks(mapped, 10))


def test_sklearn_digits_as_a_png_folder_come_back_as_scanned(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 scans -> 0..255, the documented scaling
    chosen = [np.flatnonzero(digits.target == d)[:5] for d in range(10)]
    pool = np.arange(200, 230)
    for d, rows in enumerate(chosen):
        (tmp_path / "digits" / "labeled" / str(d)).mkdir(parents=True)
        for i in rows:
            Image.fromarray(pixels[i]).save(tmp_path / "digits" / "labeled" / str(d) / f"{i:04d}.png")
    (tmp_path / "digits" / "unlabeled").mkdir()
    for i in pool:
        Image.fromarray(pixels[i]).save(tmp_path / "digits" / "unlabeled" / f"{i:04d}.png")
    ds = load_dataset("folder", tmp_path / "digits", cache_dir=tmp_path / "cache")
    rows = np.concatenate(chosen)
    assert ds.info.class_names == tuple(str(d) for d in range(10)) and (ds.info.image_size, ds.info.channels) == (8, 1)
    assert np.array_equal(ds.labeled[:, 0], pixels[rows]) and np.array_equal(ds.labels, digits.target[rows])
    assert np.array_equal(ds.unlabeled[:, 0], pixels[pool]) and ds.labeled_files[0] == "labeled/0/0000.png"
    # resized, the folder and the same pixels as an array give the same bytes
    np.savez(tmp_path / "digits.npz", images=pixels[rows], labels=digits.target[rows])
    big = load_dataset("folder", tmp_path / "digits", image_size=16, cache_dir=tmp_path / "cache")
    same = load_dataset("npz", tmp_path / "digits.npz", image_size=16, cache_dir=tmp_path / "cache")
    assert big.labeled.shape == (50, 1, 16, 16) and np.array_equal(big.labeled, same.labeled)
    block_means = big.labeled[:, 0].reshape(50, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.corrcoef(block_means.ravel(), pixels[rows].ravel())[0, 1] > 0.95


def test_two_writers_of_one_entry_leave_one_complete_copy(tmp_path):
    images = np.arange(2 * 1 * 3 * 3, dtype=np.uint8).reshape(2, 1, 3, 3)
    with cache.CacheWriter(tmp_path, "k") as first, cache.CacheWriter(tmp_path, "k") as second:
        for writer in (first, second):
            writer.array("labeled", images.shape)[:] = images
        first.commit({"by": "first"})
        second.commit({"by": "second"})  # finds the entry published: keeps it
    arrays, meta = cache.open_cached(tmp_path, "k")
    assert meta["by"] == "first" and np.array_equal(arrays["labeled"], images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary folder left
