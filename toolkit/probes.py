"""Probes on frozen, precomputed features: linear, MLP and weighted kNN, plus their metrics.

Every function here is pure torch and runs on whatever device the feature tensors live on.
The three probes are named evaluation protocols; their defaults are part of the protocol and
are pinned by ``tests/test_probes.py`` so that a silent change fails (lightly #1824):

* ``linear``: L2-regularised multinomial logistic regression on standardised features, fitted
  to convergence with full-batch L-BFGS (the frozen-feature protocol of SimCLR, Chen et al.
  2020, appendix B.8). The objective is convex, so the result does not depend on the seed.
* ``mlp``: one hidden ReLU layer on standardised features, AdamW with a cosine learning rate,
  a fixed number of optimizer *steps* (not epochs) so that 100 and 60,000 labels both train.
* ``knn``: cosine kNN on L2-normalised raw features with exp(sim / T) votes (InstDisc,
  Wu et al. 2018): k = ``probe.knn_k`` (20), T=0.07.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProbeConfig

PROBE_NAMES = ("linear", "mlp", "knn")

# MLflow accepts these characters in metric keys; "/" is ours, it separates protocol/probe/metric.
_PROTOCOL_RE = re.compile(r"^[A-Za-z0-9_.\- ]+$")


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training-set statistics kept as buffers (saved in state_dict)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    @classmethod
    def fit(cls, feats: torch.Tensor, eps: float = 1e-6) -> "Standardize":
        feats = feats.float()
        mean = feats.mean(0)
        std = feats.std(0, unbiased=False)
        # Constant dimensions (e.g. dead ReLU units) would divide by zero: leave them unscaled.
        std = torch.where(std > eps, std, torch.ones_like(std))
        return cls(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


# ----------------------------------------------------------------------------- input checks


def _check_feats_labels(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """Validate (N, D) features and (N,) labels; return the labels as int64 on the features' device."""
    if feats.ndim != 2:
        raise ValueError(f"{name}_feats must be 2-D (N, D), got shape {tuple(feats.shape)}")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"{name}_labels must be 1-D with {feats.shape[0]} entries to match {name}_feats, "
            f"got shape {tuple(labels.shape)}"
        )
    if feats.shape[0] == 0:
        raise ValueError(f"{name}_feats is empty")
    labels = labels.to(device=feats.device, dtype=torch.long)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}_labels must lie in [0, {num_classes}), got range [{lo}, {hi}]")
    return labels


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU RNG (and this CUDA device's) for the block, then restore them: no global side effects."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- linear probe


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int = 10,
    *,
    C: float = 1.0,
    max_iter: int = 200,
    batch_size: int = 16384,
    seed: int = 0,
) -> nn.Sequential:
    """Fit ``Standardize -> Linear`` by L-BFGS; return it in eval mode on the features' device.

    Minimises ``mean_i CE_i + ||W||^2 / (2 C N)``: scikit-learn's ``LogisticRegression(C)``
    divided by N, so the penalty is strong with 100 labels and weak with 60,000 (bias is not
    penalised). ``max_iter`` bounds the L-BFGS iterations (each is at least one pass over the
    data). ``batch_size`` only bounds memory: the full-batch loss and gradient are accumulated
    over chunks of that many rows, so it does not change the solution. ``seed`` is accepted for
    a uniform signature; the weights start at zero and the objective is convex.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if max_iter < 1 or batch_size < 1:
        raise ValueError(f"max_iter and batch_size must be >= 1, got {max_iter}, {batch_size}")
    n, d = train_feats.shape
    device = train_feats.device
    with _seeded(seed, device):  # nn.Linear's init draws from the global RNG: leave it untouched
        std = Standardize.fit(train_feats)
        linear = nn.Linear(d, num_classes).to(device)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    l2 = 1.0 / (2.0 * C * n)

    opt = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            x = std(train_feats[start : start + batch_size])
            # sum / n per chunk: the accumulated gradient equals the full-batch mean gradient.
            loss = F.cross_entropy(linear(x), labels[start : start + batch_size], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = l2 * linear.weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return nn.Sequential(std, linear).eval()


def select_linear_C(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),
    num_classes: int = 10,
) -> tuple[float, dict[float, float]]:
    """The inverse regularisation ``C`` of the linear probe with the best *validation* accuracy.

    Returns (best C, {C: val acc}); ties go to the smaller C (the stronger penalty).
    """
    scores = {}
    for c in grid:
        probe = train_linear_probe(train_feats, train_labels, num_classes, C=c)
        scores[c] = accuracy(predict(probe, val_feats), val_labels)
    best = max(grid, key=lambda c: (scores[c], -c))
    return best, scores


# ----------------------------------------------------------------------------- MLP probe


def train_mlp_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int = 10,
    *,
    hidden_dim: int = 512,
    dropout: float = 0.0,
    steps: int = 500,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 1024,
    seed: int = 0,
) -> nn.Sequential:
    """Fit ``Standardize -> Linear -> ReLU -> Dropout -> Linear`` with AdamW; return it in eval mode.

    Trains for a fixed number of optimizer ``steps`` with a cosine learning rate from ``lr`` to 0:
    with 100 labels each step is one full batch (500 passes), with 60,000 labels and
    ``batch_size=1024`` it is about 8.5 epochs. Batches walk through seeded permutations of the
    data. Deterministic for a given ``seed`` and device; the global RNG state is restored.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    if steps < 1 or batch_size < 1 or hidden_dim < 1:
        raise ValueError(f"steps, batch_size and hidden_dim must be >= 1, got {steps}, {batch_size}, {hidden_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    n, d = train_feats.shape
    device = train_feats.device
    bs = min(batch_size, n)

    with _seeded(seed, device):
        model = nn.Sequential(
            Standardize.fit(train_feats),
            nn.Linear(d, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        ).to(device)
        # Decay weights only, not biases (the usual AdamW practice).
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(seed)  # batch order, on the CPU for every device
        model.train()
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(steps):
            if pos + bs > n:  # drop the ragged tail so every step sees a full batch
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + bs].to(device)
            pos += bs
            loss = F.cross_entropy(model(train_feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ----------------------------------------------------------------------------- kNN


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = ProbeConfig.knn_k,  # the probe protocol's k lives in the config (probe.knn_k)
    temperature: float = 0.07,
    num_classes: int = 10,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Weighted cosine kNN (Wu et al. 2018): each of the k nearest neighbours votes exp(sim / T).

    Features are L2-normalised (not standardised). ``k`` is clipped to the number of training
    points. Queries are processed ``chunk_size`` at a time, so peak extra memory is about
    ``chunk_size x N_train`` floats (512 x 60,000 x 4 B = 123 MB). Returns (N_query,) int64
    predictions on the query features' device; ties go to the lowest class index.
    """
    labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    if query_feats.ndim != 2 or query_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(
            f"query_feats must be 2-D with {train_feats.shape[1]} columns, got shape {tuple(query_feats.shape)}"
        )
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")
    k = min(k, train_feats.shape[0])
    device = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)  # (N, D)
    preds = []
    for start in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[start : start + chunk_size].to(device).float(), dim=1)  # (B, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=query_feats.device)
    return torch.cat(preds).to(query_feats.device)


# ----------------------------------------------------------------------------- prediction and metrics


@torch.no_grad()
def predict(probe_module: nn.Module, feats: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Argmax class of ``probe_module`` for each row, in eval mode, ``batch_size`` rows at a time.

    Rows are moved to the module's device; predictions come back on ``feats``' device.
    """
    try:
        device = next(probe_module.buffers()).device
    except StopIteration:
        device = next(probe_module.parameters()).device
    was_training = probe_module.training
    probe_module.eval()
    try:
        out = [
            probe_module(feats[s : s + batch_size].to(device)).argmax(1).to(feats.device)
            for s in range(0, feats.shape[0], batch_size)
        ]
    finally:
        probe_module.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=feats.device)


def _check_pred_labels(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must be 1-D of equal length, got {tuple(pred.shape)} and {tuple(labels.shape)}")
    if pred.numel() == 0:
        raise ValueError("pred and labels are empty")
    return labels.to(pred.device, torch.long)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels``."""
    labels = _check_pred_labels(pred, labels)
    return (pred.long() == labels).float().mean().item()


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(C, C) int64 counts on the CPU; ``cm[t, p]`` = number of samples of true class t predicted as p."""
    labels = _check_pred_labels(pred, labels)
    pred = pred.long()
    for name, t in (("pred", pred), ("labels", labels)):
        if int(t.min()) < 0 or int(t.max()) >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    flat = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).cpu()


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> list[float]:
    """Recall of each true class; ``nan`` for a class absent from ``labels``."""
    cm = confusion_matrix(pred, labels, num_classes)
    support = cm.sum(1)
    return [cm[c, c].item() / support[c].item() if support[c] > 0 else float("nan") for c in range(num_classes)]


# ----------------------------------------------------------------------------- all probes, one protocol


def run_probes(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    val_feats: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    *,
    protocol: str,
    seed: int = 0,
    num_classes: int = 10,
    linear_kwargs: dict[str, Any] | None = None,
    mlp_kwargs: dict[str, Any] | None = None,
    knn_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the linear, MLP and kNN probes under one named ``protocol`` (e.g. ``"100-labels"``).

    ``*_kwargs`` override the probe defaults. The probes are fitted on the train split only;
    the val split is for model selection by the caller, the test split is reported once.

    Returns ``{"protocol", "metrics", "params", "linear", "mlp", "knn"}``:

    * ``metrics``: flat ``{str: float}`` for MLflow, keys ``f"{protocol}/{probe}/{name}"`` with
      name in ``test_acc``, ``val_acc`` (only with a val split), ``train_acc`` (linear and mlp
      only), ``test_acc_class{c}`` for each class (``nan`` if absent from test), and
      ``seconds`` (wall time to fit and predict the test split).
    * ``params``: flat resolved settings, keys ``f"{protocol}/{probe}/{setting}"`` (e.g. the
      effective, clipped kNN ``k``), plus ``f"{protocol}/n_train"``, ``n_test``, ``n_val``.
    * per probe name: ``{"test_acc": float, "val_acc": float | None, "train_acc": float | None,
      "per_class_acc": list[float], "confusion": LongTensor (C, C) on CPU, rows=true,
      "test_pred": LongTensor (N_test,) on test_feats' device, "probe": nn.Module | None
      (None for kNN), "seconds": float}``.
    """
    if not isinstance(protocol, str) or not _PROTOCOL_RE.match(protocol):
        raise ValueError(f"protocol must be a non-empty name of letters, digits, '_', '-', '.', ' '; got {protocol!r}")
    if (val_feats is None) != (val_labels is None):
        raise ValueError("val_feats and val_labels must be given together")
    train_labels = _check_feats_labels(train_feats, train_labels, num_classes, "train")
    test_labels = _check_feats_labels(test_feats, test_labels, num_classes, "test")
    if val_feats is not None:
        val_labels = _check_feats_labels(val_feats, val_labels, num_classes, "val")
    for name, f in (("test", test_feats), ("val", val_feats)):
        if f is not None and f.shape[1] != train_feats.shape[1]:
            raise ValueError(f"{name}_feats has {f.shape[1]} columns, train_feats has {train_feats.shape[1]}")

    linear_kw = {"seed": seed, **(linear_kwargs or {})}
    mlp_kw = {"seed": seed, **(mlp_kwargs or {})}
    knn_kw = dict(knn_kwargs or {})

    def fit_linear():
        probe = train_linear_probe(train_feats, train_labels, num_classes, **linear_kw)
        return probe, lambda x: predict(probe, x)

    def fit_mlp():
        probe = train_mlp_probe(train_feats, train_labels, num_classes, **mlp_kw)
        return probe, lambda x: predict(probe, x)

    def fit_knn():
        return None, lambda x: knn_predict(train_feats, train_labels, x, num_classes=num_classes, **knn_kw)

    out: dict[str, Any] = {"protocol": protocol, "metrics": {}, "params": {}}
    params = out["params"]
    params[f"{protocol}/n_train"] = int(train_feats.shape[0])
    params[f"{protocol}/n_test"] = int(test_feats.shape[0])
    params[f"{protocol}/n_val"] = 0 if val_feats is None else int(val_feats.shape[0])
    settings = {
        "linear": _resolved(train_linear_probe, linear_kw),
        "mlp": _resolved(train_mlp_probe, mlp_kw),
        "knn": _resolved(knn_predict, knn_kw),
    }
    settings["knn"]["k"] = min(settings["knn"]["k"], int(train_feats.shape[0]))  # the k actually used

    for name, fit in (("linear", fit_linear), ("mlp", fit_mlp), ("knn", fit_knn)):
        t0 = time.perf_counter()
        probe, pred_fn = fit()
        test_pred = pred_fn(test_feats)
        seconds = time.perf_counter() - t0
        res = {
            "test_acc": accuracy(test_pred, test_labels),
            "val_acc": accuracy(pred_fn(val_feats), val_labels) if val_feats is not None else None,
            # kNN on its own training points finds each point itself first: not informative.
            "train_acc": accuracy(pred_fn(train_feats), train_labels) if probe is not None else None,
            "per_class_acc": per_class_accuracy(test_pred, test_labels, num_classes),
            "confusion": confusion_matrix(test_pred, test_labels, num_classes),
            "test_pred": test_pred,
            "probe": probe,
            "seconds": seconds,
        }
        out[name] = res
        m = out["metrics"]
        prefix = f"{protocol}/{name}"
        m[f"{prefix}/test_acc"] = res["test_acc"]
        if res["val_acc"] is not None:
            m[f"{prefix}/val_acc"] = res["val_acc"]
        if res["train_acc"] is not None:
            m[f"{prefix}/train_acc"] = res["train_acc"]
        for c, acc in enumerate(res["per_class_acc"]):
            m[f"{prefix}/test_acc_class{c}"] = acc
        m[f"{prefix}/seconds"] = seconds
        for key, value in settings[name].items():
            params[f"{prefix}/{key}"] = value
    return out


def _resolved(fn, overrides: dict[str, Any]) -> dict[str, Any]:
    """The keyword defaults of ``fn`` with ``overrides`` applied; unknown keys fail naming the key."""
    skip = {"train_feats", "train_labels", "query_feats", "num_classes"}
    defaults = {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name not in skip and p.default is not inspect.Parameter.empty
    }
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"{fn.__name__} has no setting {unknown[0]!r}; known: {sorted(defaults)}")
    return {**defaults, **overrides}
