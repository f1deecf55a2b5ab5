"""Shared fixtures: the real MNIST files, a small slice of them, and a tiny config for fast runs.

The data are never downloaded here: ``$TOOLKIT_DATA_DIR`` or ``<repo>/../shared/data``
must hold ``MNIST/raw`` (CI clones the repository beside a copy of ``shared/``).
Missing data fail the tests that need them; nothing is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolkit.config import Config
from toolkit.data import load_mnist

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


@pytest.fixture
def tiny_config(tmp_path, data_root) -> Config:
    """A validated config small enough for CPU tests: 3,000 images, width 8, local backend, sqlite MLflow in tmp_path."""
    return Config().replace(**{
        "data.root": data_root,
        "data.train_subset": 3000,
        "data.test_subset": 500,
        "split.val_size": 200,
        "model.width": 8,
        "run.output_dir": str(tmp_path / "runs"),
        "run.backend": "local",
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
    })
