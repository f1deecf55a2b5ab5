"""Figures written to PNG files: confusion matrices, t-SNE embeddings, curves, bars, class counts, search trials.

Each function draws on its own ``matplotlib.figure.Figure`` rendered by the Agg canvas, so it
never touches pyplot's global figure registry or the process-wide backend: nothing to leak,
safe in headless Ray workers. matplotlib, seaborn and scikit-learn are imported inside the
functions so that importing this module stays cheap. Every function returns the written path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor (any device), list or array -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    fig.clear()  # free the artists now rather than at garbage collection
    return path


def plot_confusion_matrix(cm: Any, path: str | Path, title: str, dpi: int = 120,
                          class_names: Sequence[str] | None = None) -> Path:
    """Heatmap of a (C, C) confusion matrix (rows = true class, columns = predicted class; axes named by
    ``class_names`` when given, else by index).

    Cells are annotated with counts and coloured by the fraction of their true class, so that
    rare classes remain readable.
    """
    import seaborn as sns

    cm = _to_numpy(cm).astype(np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {cm.shape}")
    c = cm.shape[0]
    row_frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = _new_figure((1.0 + 0.55 * c, 0.6 + 0.5 * c))
    ax = fig.add_subplot()
    sns.heatmap(
        row_frac,
        annot=cm,
        fmt="d",
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        square=True,
        xticklabels=list(class_names) if class_names else list(range(c)),
        yticklabels=list(class_names) if class_names else list(range(c)),
        cbar_kws={"label": "fraction of true class"},
        annot_kws={"fontsize": 7},
        ax=ax,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path, dpi)


@dataclass(frozen=True)
class TSNESettings:
    """How ``plot_embedding_2d`` computes its embedding; the defaults are pinned by the tests.

    ``max_points`` bounds the random subset of rows that is embedded. The subset, PCA and t-SNE
    are all seeded by ``seed``. ``max_iter`` is t-SNE's number of iterations (scikit-learn's
    minimum is 250). ``n_threads`` caps the OpenMP/BLAS threads for this call only (None: library
    default); on a small shared CPU, 1 avoids oversubscription, which can slow t-SNE down tenfold.
    """

    max_points: int = 2000
    seed: int = 0
    max_iter: int = 1000
    n_threads: int | None = None


def plot_embedding_2d(
    features: Any,
    labels: Any,
    path: str | Path,
    title: str,
    tsne: TSNESettings = TSNESettings(),
    dpi: int = 120,
) -> Path:
    """t-SNE of a random subset of at most ``tsne.max_points`` rows, coloured by label (digit).

    Features wider than 50 are first reduced to 50 dimensions by PCA (the usual t-SNE
    preprocessing, and much faster). The subset, PCA and t-SNE are all seeded by ``tsne.seed``.
    """
    import seaborn as sns
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = _to_numpy(features).astype(np.float32)
    y = _to_numpy(labels).astype(np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 points for an embedding, got {x.shape[0]}")
    seed, max_points = tsne.seed, tsne.max_points
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_points:
        keep = np.sort(rng.choice(x.shape[0], size=max_points, replace=False))
        x, y = x[keep], y[keep]
    n = x.shape[0]
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))  # t-SNE needs perplexity < n
    embedder = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", max_iter=tsne.max_iter,
        random_state=seed,
    )
    with threadpool_limits(limits=tsne.n_threads) if tsne.n_threads else contextlib.nullcontext():
        if x.shape[1] > 50 and n > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        emb = embedder.fit_transform(x)

    classes = np.unique(y)
    palette = sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes))
    fig = _new_figure((6.5, 5.5))
    ax = fig.add_subplot()
    for color, cls in zip(palette, classes):
        sel = y == cls
        ax.scatter(emb[sel, 0], emb[sel, 1], s=6, color=color, label=str(cls), alpha=0.8, linewidths=0)
    ax.legend(title="digit", markerscale=2.5, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} (t-SNE, {n} points)")
    return _save(fig, path, dpi)


def plot_curves(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    dpi: int = 120,
) -> Path:
    """One line per entry of ``series`` against the shared ``x`` (per-epoch losses, per-round accuracies)."""
    x = _to_numpy(x).astype(np.float64)
    fig = _new_figure((6.5, 4.0))
    ax = fig.add_subplot()
    for name, values in series.items():
        v = _to_numpy(values).astype(np.float64)
        if v.shape != x.shape:
            raise ValueError(f"series {name!r} has {v.shape[0] if v.ndim else 0} values, x has {x.shape[0]}")
        ax.plot(x, v, marker="o" if len(x) <= 30 else None, markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_bars(
    names: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    title: str,
    ylabel: str,
    reference: dict[str, float] | None = None,
    dpi: int = 120,
) -> Path:
    """One bar per name (e.g. accuracy per stage), value written on top.

    ``reference`` maps names to reference values: a key that is one of ``names`` is drawn as a
    red marker on that bar; any other key (e.g. "supervised, all labels") as a labelled dashed
    horizontal line.
    """
    import seaborn as sns

    names = [str(n) for n in names]
    vals = _to_numpy(values).astype(np.float64)
    if vals.shape != (len(names),):
        raise ValueError(f"got {len(names)} names and {vals.shape} values")
    reference = dict(reference or {})
    fig = _new_figure((max(4.0, 0.9 * len(names) + 2.0), 4.0))
    ax = fig.add_subplot()
    pos = np.arange(len(names))
    bars = ax.bar(pos, vals, color=sns.color_palette("deep", len(names)))
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], fontsize=8, padding=2)
    on_bar = [(names.index(k), v) for k, v in reference.items() if k in names]
    if on_bar:
        ax.scatter([i for i, _ in on_bar], [v for _, v in on_bar], marker="D", color="red", zorder=3, label="reference")
    for k, v in reference.items():
        if k not in names:
            ax.axhline(v, linestyle="--", linewidth=1, color="gray", label=f"{k}: {v:.3f}")
    everything = np.concatenate([vals, np.asarray(list(reference.values()), dtype=np.float64)])
    finite = everything[np.isfinite(everything)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        ax.set_ylim(0.0, 1.08)  # accuracies: a fixed scale makes figures comparable
    ax.set_xticks(pos, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if reference:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path, dpi)


def plot_class_counts(
    counts_per_round: Sequence[Sequence[int]],
    path: str | Path,
    title: str,
    dpi: int = 120,
) -> Path:
    """Grouped bars: for each class (x axis), one bar per round with that round's count.

    ``counts_per_round[r][c]`` is the number of (pseudo-)labelled examples of class c after
    round r; rounds are coloured from light to dark.
    """
    import seaborn as sns

    counts = _to_numpy(counts_per_round).astype(np.int64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(f"counts_per_round must be a non-empty (rounds, classes) table, got shape {counts.shape}")
    rounds, classes = counts.shape
    width = 0.8 / rounds
    palette = sns.color_palette("viridis_r", rounds)
    fig = _new_figure((max(6.0, 0.25 * rounds * classes + 2.0), 4.0))
    ax = fig.add_subplot()
    pos = np.arange(classes)
    for r in range(rounds):
        ax.bar(pos - 0.4 + (r + 0.5) * width, counts[r], width=width, color=palette[r], label=f"round {r}")
    ax.set_xticks(pos, [str(c) for c in range(classes)])
    ax.set_xlabel("class")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=max(1, rounds // 8), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path, dpi)


@dataclass(frozen=True)
class SearchTrials:
    """A search's trials, one entry per trial in each field, in the same order.

    ``scores``: the y value; ``kinds``: the colour (e.g. the schedule); ``stopped``: whether the
    trial was stopped early (ASHA), drawn as a hollow marker.
    """

    scores: Sequence[float]
    kinds: Sequence[str]
    stopped: Sequence[bool]


def plot_search(
    panels: dict[str, Sequence[float]],
    trials: SearchTrials,
    path: str | Path,
    title: str,
    ylabel: str = "validation accuracy (last reported round)",
    dpi: int = 120,
) -> Path:
    """A search's trials: one panel per searched value (x) against the score (y), coloured by kind.

    ``panels`` maps an x-axis label (e.g. "threshold start") to one value per trial; a NaN
    value leaves that trial out of that panel. Filled markers: trials that ran to the end;
    hollow: stopped early (ASHA).
    """
    from matplotlib import colormaps

    y = _to_numpy(trials.scores).astype(np.float64)
    kinds, stopped = [str(k) for k in trials.kinds], [bool(s) for s in trials.stopped]
    if not panels or any(len(v) != len(y) for v in panels.values()) or not len(kinds) == len(stopped) == len(y):
        raise ValueError(f"need at least one panel and one x value, kind and stopped flag per score ({len(y)} scores)")
    names = sorted(set(kinds))
    colors = {k: colormaps["tab10"](i % 10) for i, k in enumerate(names)}
    fig = _new_figure((5.0 * len(panels), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (label, xs) in zip(axes, panels.items()):
        x = _to_numpy(xs).astype(np.float64)
        for kind in names:
            for early in (False, True):
                sel = np.array([k == kind and s == early for k, s in zip(kinds, stopped)], dtype=bool)
                if sel.any():
                    ax.scatter(x[sel], y[sel], s=36, facecolors="none" if early else colors[kind],
                               edgecolors=colors[kind], label=f"{kind}{' (stopped early)' if early else ''}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if len(y):
        axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    return _save(fig, path, dpi)


def plot_error_by_stage(per_seed: dict[str, list[float]], path: str | Path, title: str,
                        reference: dict[str, float] | None = None, dpi: int = 120) -> Path:
    """Test error (%) per result, on a log axis: bars at the mean over seeds, one dot per seed.

    Accuracies of 93% and 99% look alike on a 0-1 accuracy axis; as errors (7% and 1%) on a
    log axis the difference a reader came for is plain, and the dots show the spread over
    split seeds. ``reference`` maps a result to its reference accuracy (a red diamond).
    """
    import pandas as pd
    import seaborn as sns

    rows = [(name, 100.0 * (1.0 - v), i) for name, vals in per_seed.items() for i, v in enumerate(vals)]
    if not rows:
        raise ValueError("no values to plot")
    df = pd.DataFrame(rows, columns=["result", "error", "seed"])
    names = list(per_seed)
    fig = _new_figure((8.0, 0.55 * len(names) + 1.6))
    ax = fig.add_subplot()
    sns.barplot(data=df, y="result", x="error", order=names, errorbar=None, color=sns.color_palette("deep")[0],
                alpha=0.5, ax=ax)
    sns.stripplot(data=df, y="result", x="error", order=names, color="black", size=4, jitter=0.15, ax=ax)
    means = df.groupby("result", sort=False)["error"].mean()
    for i, name in enumerate(names):
        ax.text(means[name], i, f"  {means[name]:.2f}%", va="center", fontsize=8)
    ref = {k: 100.0 * (1.0 - v) for k, v in (reference or {}).items() if k in names and v}
    if ref:
        ax.scatter(list(ref.values()), [names.index(k) for k in ref], marker="D", color="red", zorder=3,
                   label="reference")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    # the axis spans the references too: a diamond left of the lowest bar would be cut off
    lo, hi = min([df["error"].min(), *ref.values()]), max([df["error"].max(), *ref.values()])
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo / 2 <= t <= hi * 2]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(max(lo / 2, 0.05), hi * 1.6)
    ax.set_xlabel("test error, % (log scale; lower is better)")
    ax.set_ylabel("")
    ax.set_title(title)
    ax.grid(axis="x", which="both", alpha=0.3)
    return _save(fig, path, dpi)
