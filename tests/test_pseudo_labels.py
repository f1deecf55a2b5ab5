"""select_pseudo_labels on hand-built probability tables, and against slow loop references."""

import dataclasses

import pytest
import torch

from toolkit.maths.selection import PseudoLabelSelection, flexmatch_class_thresholds, knn_smooth, select_pseudo_labels

# 6 rows, 3 classes. Row -> (label, confidence):
# 0 -> (0, .95)  1 -> (1, .85)  2 -> (2, .90)  3 -> (0, .97)  4 -> (0, .40)  5 -> (1, .93)
PROBS = torch.tensor(
    [
        [0.95, 0.03, 0.02],
        [0.10, 0.85, 0.05],
        [0.05, 0.05, 0.90],
        [0.97, 0.02, 0.01],
        [0.40, 0.35, 0.25],
        [0.02, 0.93, 0.05],
    ]
)


def _rows(*pairs, num_classes=3):
    """Probability rows with the given (label, confidence); the rest spread over other classes."""
    out = torch.zeros(len(pairs), num_classes)
    for i, (label, conf) in enumerate(pairs):
        out[i] = (1.0 - conf) / (num_classes - 1)
        out[i, label] = conf
    return out


# --- plain threshold ---------------------------------------------------------------------------


def test_plain_threshold_selects_confident_rows_inclusive():
    sel = select_pseudo_labels(PROBS, 0.9)
    assert sel.positions.tolist() == [0, 2, 3, 5]  # row 2 sits exactly on 0.9 and is kept
    assert sel.labels.tolist() == [0, 2, 0, 1]
    assert sel.confidences.tolist() == pytest.approx([0.95, 0.90, 0.97, 0.93])
    assert sel.class_thresholds.tolist() == pytest.approx([0.9, 0.9, 0.9])
    assert sel.counts_per_class(3).tolist() == [2, 1, 1]
    assert sel.counts_per_class(5).tolist() == [2, 1, 1, 0, 0]
    assert len(sel) == 4


def test_plain_threshold_one_selects_only_certain_rows():
    probs = torch.tensor([[1.0, 0.0], [0.999, 0.001], [0.0, 1.0]])
    assert select_pseudo_labels(probs, 1.0).positions.tolist() == [0, 2]


def test_output_types_and_shapes():
    sel = select_pseudo_labels(PROBS, 0.5)
    assert sel.positions.dtype == torch.int64 and sel.labels.dtype == torch.int64
    assert sel.confidences.dtype == torch.float32 and sel.class_thresholds.dtype == torch.float32
    assert sel.class_thresholds.shape == (3,)
    assert sel.positions.tolist() == [0, 1, 2, 3, 5]


def test_half_precision_is_promoted():
    sel = select_pseudo_labels(PROBS.half(), 0.9)
    assert sel.confidences.dtype == torch.float32
    assert sel.positions.tolist() == [0, 3, 5]  # 0.90 in fp16 is 0.89990234 < float32(0.9)


def test_argmax_ties_take_the_lowest_class():
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    sel = select_pseudo_labels(probs, 0.5)
    assert sel.labels.tolist() == [0, 1]


def test_selection_is_frozen():
    sel = select_pseudo_labels(PROBS, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.positions = torch.tensor([1])


def test_empty_pool():
    for adaptive in (False, True):
        sel = select_pseudo_labels(torch.zeros(0, 4), 0.9, per_class_cap=2, class_adaptive=adaptive)
        assert sel.positions.numel() == 0
        assert sel.counts_per_class(4).tolist() == [0, 0, 0, 0]
        assert sel.class_thresholds.tolist() == pytest.approx([0.9] * 4)


# --- per-class cap -----------------------------------------------------------------------------


def test_cap_keeps_most_confident_per_class():
    # above 0.5: class 0 rows 0 (.95), 3 (.97); class 1 rows 1 (.85), 5 (.93); class 2 row 2
    sel = select_pseudo_labels(PROBS, 0.5, per_class_cap=1)
    assert sel.positions.tolist() == [2, 3, 5]
    assert sel.labels.tolist() == [2, 0, 1]
    assert sel.counts_per_class(3).tolist() == [1, 1, 1]


def test_cap_ties_broken_by_position():
    probs = _rows((1, 0.9), (0, 0.8), (1, 0.95), (1, 0.9), (1, 0.9), (0, 0.8))
    sel = select_pseudo_labels(probs, 0.5, per_class_cap=2)
    # class 1: .95 at 2, then the first of the three .9 rows (0); class 0: both .8 rows
    assert sel.positions.tolist() == [0, 1, 2, 5]


def test_cap_zero_and_large_cap():
    assert select_pseudo_labels(PROBS, 0.5, per_class_cap=0).positions.numel() == 0
    plain = select_pseudo_labels(PROBS, 0.5)
    big = select_pseudo_labels(PROBS, 0.5, per_class_cap=100)
    assert torch.equal(plain.positions, big.positions)


def _slow_cap(probs, threshold, cap):
    rows = [(i, int(p.argmax()), float(p.max())) for i, p in enumerate(probs)]
    kept = []
    for c in range(probs.shape[1]):
        cls = [r for r in rows if r[1] == c and r[2] >= float(torch.tensor(threshold))]
        cls.sort(key=lambda r: (-r[2], r[0]))
        kept += [r[0] for r in cls[:cap]]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(5))
def test_cap_matches_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 10, generator=g) * 3
    probs = torch.softmax(logits, dim=1).round(decimals=2)  # rounding makes many ties
    for cap in (0, 1, 3, 17):
        sel = select_pseudo_labels(probs, 0.6, per_class_cap=cap)
        assert sel.positions.tolist() == _slow_cap(probs, 0.6, cap)
        assert (sel.counts_per_class(10) <= cap).all()


# --- class-adaptive (FlexMatch) thresholds -----------------------------------------------------


def test_class_adaptive_pool_mostly_used():
    # threshold 0.8. Confident (>= 0.8): class 0 x4, class 1 x2, class 2 x1 -> sigma = [4, 2, 1].
    # Unconfident: (2, .5), (1, .4), (0, .7) -> unused = 10 - 7 = 3 < max sigma = 4.
    # beta = [1, .5, .25]; T = beta / (2 - beta) * .8 = [.8, .8/3, .8/7]
    probs = _rows(
        (0, 0.9), (0, 0.85), (0, 0.95), (0, 0.8),
        (1, 0.9), (1, 0.82),
        (2, 0.9),
        (2, 0.5), (1, 0.4), (0, 0.7),
    )  # fmt: skip
    sel = select_pseudo_labels(probs, 0.8, class_adaptive=True)
    assert sel.class_thresholds.tolist() == pytest.approx([0.8, 0.8 / 3, 0.8 / 7], abs=1e-7)
    # the best-learned class keeps exactly the plain threshold
    assert sel.class_thresholds[0] == select_pseudo_labels(probs, 0.8).class_thresholds[0]
    # rows 7 (.5 >= .114) and 8 (.4 >= .267) join; row 9 (.7 < .8, class 0) stays out
    assert sel.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert select_pseudo_labels(probs, 0.8).positions.tolist() == [0, 1, 2, 3, 4, 5, 6]
    # fewer confident predictions -> lower threshold
    assert sel.class_thresholds[0] > sel.class_thresholds[1] > sel.class_thresholds[2]


def test_class_adaptive_warmup_while_pool_mostly_unused():
    # threshold 0.9, 10 rows, 10 classes. Confident (>= .9): rows 0, 1 (class 0), 2 (class 1)
    # -> sigma = [2, 1, 0, ...], unused = 7 is the normaliser (warm-up).
    # beta = [2/7, 1/7, 0, ...]; T = beta / (2 - beta) * .9 = [.9/6, .9/13, 0, ...] = [.15, .0692, 0, ...]
    probs = _rows(
        (0, 0.95), (0, 0.92), (1, 0.91),
        (0, 0.6), (1, 0.5), (2, 0.4), (3, 0.3), (0, 0.12), (1, 0.11), (5, 0.2),
        num_classes=10,
    )  # fmt: skip
    sel = select_pseudo_labels(probs, 0.9, class_adaptive=True)
    assert sel.class_thresholds.tolist() == pytest.approx([0.15, 0.9 / 13] + [0.0] * 8, abs=1e-7)
    # only row 7 (class 0, .12 < .15) stays out; plain 0.9 would keep rows 0-2 only
    assert sel.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert select_pseudo_labels(probs, 0.9).positions.tolist() == [0, 1, 2]
    conf, label = probs.max(dim=1)
    t = flexmatch_class_thresholds(label, conf, 0.9, 10)
    assert t.dtype == torch.float64
    assert t[:2].tolist() == pytest.approx([0.15, 0.9 / 13], abs=1e-12)


def test_class_adaptive_all_confident_in_one_class_is_plain():
    probs = _rows((0, 0.99), (0, 0.97), (0, 0.96))
    sel = select_pseudo_labels(probs, 0.95, class_adaptive=True)
    # sigma = [3, 0, 0], unused 0 -> beta = [1, 0, 0]
    assert sel.class_thresholds.tolist() == pytest.approx([0.95, 0.0, 0.0])
    assert sel.positions.tolist() == [0, 1, 2]


def _slow_flexmatch(probs, threshold):
    """Loop version written from the paper: sigma, beta with the unused count, convex M."""
    n, c = probs.shape
    conf, label = probs.max(dim=1)
    thr32 = float(torch.tensor(threshold))  # compare in float32, like the table
    sigma = [0] * c
    for i in range(n):
        if float(conf[i]) >= thr32:
            sigma[int(label[i])] += 1
    denom = max(max(sigma), n - sum(sigma))
    t = []
    for s in sigma:
        beta = s / denom
        t.append(beta / (2 - beta) * threshold)
    t32 = torch.tensor(t, dtype=torch.float32)
    kept = [i for i in range(n) if conf[i] >= t32[label[i]]]
    return t, kept


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_class_adaptive_matches_slow_reference(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    # class-dependent sharpness so that classes are "learned" to different degrees
    logits = torch.randn(400, 10, generator=g) * torch.linspace(1, 6, 10)
    probs = torch.softmax(logits, dim=1)
    t, kept = _slow_flexmatch(probs, threshold)
    sel = select_pseudo_labels(probs, threshold, class_adaptive=True)
    assert sel.class_thresholds.tolist() == pytest.approx(t, abs=1e-6)
    assert sel.positions.tolist() == kept
    # adaptive thresholds never exceed the plain one, so they only add samples
    plain = select_pseudo_labels(probs, threshold)
    assert set(plain.positions.tolist()) <= set(kept)


def test_class_adaptive_with_cap():
    probs = _rows((0, 0.9), (0, 0.85), (0, 0.95), (0, 0.8), (1, 0.9), (1, 0.82), (2, 0.9), (2, 0.5), (1, 0.4))
    sel = select_pseudo_labels(probs, 0.8, per_class_cap=1, class_adaptive=True)
    assert sel.positions.tolist() == [2, 4, 6]


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.01), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(probs=torch.rand(5)), "probs"),
        (dict(probs=torch.rand(2, 3, 4)), "probs"),
        (dict(probs=torch.zeros(4, 0)), "probs"),
        (dict(probs=torch.ones(4, 3, dtype=torch.long)), "probs"),
        (dict(probs=[[0.5, 0.5]]), "probs"),
        (dict(per_class_cap=-1), "per_class_cap"),
        (dict(per_class_cap=2.5), "per_class_cap"),
    ],
)
def test_errors_name_the_argument(kwargs, name):
    args = dict(probs=PROBS, threshold=0.9)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name} "):
        select_pseudo_labels(**args)


def test_counts_per_class_validates():
    with pytest.raises(ValueError, match="^num_classes "):
        select_pseudo_labels(PROBS, 0.9).counts_per_class(0)


def test_selection_type():
    assert isinstance(select_pseudo_labels(PROBS, 0.9), PseudoLabelSelection)


# --- kNN smoothing in an embedding (the student's labels) ---

def _two_clusters(n: int = 20, seed: int = 0) -> torch.Tensor:
    """(2n, 4) features: n rows near +e0, n rows near +e1 (cosine ~1 inside, ~0 across)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([1.0, 0, 0, 0]) + 0.05 * torch.randn(n, 4, generator=g)
    b = torch.tensor([0, 1.0, 0, 0]) + 0.05 * torch.randn(n, 4, generator=g)
    return torch.cat([a, b])


def test_knn_smooth_outvotes_an_isolated_mistake():
    feats = _two_clusters()
    probs = torch.zeros(40, 3)
    probs[:20, 0] = 1.0
    probs[20:, 1] = 1.0
    probs[3] = torch.tensor([0.05, 0.9, 0.05])  # a confident mistake inside cluster 0
    out = knn_smooth(probs, feats, k=5)
    assert out.argmax(1).tolist() == [0] * 20 + [1] * 20
    torch.testing.assert_close(out.sum(1), torch.ones(40))


def test_knn_smooth_keeps_a_shared_mistake():
    """A whole cluster labeled wrongly stays wrong: the smoothing can only revise isolated errors."""
    feats = _two_clusters()
    probs = torch.zeros(40, 3)
    probs[:, 1] = 1.0
    assert knn_smooth(probs, feats, k=5).argmax(1).eq(1).all()


def test_knn_smooth_ignores_far_rows():
    """Neighbours only count by exp((sim - 1) / T): an opposite row hardly moves a row's own label."""
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = knn_smooth(probs, feats, k=1)
    assert out[0, 0] > 0.999 and out[1, 1] > 0.999


def test_knn_smooth_k_larger_than_rows_and_chunks_agree():
    feats = _two_clusters(7)
    probs = torch.softmax(torch.randn(14, 4, generator=torch.Generator().manual_seed(1)), 1)
    whole = knn_smooth(probs, feats, k=50)
    torch.testing.assert_close(knn_smooth(probs, feats, k=50, chunk_size=3), whole)
    assert whole.shape == (14, 4)


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=2, temperature=0.0), dict(k=2, chunk_size=0)])
def test_knn_smooth_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        knn_smooth(torch.full((4, 2), 0.5), torch.randn(4, 3), **kwargs)


def test_knn_smooth_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same N"):
        knn_smooth(torch.full((4, 2), 0.5), torch.randn(5, 3), k=2)


def test_knn_smooth_counts_the_row_itself_and_its_k_neighbours():
    """k = 1 mixes a row with exactly one neighbour (the nearest), weighted by similarity."""
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # cos(0,1) = 0.8, cos(1,2) = 0.6, cos(0,2) = 0
    probs = torch.eye(3)
    out = knn_smooth(probs, feats, k=1, temperature=1.0)
    w = torch.exp(torch.tensor(0.8 - 1.0))  # the neighbour's weight; the row itself weighs exp(0) = 1
    torch.testing.assert_close(out[0], torch.tensor([1.0, w, 0.0]) / (1 + w))
    assert out[0, 2] == 0  # the third row is not among row 0's single neighbour


@pytest.mark.parametrize("k", [1, 4, 30])
def test_knn_smooth_matches_slow_reference(k):
    """Row by row: the k + 1 most similar rows (itself included), weighted exp(cos / T), averaged."""
    g = torch.Generator().manual_seed(k)
    feats, probs = torch.randn(25, 6, generator=g), torch.softmax(torch.randn(25, 4, generator=g), 1)
    unit = feats / feats.norm(dim=1, keepdim=True)
    want = torch.empty_like(probs)
    for i in range(25):
        sims = unit @ unit[i]
        top = sims.argsort(descending=True)[: min(k + 1, 25)]
        w = torch.exp(sims[top] / 0.07)
        want[i] = (w[:, None] * probs[top]).sum(0) / w.sum()
    torch.testing.assert_close(knn_smooth(probs, feats, k=k, chunk_size=7), want, rtol=1e-4, atol=1e-5)


def test_knn_smooth_stays_finite_at_a_small_temperature():
    """exp(1 / 0.005) overflows float32; the votes are shifted by the largest cosine, 1."""
    g = torch.Generator().manual_seed(0)
    feats, probs = torch.randn(30, 4, generator=g), torch.softmax(torch.randn(30, 3, generator=g), 1)
    out = knn_smooth(probs, feats, k=3, temperature=0.005)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(30))
