"""MNIST loading (shapes, dtypes, corrupt files named in the error) and the labeled / validation / pool split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from toolkit.cli import main
from toolkit.config import ConfigError
from toolkit.datasets.mnist import NUM_CLASSES, DataError, Mnist, load_mnist, make_split, resolve_root, to_float

IMAGES = "train-images-idx3-ubyte"
LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


@pytest.fixture(scope="module")
def mnist(data_root) -> Mnist:
    return load_mnist(data_root)


# --- the real files -------------------------------------------------------------------------


def test_full_mnist_shapes_and_dtypes(mnist):
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.shape == (60000,)
    assert mnist.test_labels.shape == (10000,)
    assert mnist.train_images.dtype == mnist.test_images.dtype == torch.uint8
    assert mnist.train_labels.dtype == mnist.test_labels.dtype == torch.int64
    for t in (mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels):
        assert t.is_contiguous()
    assert int(mnist.train_images.max()) == 255 and int(mnist.train_images.min()) == 0
    # every digit present, roughly balanced (MNIST: 5,421 to 6,742 per digit)
    counts = torch.bincount(mnist.train_labels, minlength=NUM_CLASSES)
    assert counts.sum() == 60000 and int(counts.min()) > 5000
    assert torch.bincount(mnist.test_labels, minlength=NUM_CLASSES).min() > 800
    # the first training label of MNIST is a 5, the first test label a 7
    assert int(mnist.train_labels[0]) == 5 and int(mnist.test_labels[0]) == 7


def test_subsets_are_the_first_images(mnist, mnist_small):
    assert mnist_small.train_images.shape == (3000, 28, 28)
    assert mnist_small.test_images.shape == (500, 28, 28)
    assert torch.equal(mnist_small.train_images, mnist.train_images[:3000])
    assert torch.equal(mnist_small.train_labels, mnist.train_labels[:3000])
    assert torch.equal(mnist_small.test_labels, mnist.test_labels[:500])


def test_to_moves_every_tensor(mnist_small):
    moved = mnist_small.to("cpu")
    assert isinstance(moved, Mnist)
    assert torch.equal(moved.test_images, mnist_small.test_images)
    # a meta copy: same shapes, no data (checks every field goes through .to)
    meta = mnist_small.to("meta")
    assert all(t.is_meta for t in (meta.train_images, meta.train_labels, meta.test_images, meta.test_labels))


def test_to_float(mnist_small):
    x = to_float(mnist_small.train_images[:8])
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.allclose(x[:, 0] * 255, mnist_small.train_images[:8].float())


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_root(str(tmp_path / "given")) == tmp_path / "given"
    assert resolve_root("") == tmp_path / "env"
    monkeypatch.delenv("TOOLKIT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_root("") == tmp_path / "data"
    assert resolve_root("~/x").is_absolute()


def test_load_mnist_uses_the_environment_variable(monkeypatch, data_root):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", data_root)
    assert load_mnist("", train_subset=10, test_subset=10).train_images.shape == (10, 28, 28)


# --- the split ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(mnist):
    return make_split(mnist.train_labels, labels_per_class=10, val_size=1000, seed=0)


def test_split_is_stratified(mnist, split):
    assert len(split.labeled) == 100
    counts = torch.bincount(mnist.train_labels[split.labeled], minlength=NUM_CLASSES)
    assert counts.tolist() == [10] * NUM_CLASSES


def test_split_is_a_partition(split):
    assert (len(split.labeled), len(split.val), len(split.pool)) == (100, 1000, 58900)
    everything = torch.cat([split.labeled, split.val, split.pool]).sort().values
    assert torch.equal(everything, torch.arange(60000))  # disjoint and covering
    for part in (split.labeled, split.val, split.pool):
        assert part.dtype == torch.int64
        assert torch.equal(part, part.sort().values)


def test_split_is_reproducible(mnist, split):
    again = make_split(mnist.train_labels.clone(), labels_per_class=10, val_size=1000, seed=0)
    for a, b in ((split.labeled, again.labeled), (split.val, again.val), (split.pool, again.pool)):
        assert torch.equal(a, b)


def test_split_depends_on_the_seed(mnist, split):
    other = make_split(mnist.train_labels, labels_per_class=10, val_size=1000, seed=1)
    assert not torch.equal(split.labeled, other.labeled)
    assert not torch.equal(split.val, other.val)
    assert torch.bincount(mnist.train_labels[other.labeled], minlength=NUM_CLASSES).tolist() == [10] * NUM_CLASSES


def test_split_ignores_the_global_rng(mnist, split):
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        again = make_split(mnist.train_labels, labels_per_class=10, val_size=1000, seed=0)
    assert torch.equal(split.labeled, again.labeled) and torch.equal(split.val, again.val)


def test_split_sizes_follow_the_arguments(mnist_small):
    s = make_split(mnist_small.train_labels, labels_per_class=3, val_size=200, seed=5)
    assert (len(s.labeled), len(s.val), len(s.pool)) == (30, 200, 3000 - 230)
    assert torch.bincount(mnist_small.train_labels[s.labeled], minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES
    assert (s.seed, s.labels_per_class) == (5, 3)


def test_split_save(tmp_path, mnist_small):
    import json

    s = make_split(mnist_small.train_labels, 10, 200, 0)
    d = json.loads(s.save(tmp_path / "a" / "split.json").read_text())
    assert d["sizes"] == {"labeled": 100, "val": 200, "pool": 2700}
    assert d["labeled"] == s.labeled.tolist() and (d["seed"], d["labels_per_class"]) == (0, 10)


def test_split_too_many_labels(mnist_small):
    with pytest.raises(ConfigError, match=r"^split\.labels_per_class=1000 .*class \d has only \d+ training images"):
        make_split(mnist_small.train_labels, labels_per_class=1000, val_size=10, seed=0)


def test_split_validation_too_large(mnist_small):
    with pytest.raises(ConfigError, match=r"^split\.val_size=2900 .*only 2900 images"):
        make_split(mnist_small.train_labels, labels_per_class=10, val_size=2900, seed=0)


# --- the synthetic files (conftest.fake_mnist_root) -------------------------------------------


def test_fake_mnist_loads_like_mnist(fake_config):
    from conftest import fake_digit_templates

    d, r = fake_config.data, fake_config.run
    fake = load_mnist(r.data_root, r.download, d.train_subset, d.test_subset)
    assert fake.train_images.shape == (3000, 28, 28) and fake.test_images.shape == (500, 28, 28)
    assert fake.train_images.dtype == torch.uint8 and fake.train_labels.dtype == torch.int64
    assert torch.bincount(fake.train_labels, minlength=NUM_CLASSES).min() > 250  # every prefix is balanced
    # each image is its label's template plus noise in [0, 40)
    diff = fake.train_images.int() - fake_digit_templates()[fake.train_labels].clamp(max=215).int()
    assert int(diff.min()) >= 0 and int(diff.max()) < 40
    s = fake_config.split
    split = make_split(fake.train_labels, s.labels_per_class, s.val_size, s.seed)
    assert len(split.labeled) == 10 * s.labels_per_class and len(split.val) == s.val_size


# --- corrupt and missing files (copies of the synthetic files: real digits do not matter) ------


def _raw_copy(root: str, dst: Path) -> Path:
    """A root whose MNIST/raw holds copies of the label files and links to the (large) image files."""
    src = Path(root) / "MNIST" / "raw"
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (LABELS, TEST_LABELS):
        shutil.copyfile(src / name, raw / name)
    for name in (IMAGES, TEST_IMAGES):
        os.symlink(src / name, raw / name)
    return raw


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # a link to the shared file: never write through it
    path.write_bytes(data)


def _header(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def test_link_copy_loads(fake_mnist_root, tmp_path):
    _raw_copy(fake_mnist_root, tmp_path)
    copy, original = load_mnist(str(tmp_path), train_subset=5), load_mnist(fake_mnist_root, train_subset=5)
    assert torch.equal(copy.train_labels, original.train_labels) and torch.equal(copy.train_images, original.train_images)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_mnist(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw" / IMAGES) in msg
    assert "TOOLKIT_DATA_DIR" in msg


@pytest.mark.parametrize("name", [IMAGES, LABELS, TEST_IMAGES, TEST_LABELS])
def test_missing_file(fake_mnist_root, tmp_path, name):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    (raw / name).unlink()
    with pytest.raises(DataError, match="missing") as e:
        load_mnist(str(tmp_path))
    assert str(raw / name) in str(e.value)


@pytest.mark.parametrize("name, keep", [
    (IMAGES, 16),  # header only
    (IMAGES, 16 + 28 * 28 * 100),  # 100 images of 60,000
    (TEST_IMAGES, 16 + 5),
    (LABELS, 8 + 59999),  # one label short
    (TEST_LABELS, 8),
])
def test_truncated_file(fake_mnist_root, tmp_path, name, keep):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    _replace(raw / name, _header(Path(fake_mnist_root) / "MNIST" / "raw" / name, keep))
    with pytest.raises(DataError, match="truncated") as e:
        load_mnist(str(tmp_path))
    assert str(raw / name) in str(e.value) and f"has {keep} bytes" in str(e.value)


@pytest.mark.parametrize("name, keep", [(IMAGES, 10), (LABELS, 3), (TEST_LABELS, 0)])
def test_file_shorter_than_its_header(fake_mnist_root, tmp_path, name, keep):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    _replace(raw / name, _header(Path(fake_mnist_root) / "MNIST" / "raw" / name, keep))
    with pytest.raises(DataError, match="header") as e:
        load_mnist(str(tmp_path))
    assert str(raw / name) in str(e.value)


def test_extra_bytes_are_corrupt(fake_mnist_root, tmp_path):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    (raw / TEST_LABELS).write_bytes((raw / TEST_LABELS).read_bytes() + b"\0")
    with pytest.raises(DataError, match="10009 bytes, expected 10008") as e:
        load_mnist(str(tmp_path))
    assert str(raw / TEST_LABELS) in str(e.value)


@pytest.mark.parametrize("name, magic", [(LABELS, 2051), (TEST_LABELS, 0), (IMAGES, 2049)])
def test_wrong_magic_number(fake_mnist_root, tmp_path, name, magic):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    if name == IMAGES:
        # a header-only image file with the label magic: caught before its size is looked at
        body = _header(Path(fake_mnist_root) / "MNIST" / "raw" / name, 16)
    else:
        body = (raw / name).read_bytes()
    _replace(raw / name, magic.to_bytes(4, "big") + body[4:])
    with pytest.raises(DataError, match=f"magic number {magic}, expected") as e:
        load_mnist(str(tmp_path))
    assert str(raw / name) in str(e.value)


@pytest.mark.parametrize("name, dims", [
    (LABELS, (59999,)),
    (TEST_LABELS, (60000,)),  # a train label file where the test labels belong
    (IMAGES, (60000, 32, 28)),
    (TEST_IMAGES, (10000, 28, 27)),
])
def test_wrong_declared_shape(fake_mnist_root, tmp_path, name, dims):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    header = len(dims) * 4 + 4
    body = _header(Path(fake_mnist_root) / "MNIST" / "raw" / name, header if name in (IMAGES, TEST_IMAGES) else 10**6)
    fake = body[:4] + b"".join(d.to_bytes(4, "big") for d in dims) + body[header:]
    _replace(raw / name, fake)
    with pytest.raises(DataError, match=r"declares shape \(") as e:
        load_mnist(str(tmp_path))
    assert str(raw / name) in str(e.value) and str(dims) in str(e.value)


@pytest.mark.parametrize("name", [LABELS, TEST_LABELS])
def test_labels_out_of_range_name_the_file(fake_mnist_root, tmp_path, name):
    raw = _raw_copy(fake_mnist_root, tmp_path)
    data = bytearray((raw / name).read_bytes())
    data[8 + 3] = 10  # one label of 10: right size and header, wrong content
    _replace(raw / name, bytes(data))
    with pytest.raises(DataError, match="labels") as e:
        load_mnist(str(tmp_path))
    assert name in str(e.value)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_missing_data_root_is_exit_2(tmp_path, capsys):
    root = tmp_path / "no-data"
    argv = ["pretrain", "--backend", "local", f"run.data_root={root}", f"run.output_dir={tmp_path / 'runs'}",
            "tracking.enabled=false"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip("\n").splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("toolkit pretrain: error: MNIST file missing")
    assert str(root / "MNIST" / "raw" / IMAGES) in lines[0]


def test_cli_corrupt_file_is_exit_2(fake_mnist_root, tmp_path, capsys):
    raw = _raw_copy(fake_mnist_root, tmp_path / "data")
    _replace(raw / TEST_LABELS, b"\0\0\x08\x01")
    argv = ["pretrain", "--backend", "local", f"run.data_root={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}", "tracking.enabled=false"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip("\n").splitlines()
    assert len(lines) == 1 and str(raw / TEST_LABELS) in lines[0]
