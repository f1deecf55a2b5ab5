"""Running all probes under one named protocol (e.g. ``"100-labels"``) and naming their metrics
and resolved settings the way MLflow logs them (``protocol/probe/name``).

The one place that knows the probe list and the metric key layout: the probe stage and the
report read the keys it writes.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from toolkit.maths.probes.features import _check_feats_labels
from toolkit.maths.probes.knn import knn_predict
from toolkit.maths.probes.linear import train_linear_probe
from toolkit.maths.probes.metrics import accuracy, confusion_matrix, per_class_accuracy, predict
from toolkit.maths.probes.mlp import MLPProbeSettings, train_mlp_probe

PROBE_NAMES = ("linear", "mlp", "knn")

# MLflow accepts these characters in metric keys; "/" is ours, it separates protocol/probe/metric.
_PROTOCOL_RE = re.compile(r"^[A-Za-z0-9_.\- ]+$")


@dataclass(frozen=True)
class LabeledFeatures:
    """One split of a protocol (train, val or test): (N, D) features and their (N,) labels."""

    feats: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.feats, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError(
                f"LabeledFeatures needs feats and labels as tensors, got {type(self.feats).__name__} "
                f"and {type(self.labels).__name__}"
            )


@dataclass(frozen=True)
class ProbeSettings:
    """The settings of each probe under a protocol; left out, a probe runs with its protocol defaults.

    ``linear`` and ``knn`` override keyword defaults of ``train_linear_probe`` and ``knn_predict``
    (e.g. ``{"C": 0.1}``, ``{"k": 50}``); ``mlp`` is the MLP probe's settings. The seed is not
    here: ``run_probes`` passes its own to the linear and MLP probes.
    """

    linear: Mapping[str, Any] = field(default_factory=dict)
    mlp: MLPProbeSettings = MLPProbeSettings()
    knn: Mapping[str, Any] = field(default_factory=dict)


def run_probes(
    train: LabeledFeatures,
    test: LabeledFeatures,
    val: LabeledFeatures | None = None,
    *,
    protocol: str,
    seed: int = 0,
    num_classes: int = 10,
    settings: ProbeSettings = ProbeSettings(),
) -> dict[str, Any]:
    """Run the linear, MLP and kNN probes under one named ``protocol`` (e.g. ``"100-labels"``).

    ``settings`` overrides the probe defaults. The probes are fitted on the train split only;
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
      "test_pred": LongTensor (N_test,) on test.feats' device, "probe": nn.Module | None
      (None for kNN), "seconds": float}``.
    """
    if not isinstance(protocol, str) or not _PROTOCOL_RE.match(protocol):
        raise ValueError(f"protocol must be a non-empty name of letters, digits, '_', '-', '.', ' '; got {protocol!r}")
    train_feats, test_feats = train.feats, test.feats
    val_feats = val.feats if val is not None else None
    train_labels = _check_feats_labels(train_feats, train.labels, num_classes, "train")
    test_labels = _check_feats_labels(test_feats, test.labels, num_classes, "test")
    val_labels = _check_feats_labels(val.feats, val.labels, num_classes, "val") if val is not None else None
    for name, f in (("test", test_feats), ("val", val_feats)):
        if f is not None and f.shape[1] != train_feats.shape[1]:
            raise ValueError(f"{name}_feats has {f.shape[1]} columns, train_feats has {train_feats.shape[1]}")

    linear_kw = {"seed": seed, **settings.linear}
    knn_kw = dict(settings.knn)

    def fit_linear():
        probe = train_linear_probe(train_feats, train_labels, num_classes, **linear_kw)
        return probe, lambda x: predict(probe, x)

    def fit_mlp():
        probe = train_mlp_probe(train_feats, train_labels, num_classes, settings=settings.mlp, seed=seed)
        return probe, lambda x: predict(probe, x)

    def fit_knn():
        return None, lambda x: knn_predict(train_feats, train_labels, x, num_classes=num_classes, **knn_kw)

    out: dict[str, Any] = {"protocol": protocol, "metrics": {}, "params": {}}
    params = out["params"]
    params[f"{protocol}/n_train"] = int(train_feats.shape[0])
    params[f"{protocol}/n_test"] = int(test_feats.shape[0])
    params[f"{protocol}/n_val"] = 0 if val_feats is None else int(val_feats.shape[0])
    resolved = {
        "linear": _resolved(train_linear_probe, linear_kw),
        "mlp": {**dataclasses.asdict(settings.mlp), "seed": seed},
        "knn": _resolved(knn_predict, knn_kw),
    }
    resolved["knn"]["k"] = min(resolved["knn"]["k"], int(train_feats.shape[0]))  # the k actually used

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
        for key, value in resolved[name].items():
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
