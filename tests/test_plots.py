"""Each figure function writes a non-empty PNG at the given path and returns that path."""

import sys

import numpy as np
import pytest
import torch

from toolkit.tracking import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(returned, expected):
    assert returned == expected
    data = expected.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_confusion_matrix(tmp_path):
    cm = torch.randint(0, 50, (10, 10))
    cm[3] = 0  # a class absent from the test set must not divide by zero
    path = tmp_path / "nested" / "cm.png"  # parent folders are created
    assert_png(plots.plot_confusion_matrix(cm, path, "linear probe, 100-labels"), path)


def test_plot_confusion_matrix_rejects_non_square(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix(np.zeros((3, 4)), tmp_path / "x.png", "bad")


def test_plot_embedding_2d_subsamples(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(30)  # 300 points, 64-d: exercises the PCA step
    feats = 4 * torch.randn(10, 64, generator=g)[labels] + torch.randn(300, 64, generator=g)
    path = tmp_path / "tsne.png"
    tsne = plots.TSNESettings(max_points=150, seed=1, max_iter=250, n_threads=1)
    assert_png(plots.plot_embedding_2d(feats, labels, path, "encoder features", tsne), path)


def test_plot_embedding_2d_tiny_input(tmp_path):
    feats = np.random.default_rng(0).normal(size=(12, 5))
    path = tmp_path / "tiny.png"
    tsne = plots.TSNESettings(max_iter=250, n_threads=1)
    assert_png(plots.plot_embedding_2d(feats, np.arange(12) % 3, str(path), "tiny", tsne), path)


def test_plot_embedding_2d_defaults_are_pinned():
    import inspect

    tsne = plots.TSNESettings()
    assert (tsne.max_points, tsne.seed, tsne.max_iter, tsne.n_threads) == (2000, 0, 1000, None)
    assert inspect.signature(plots.plot_embedding_2d).parameters["tsne"].default == tsne


def test_plot_curves(tmp_path):
    path = tmp_path / "loss.png"
    series = {"train loss": [2.3, 1.1, 0.7, 0.5], "val acc": [0.1, 0.6, 0.8, 0.85]}
    assert_png(plots.plot_curves([1, 2, 3, 4], series, path, "SimCLR", "epoch", "value"), path)
    with pytest.raises(ValueError, match="'short'"):
        plots.plot_curves([1, 2, 3], {"short": [1.0]}, path, "t", "x", "y")


def test_plot_bars_with_references(tmp_path):
    path = tmp_path / "stages.png"
    names = ["knn", "linear", "mlp", "cnn 100 labels", "pseudo-label r3"]
    values = [0.91, 0.93, 0.94, 0.80, 0.97]
    reference = {"linear": 0.95, "supervised, all labels": 0.99}  # one marker, one line
    assert_png(plots.plot_bars(names, values, path, "test accuracy", "accuracy", reference), path)
    path2 = tmp_path / "plain.png"
    assert_png(plots.plot_bars(["a", "b"], [3.0, 5.0], path2, "seconds", "s"), path2)


def test_plot_class_counts(tmp_path):
    path = tmp_path / "counts.png"
    counts = [[10] * 10, [40 + c for c in range(10)], [90 - 3 * c for c in range(10)]]
    assert_png(plots.plot_class_counts(counts, path, "labels per class and round"), path)


def test_plot_search(tmp_path):
    path = tmp_path / "search.png"
    panels = {"threshold start": [0.95, 0.99, 0.9, float("nan")], "threshold floor": [0.8, 0.9, 0.7, 0.75]}
    trials = plots.SearchTrials(scores=[0.8, 0.85, 0.6, 0.7], kinds=["linear", "cosine", "linear", "class-adaptive"],
                                stopped=[False, False, True, True])
    assert_png(plots.plot_search(panels, trials, path, "4 trials"), path)
    one = tmp_path / "one.png"  # one panel, no trial at all
    assert_png(plots.plot_search({"trial": []}, plots.SearchTrials([], [], []), one, "nothing finished"), one)
    with pytest.raises(ValueError, match="3 scores"):
        plots.plot_search({"x": [1.0, 2.0]}, plots.SearchTrials([0.1, 0.2, 0.3], ["a"] * 3, [False] * 3), path, "t")


def test_plots_leave_no_pyplot_figures_open(tmp_path):
    plots.plot_curves([0, 1], {"a": [0.0, 1.0]}, tmp_path / "a.png", "t", "x", "y")
    plots.plot_class_counts([[1, 2], [3, 4]], tmp_path / "b.png", "t")
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_plot_error_by_stage_draws_errors_per_seed_on_a_log_axis(tmp_path):
    per_seed = {"CNN": [0.9366, 0.9393, 0.9691], "iterative": [0.9787, 0.9726, 0.9863]}
    path = tmp_path / "err.png"
    assert_png(plots.plot_error_by_stage(per_seed, path, "test error", {"CNN": 0.9366}), path)
    with pytest.raises(ValueError):
        plots.plot_error_by_stage({}, tmp_path / "none.png", "nothing")


def test_plot_error_by_stage_axis_shows_references_below_every_bar(tmp_path, monkeypatch):
    """A reference far better than every result (1.45% vs 25% error) stays on the log axis."""
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: saved.append(fig.axes[0].get_xlim()) or path)
    plots.plot_error_by_stage({"probe": [0.75, 0.76], "CNN": [0.35, 0.4]}, tmp_path / "e.png", "t",
                              {"probe": 0.9855, "CNN": 0.9366})
    (lo, hi), = saved
    assert lo < 100 * (1 - 0.9855) and hi > 65
