"""Shared fixtures: the real MNIST files, a small slice of them, a tiny config for fast runs, and
synthetic MNIST files (``fake_mnist_root``, ``fake_config``) for tests where real digits do not matter.

The data are never downloaded here: ``$TOOLKIT_DATA_DIR`` or ``<repo>/../shared/data``
must hold ``MNIST/raw`` (CI clones the repository beside a copy of ``shared/``).
Missing data fail the tests that need them; nothing is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from toolkit.config import Config
from toolkit.datasets.mnist import load_mnist

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="session")
def data_root() -> str:
    """The MNIST root (the folder holding ``MNIST/raw``), as an absolute path string."""
    env = os.environ.get("TOOLKIT_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    root = root.expanduser().resolve()
    raw = root / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        where = "$TOOLKIT_DATA_DIR" if env else "the default <repo>/../shared/data"
        pytest.fail(
            f"MNIST data not found: {raw} (from {where}) lacks {', '.join(missing)}. "
            "Set TOOLKIT_DATA_DIR to a folder holding MNIST/raw with the four idx files.",
            pytrace=False,
        )
    return str(root)


@pytest.fixture(scope="session")
def mnist_small(data_root):
    """The first 3,000 training and 500 test images, loaded once per session."""
    return load_mnist(data_root, train_subset=3000, test_subset=500)


def small_config(data_root: str, tmp_path: Path) -> Config:
    """A validated config small enough for CPU tests: 3,000 images, width 8, local backend, sqlite MLflow in tmp_path.

    The device is pinned to the CPU: tests that compare two runs to the last digit hold there on every
    host, while CUDA's backward of adaptive pooling and bf16 repeat only within training noise.
    """
    return Config().replace(**{
        "run.data_root": data_root,
        "data.train_subset": 3000,
        "data.test_subset": 500,
        "split.val_size": 200,
        "model.width": 8,
        "run.output_dir": str(tmp_path / "runs"),
        "run.backend": "local",
        "run.device": "cpu",
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
    })


@pytest.fixture
def tiny_config(tmp_path, data_root) -> Config:
    return small_config(data_root, tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Torch single-threaded for a module: on a busy 2-core machine its default 2 intra-op threads
    oversubscribe the cores (the MLP probe took 57 s with 2 threads, 6 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- synthetic MNIST: for tests where real digits do not matter ---------------------------------

FAKE_MNIST_TRAIN, FAKE_MNIST_TEST = 60_000, 10_000  # the loader checks MNIST's exact shapes


def fake_digit_templates() -> torch.Tensor:
    """Ten distinct (10, 28, 28) uint8 patterns, one per class c: a horizontal bar on rows 2 + 2c
    and 3 + 2c and a vertical bar on columns 24 - 2c and 25 - 2c (no two classes share a bar)."""
    t = torch.zeros(10, 28, 28, dtype=torch.uint8)
    for c in range(10):
        t[c, 2 + 2 * c: 4 + 2 * c, 4:24] = 255
        t[c, 4:24, 24 - 2 * c: 26 - 2 * c] = 255
    return t


def _write_idx(path: Path, magic: int, data: torch.Tensor) -> None:
    """MNIST's idx format: the magic number and each dimension as big-endian int32, then the uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    path.write_bytes(header + data.contiguous().numpy().tobytes())


@pytest.fixture(scope="session")
def fake_mnist_root(tmp_path_factory) -> str:
    """A data root whose ``MNIST/raw`` holds valid idx files of synthetic digits (written once per session).

    Image i is its label's template (``fake_digit_templates``) plus uniform noise in [0, 40);
    labels cycle 0..9 in a seeded shuffle, so every prefix (``data.train_subset``) holds all
    ten classes about equally. Loads through ``toolkit.datasets.mnist.load_mnist`` like the real files.
    """
    root = tmp_path_factory.mktemp("fake_mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    templates = fake_digit_templates()
    for prefix, n in (("train", FAKE_MNIST_TRAIN), ("t10k", FAKE_MNIST_TEST)):
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)].to(torch.uint8)
        noise = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.uint8)
        images = templates[labels.long()].clamp(max=215) + noise
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels)
    return str(root)


@pytest.fixture
def fake_config(tmp_path, fake_mnist_root) -> Config:
    """``tiny_config`` on the synthetic digits: the same sizes, with no need for the real MNIST files."""
    return small_config(fake_mnist_root, tmp_path)


@pytest.fixture(scope="module")
def ray_session():
    """One embedded Ray per test module (4 logical CPUs, a small object store), unless one is already up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    yield ray
    if started:
        ray.shutdown()

