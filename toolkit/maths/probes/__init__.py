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

The modules: ``linear``, ``mlp`` and ``knn`` (one probe each), ``features`` (what they share),
``metrics`` (accuracy, confusion), ``runner`` (all probes under one protocol). Every name is
re-exported here so ``from toolkit.maths.probes import X`` stays the one import path.
"""

from toolkit.maths.probes.features import Standardize, _check_feats_labels, _seeded
from toolkit.maths.probes.knn import knn_predict
from toolkit.maths.probes.linear import nested_cv_accuracy, select_linear_C, select_linear_C_cv, train_linear_probe
from toolkit.maths.probes.metrics import _check_pred_labels, accuracy, confusion_matrix, per_class_accuracy, predict
from toolkit.maths.probes.mlp import MLPProbeSettings, train_mlp_probe
from toolkit.maths.probes.runner import _PROTOCOL_RE, PROBE_NAMES, LabeledFeatures, ProbeSettings, _resolved, run_probes

__all__ = [
    "PROBE_NAMES", "LabeledFeatures", "MLPProbeSettings", "ProbeSettings", "Standardize", "accuracy",
    "confusion_matrix", "knn_predict", "per_class_accuracy", "predict", "run_probes", "select_linear_C",
    "nested_cv_accuracy", "select_linear_C_cv", "train_linear_probe", "train_mlp_probe",
]
