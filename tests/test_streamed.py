"""Images larger than the memory set aside are streamed from the cache a batch at a time, and train the same.

``StreamedImages`` must give the bytes the resident tensor gives for any rows in any order, and a
whole pipeline run with ``run.resident_mb`` forced below the data's size must end where the resident
run ends: the same student weights and the same labeled pool (compared within this process and CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.datasets.streamed import StreamedImages, take


def test_streamed_rows_equal_the_resident_rows_in_any_order():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8) for n in (7, 1, 12)]
    whole = torch.from_numpy(np.concatenate(parts))
    s = StreamedImages(parts)
    assert s.shape == tuple(whole.shape) and len(s) == 20 and s.nbytes == whole.numel()
    for idx in (torch.tensor([19, 0, 7, 7, 8, 3]), np.array([5]), torch.arange(20).flip(0)):
        assert torch.equal(s[idx], whole[torch.as_tensor(idx)])
    assert torch.equal(s[3:15:4], whole[3:15:4])
    view = take(s, torch.tensor([18, 2, 9, 11]))  # nothing read yet: rows of rows
    assert isinstance(view, StreamedImages)
    assert torch.equal(view[torch.tensor([3, 0])], whole[torch.tensor([11, 18])])
    assert torch.equal(view[1:], whole[torch.tensor([2, 9, 11])])
    resident = whole.clone()
    assert torch.equal(take(resident, torch.tensor([1, 2])), whole[1:3])


def test_loading_streams_only_what_exceeds_the_limit(tmp_path, monkeypatch):
    from toolkit.config import DataConfig
    from toolkit.datasets.training_data import load_image_data

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = _digits_npz(tmp_path)
    data = DataConfig(name="npz", image_size=28)
    small_limit = load_image_data(data, root, resident_bytes=1 << 20)
    large_limit = load_image_data(data, root, resident_bytes=1 << 30)
    assert isinstance(small_limit.train_images, StreamedImages)  # 1,797 x 784 bytes > 1 MB
    assert isinstance(large_limit.train_images, torch.Tensor)
    idx = torch.randperm(len(large_limit.train_labels))[:300]
    assert torch.equal(small_limit.train_images[idx], large_limit.train_images[idx])
    assert torch.equal(small_limit.train_labels, large_limit.train_labels)


def _digits_npz(tmp_path: Path) -> str:
    """scikit-learn's digits (real 8x8 scans) as an npz: 5 labeled per class, the rest without a label."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)
    labels = np.full(len(images), -1, dtype=np.int64)
    rng = np.random.default_rng(0)
    for c in range(10):
        labels[rng.choice(np.flatnonzero(d.target == c), 5, replace=False)] = c
    path = tmp_path / "digits.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


@pytest.mark.slow
def test_a_streamed_pipeline_trains_exactly_as_a_resident_one(tmp_path, monkeypatch):
    from toolkit.cli import main

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = _digits_npz(tmp_path)
    tiny = ["data.name=npz", f"run.data_root={root}", "data.image_size=28", "run.backend=local", "run.device=cpu",
            "run.threads=1", "model.width=8", "pretrain.epochs=1", "pretrain.batch_size=128", "classifier.steps=20",
            "classifier.eval_every=10", "pseudolabel.rounds=1", "pseudolabel.steps_per_round=20", "student.steps=20",
            "student.tta_views=1", "split.labels_per_class=5", "pipeline.seeds=[0]", "tracking.enabled=false",
            "pipeline.stages=[pretrain,iterative,student]"]
    outs = {}
    for name, limit in (("resident", 0), ("streamed", 1)):
        out = tmp_path / name
        assert main(["pipeline", *tiny, f"run.output_dir={out}", f"run.resident_mb={limit}"]) == 0
        outs[name] = out
    tables = [(o / "pool_labels.csv").read_text() for o in outs.values()]
    assert tables[0] == tables[1] and tables[0].count("\n") == 1797 - 50 + 1
    weights = [torch.load(next(o.glob("stages/student-*/model.pt")), weights_only=True)["state_dict"]
               for o in outs.values()]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
