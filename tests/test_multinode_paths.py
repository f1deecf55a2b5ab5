"""What the 2-node fixture (tests/multinode.py) hides from node b: only its own folders, never the
checkout, the interpreter's environment or the data, wherever those live. Cheap: nothing is started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from multinode import MNIST_FILES, REPO, ClusterError, MultiNodeCluster, node_b_hidden_paths


def _covers(hidden: Path, path: Path) -> bool:
    return hidden == path or hidden in path.parents


def test_a_checkout_under_tmp_stays_visible_to_node_b():
    """A fresh clone under /tmp with its .venv and ../shared/data beside it (where /tmp was hidden whole)."""
    checkout = Path("/tmp/tk-clone")
    keep = (checkout, checkout / ".venv", Path("/tmp/shared/data/MNIST/raw"))
    hidden = node_b_hidden_paths("/var/tmp/tkmn-x", keep)
    assert hidden and all(Path("/var/tmp/tkmn-x") in h.parents for h in hidden), hidden
    assert not [(h, k) for h in hidden for k in keep if _covers(h, k)]


def test_a_hidden_path_over_the_checkout_is_refused(tmp_path):
    """A root chosen so that node b would hide the data or the checkout itself: refused, not silently hidden."""
    with pytest.raises(ClusterError, match="node b would not see"):
        node_b_hidden_paths(tmp_path, [tmp_path / "data" / "MNIST" / "raw"])
    with pytest.raises(ClusterError, match="node b would not see"):
        node_b_hidden_paths(tmp_path, [tmp_path / "work"])
    link = tmp_path / "elsewhere"  # a symlink into a hidden folder counts as that folder
    link.symlink_to(tmp_path / "mlflow" / "x")
    with pytest.raises(ClusterError, match="node b would not see"):
        node_b_hidden_paths(tmp_path, [link])


def test_the_fixture_never_hides_this_checkout_its_venv_or_the_data(tmp_path):
    """The fixture as the tests build it (data under pytest's tmp folder, in /tmp by default)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(b"")
    c = MultiNodeCluster(raw, root=tmp_path / "root")  # builds paths only; start() is not called
    keep = [REPO, Path(sys.prefix), Path(sys.executable).parent, raw]
    assert not [(h, k) for h in c.hidden_on_node_b for k in keep if _covers(h, k.resolve())], c.hidden_on_node_b
    assert {c.ray_tmp, c.run_dir, c.mlflow_dir, c.data_dir, c.node_b_tmp} == set(c.hidden_on_node_b)
