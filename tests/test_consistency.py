"""Consistency training maths: FixMatch's loss, FlexMatch's thresholds, ReMixMatch's alignment, the EMA
teacher, against slow references written from the papers, and 2 gloo ranks == 1 process."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from gloo import spawn_ranks
import torch
import torch.distributed as dist
from torch import nn

from toolkit.maths import distributed
from toolkit.maths.consistency import (
    align_distribution,
    class_thresholds,
    confident_counts,
    ema_update,
    fixmatch_loss,
    update_running_mean,
)

# --- slow references, one row / one class at a time in float64 Python arithmetic -----------------


def reference_fixmatch(logits: torch.Tensor, probs: torch.Tensor, thresholds: list[float]):
    """Sohn et al. 2020, eq. 4: (1/B) sum_i 1[max q_i >= tau_{argmax q_i}] H(argmax q_i, softmax(l_i)).

    Returns (loss, mask, d loss / d logits) as Python floats / lists.
    """
    rows, cols = logits.shape
    logits_l, probs_l = logits.double().tolist(), probs.double().tolist()
    loss, mask, grad = 0.0, [], []
    for i in range(rows):
        q, label = probs_l[i][0], 0
        for c in range(1, cols):
            if probs_l[i][c] > q:  # strict: the first maximum wins ties
                q, label = probs_l[i][c], c
        keep = q >= thresholds[label]
        mask.append(keep)
        top = max(logits_l[i])
        denominator = sum(math.exp(v - top) for v in logits_l[i])
        softmax = [math.exp(v - top) / denominator for v in logits_l[i]]
        if keep:
            loss += -math.log(softmax[label]) / rows
            grad.append([(softmax[c] - (c == label)) / rows for c in range(cols)])
        else:
            grad.append([0.0] * cols)
    return loss, mask, grad


def reference_thresholds(base: float, sigma: list[float], unused: float, warmup: bool) -> list[float]:
    """Zhang et al. 2021: beta_c = sigma_c / max(max sigma, N - sum sigma) (eq. 11, warm-up) or
    sigma_c / max sigma (eq. 6); T_c = M(beta_c) * tau with M(x) = x / (2 - x) (eq. 7); 0/0 = 0."""
    denominator = max(sigma)
    if warmup and unused > denominator:
        denominator = unused
    out = []
    for s in sigma:
        beta = s / denominator if denominator > 0 else 0.0
        out.append(base * beta / (2.0 - beta))
    return out


def _batch(b: int = 12, c: int = 4, seed: int = 0, spread: float = 3.0):
    """Student logits (with grad) and teacher probabilities whose confidences range widely."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g).mul(2.0).requires_grad_()
    probs = torch.softmax(torch.randn(b, c, generator=g) * spread, dim=1)
    return logits, probs


# --- fixmatch_loss --------------------------------------------------------------------------------

THRESHOLD_CASES = {
    "all pass": torch.tensor(0.0),
    "0.5": torch.tensor(0.5),
    "0.95": torch.tensor(0.95),
    "per class": torch.tensor([0.9, 0.4, 0.75, 0.6]),
    "per class with a 0": torch.tensor([0.0, 0.99, 0.5, 0.8]),
}


@pytest.mark.parametrize("case", list(THRESHOLD_CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixmatch_matches_reference(case: str, seed: int) -> None:
    logits, probs = _batch(seed=seed)
    thresholds = THRESHOLD_CASES[case]
    per_class = thresholds.expand(4).tolist()  # float32 values, exactly as the code compares them
    ref_loss, ref_mask, ref_grad = reference_fixmatch(logits.detach(), probs, per_class)

    loss, mask = fixmatch_loss(logits, probs, thresholds)
    loss.backward()

    assert mask.dtype == torch.bool and mask.tolist() == ref_mask
    # float32 against float64 (log-softmax of logits up to ~8): 1e-6 would do; a wrong divisor or
    # a row let through wrongly moves the loss by > 1e-2.
    torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), torch.tensor(ref_grad, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_fixmatch_cases_exercise_the_mask() -> None:
    # The reference test above is only as good as its cases: some must keep a part of the batch.
    kept = {case: sum(reference_fixmatch(*_batch(seed=0), t.expand(4).tolist())[1]) for case, t in THRESHOLD_CASES.items()}
    assert kept["all pass"] == 12
    assert 0 < kept["0.95"] < kept["0.5"] < 12
    assert 0 < kept["per class"] < 12


def test_fixmatch_mask_by_hand() -> None:
    probs = torch.tensor([
        [0.96, 0.02, 0.02],  # class 0 at 0.96 >= 0.95: kept
        [0.90, 0.05, 0.05],  # class 0 at 0.90 <  0.95: dropped
        [0.25, 0.50, 0.25],  # class 1 at 0.50 >= 0.50 (>=, as FixMatch's ge): kept
        [0.10, 0.20, 0.70],  # class 2 at 0.70 <  0.80: dropped
        [0.40, 0.40, 0.20],  # a tie: the first class (0) at 0.40 < 0.95: dropped
    ])
    _, mask = fixmatch_loss(torch.zeros(5, 3), probs, torch.tensor([0.95, 0.5, 0.8]))
    assert mask.tolist() == [True, False, True, False, False]


def test_fixmatch_divides_by_the_whole_batch() -> None:
    logits, probs = _batch(b=8, seed=3)
    probs = probs.clone()
    probs[:2] = torch.tensor([0.97, 0.01, 0.01, 0.01])  # exactly 2 of 8 rows pass 0.95
    probs[2:] = torch.softmax(torch.zeros(6, 4), dim=1)
    loss, mask = fixmatch_loss(logits, probs, torch.tensor(0.95))
    assert mask.sum().item() == 2
    ce = torch.nn.functional.cross_entropy(logits[:2], torch.zeros(2, dtype=torch.long), reduction="sum")
    torch.testing.assert_close(loss, ce / 8)
    assert not torch.allclose(loss, ce / 2)


def test_fixmatch_nothing_passes_gives_zero_with_a_gradient() -> None:
    logits, probs = _batch()
    loss, mask = fixmatch_loss(logits, probs, torch.full((4,), 1.0))  # softmax rows never reach 1.0 here
    assert not mask.any()
    assert loss.item() == 0.0 and loss.ndim == 0
    assert loss.requires_grad  # backward() works on a step where no pseudo-label is confident
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))


def test_fixmatch_sends_no_gradient_to_the_teacher() -> None:
    logits, _ = _batch()
    teacher_logits = torch.randn(12, 4, requires_grad=True)
    loss, _ = fixmatch_loss(logits, torch.softmax(teacher_logits, dim=1), torch.tensor(0.0))
    loss.backward()
    assert teacher_logits.grad is None and logits.grad is not None


def test_fixmatch_half_precision_logits_are_computed_in_float32() -> None:
    logits, probs = _batch()
    loss, _ = fixmatch_loss(logits.detach().bfloat16(), probs.bfloat16(), torch.tensor(0.0))
    assert loss.dtype == torch.float32


def test_fixmatch_rejects_bad_shapes() -> None:
    logits, probs = _batch()
    with pytest.raises(ValueError, match="same shape"):
        fixmatch_loss(logits[:, :3], probs, torch.tensor(0.5))
    with pytest.raises(ValueError, match="thresholds"):
        fixmatch_loss(logits, probs, torch.tensor([0.5, 0.5]))


# --- class_thresholds -----------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [True, False])
def test_equal_counts_give_base(warmup: bool) -> None:
    out = class_thresholds(0.95, torch.full((5,), 7.0), 0, warmup=warmup)
    torch.testing.assert_close(out, torch.full((5,), 0.95))


def test_a_class_never_predicted_gets_threshold_zero() -> None:
    # FlexMatch: beta = 0 -> M(0) = 0 -> threshold 0, so *every* prediction of that class is kept
    # (their classwise_acc starts at 0 and masks with max_probs.ge(p_cutoff * acc / (2 - acc))).
    out = class_thresholds(0.9, torch.tensor([6.0, 0.0, 3.0]), 0)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.0, 0.9 * 0.5 / 1.5]))
    _, mask = fixmatch_loss(torch.zeros(1, 3), torch.tensor([[0.3, 0.4, 0.3]]), out)
    assert mask.tolist() == [True]  # a 0.4-confident class-1 pseudo-label passes
    # No counts at all (the very start of training): 0 / 0 is taken as 0, every threshold is 0.
    for warmup in (True, False):
        torch.testing.assert_close(class_thresholds(0.9, torch.zeros(3), 0, warmup=warmup), torch.zeros(3))
    torch.testing.assert_close(class_thresholds(0.9, torch.zeros(3), 50), torch.zeros(3))


def test_warmup_uses_unused_as_the_denominator() -> None:
    counts = torch.tensor([4.0, 2.0])
    # warm-up: beta = [4, 2] / max(4, 10) = [0.4, 0.2]; M = [0.4 / 1.6, 0.2 / 1.8] = [0.25, 1/9]
    torch.testing.assert_close(class_thresholds(0.9, counts, 10), torch.tensor([0.225, 0.1]))
    # without warm-up unused is ignored: beta = [1, 0.5]; M = [1, 1/3]
    torch.testing.assert_close(class_thresholds(0.9, counts, 10, warmup=False), torch.tensor([0.9, 0.3]))
    # once unused is below the largest count, warm-up changes nothing
    torch.testing.assert_close(class_thresholds(0.9, counts, 3), class_thresholds(0.9, counts, 3, warmup=False))
    # unused as a 0-d tensor (what all_reduce_sum gives back)
    torch.testing.assert_close(class_thresholds(0.9, counts, torch.tensor(10.0)), torch.tensor([0.225, 0.1]))


@pytest.mark.parametrize("warmup", [True, False])
def test_threshold_is_monotone_in_its_count(warmup: bool) -> None:
    base, others, unused = 0.95, [10.0, 7.0], 12.0
    mine, rest = [], []
    for s in range(0, 25):
        out = class_thresholds(base, torch.tensor([s, *others]), unused, warmup=warmup)
        mine.append(out[0].item())
        rest.append(out[1:].tolist())
    assert all(b >= a for a, b in zip(mine, mine[1:])), mine
    assert all(0.0 <= t <= base + 1e-7 for t in mine)
    # strictly increasing until class 0 leads (s = 10 without warm-up, 12 with), then at base
    lead = 12 if warmup else 10
    assert all(b > a for a, b in zip(mine[: lead + 1], mine[1 : lead + 1]))
    assert mine[-1] == pytest.approx(base)
    # the other classes never rise when class 0 gains
    for j in range(2):
        col = [r[j] for r in rest]
        assert all(b <= a + 1e-7 for a, b in zip(col, col[1:]))


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_class_thresholds_match_reference(warmup: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (10,), generator=g).float()
    counts[seed] = 0.0  # always a class never predicted
    unused = int(torch.randint(0, 80, (1,), generator=g))
    base = [0.95, 0.8, 0.7, 0.99][seed]
    expected = torch.tensor(reference_thresholds(base, counts.tolist(), unused, warmup), dtype=torch.float64)
    out = class_thresholds(base, counts.double(), unused, warmup=warmup)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert class_thresholds(base, counts, unused, warmup=warmup).dtype == torch.float32


@pytest.mark.parametrize(
    "base, counts, unused",
    [(0.0, torch.ones(3), 0), (1.5, torch.ones(3), 0), (0.9, torch.tensor([1.0, -1.0]), 0),
     (0.9, torch.ones(2, 2), 0), (0.9, torch.ones(3), -1)],
)
def test_class_thresholds_rejects_bad_input(base, counts, unused) -> None:
    with pytest.raises(ValueError):
        class_thresholds(base, counts, unused)


# --- align_distribution / update_running_mean -----------------------------------------------------


def _probs(b: int = 9, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, c, generator=g) * 2, dim=1)


def test_aligned_rows_sum_to_one() -> None:
    probs = _probs()
    g = torch.Generator().manual_seed(5)
    prior, mean = torch.rand(5, generator=g) + 0.1, _probs(seed=7).mean(0)
    out = align_distribution(probs, prior / prior.sum(), mean)
    assert out.shape == probs.shape and (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(9))


def test_alignment_is_the_identity_when_the_teacher_matches_the_prior() -> None:
    probs = _probs()
    mean = _probs(seed=3).mean(0)
    torch.testing.assert_close(align_distribution(probs, mean, mean.clone()), probs)


def test_alignment_by_hand() -> None:
    # ratio = [0.5 / 0.75, 0.5 / 0.25] = [2/3, 2] -> [1/3, 1] -> normalised [0.25, 0.75]
    out = align_distribution(torch.tensor([[0.5, 0.5]]), torch.tensor([0.5, 0.5]), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.75]]))


def test_alignment_pushes_an_over_predicted_class_down() -> None:
    probs = _probs(c=3)
    uniform = torch.full((3,), 1 / 3)
    over = torch.tensor([0.6, 0.2, 0.2])  # the teacher predicts class 0 far more often than 1/3
    out = align_distribution(probs, uniform, over)
    assert (out[:, 0] < probs[:, 0]).all()
    assert (out[:, 1:] > probs[:, 1:]).all()


def test_alignment_survives_a_class_whose_mean_underflowed() -> None:
    out = align_distribution(torch.tensor([[0.7, 0.3, 0.0]]), torch.full((3,), 1 / 3), torch.tensor([0.5, 0.5, 0.0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.3, 0.0]]))


def test_update_running_mean() -> None:
    running = torch.tensor([0.5, 0.5])
    batch = torch.tensor([1.0, 0.0], requires_grad=True)
    out = update_running_mean(running, batch, momentum=0.9)
    torch.testing.assert_close(out, torch.tensor([0.55, 0.45]))
    assert out is not running and running.tolist() == [0.5, 0.5]  # a new tensor; the old one untouched
    assert not out.requires_grad  # no graph chained across steps
    torch.testing.assert_close(update_running_mean(running, batch), torch.tensor([0.5005, 0.4995]))
    with pytest.raises(ValueError, match="momentum"):
        update_running_mean(running, batch, momentum=1.5)


# --- ema_update -----------------------------------------------------------------------------------


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():  # BatchNorm starts at weight 1, bias 0 in both nets: make them differ
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _pair() -> tuple[nn.Module, nn.Module]:
    teacher, student = _net(0), _net(1)
    student.train()
    student(torch.randn(8, 3))  # moves the student's BatchNorm statistics (and its batch count)
    return teacher, student


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _assert_buffers_copied(teacher: nn.Module, student: nn.Module) -> None:
    for (name, tb), (_, sb) in zip(teacher.named_buffers(), student.named_buffers()):
        assert torch.equal(tb, sb), name
    assert teacher[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("decay", [0.0, 1.0, 0.9])
def test_ema_update(decay: float) -> None:
    teacher, student = _pair()
    before_t, before_s = _params(teacher), _params(student)
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)
    ema_update(teacher, student, decay)
    for t, t0, s0 in zip(teacher.parameters(), before_t, before_s):
        if decay == 0.0:
            assert torch.equal(t, s0)  # a copy of the student
        elif decay == 1.0:
            assert torch.equal(t, t0)  # the teacher kept
        else:
            torch.testing.assert_close(t.detach(), 0.9 * t0 + 0.1 * s0)
            assert not torch.allclose(t, t0) and not torch.allclose(t, s0)
    _assert_buffers_copied(teacher, student)  # buffers are copied at every decay, 1 included
    for s, s0 in zip(student.parameters(), before_s):
        assert torch.equal(s, s0)  # the student is never touched


def test_ema_update_rejects_other_architectures_and_bad_decay() -> None:
    teacher, student = _pair()
    with pytest.raises(ValueError, match="same parameter"):
        ema_update(nn.Sequential(nn.Linear(3, 4)), student, 0.9)
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.01)


# --- confident_counts -----------------------------------------------------------------------------


def test_confident_counts_by_hand() -> None:
    probs = torch.tensor([
        [0.90, 0.10, 0.00],  # class 0, confident
        [0.20, 0.70, 0.10],  # class 1, below 0.8
        [0.96, 0.02, 0.02],  # class 0, confident
        [0.30, 0.30, 0.40],  # class 2, below
        [0.05, 0.05, 0.90],  # class 2, confident
    ])
    counts, below = confident_counts(probs, 0.8, 3)
    assert counts.dtype == torch.float32 and below.dtype == torch.float32 and below.ndim == 0
    assert counts.tolist() == [2.0, 0.0, 1.0] and below.item() == 2.0
    # >= at the boundary, first class on ties
    counts, below = confident_counts(torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]), 0.5, 3)
    assert counts.tolist() == [1.0, 0.0, 1.0] and below.item() == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        confident_counts(probs, 0.8, 4)


# --- all_reduce_sum without and with a process group ----------------------------------------------


def test_all_reduce_sum_without_process_group_is_a_clone() -> None:
    assert not distributed.is_dist()
    t = torch.arange(6.0).reshape(2, 3).T  # non-contiguous on purpose
    out = distributed.all_reduce_sum(t)
    torch.testing.assert_close(out, t)
    assert out.data_ptr() != t.data_ptr() and out.is_contiguous()
    out += 1
    assert t[0, 0].item() == 0.0  # the input is not shared


BASE, MOMENTUM, WORLD, C = 0.7, 0.9, 2, 4


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """16 rows of teacher probabilities whose two halves differ (rank 0 sees mostly class 0, rank 1
    mostly class 2), and student logits for them; identical in every process."""
    g = torch.Generator().manual_seed(11)
    raw = torch.randn(16, C, generator=g) * 2
    raw[:8, 0] += 4.0
    raw[8:, 2] += 4.0
    raw[8:10, 1] += 6.0
    return torch.softmax(raw, dim=1), torch.randn(16, C, generator=g)


def _statistics(probs, count, summed_counts, summed_below, summed_probs):
    """What the training loop computes once the statistics are (or are not) global."""
    thresholds = class_thresholds(BASE, summed_counts, summed_below)
    running = update_running_mean(torch.full((C,), 1 / C), summed_probs / count, MOMENTUM)
    return thresholds, running


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        probs, logits = _global_batch()
        n = probs.shape[0] // world
        mine = slice(rank * n, (rank + 1) * n)
        p, lg = probs[mine], logits[mine]
        counts, below = confident_counts(p, BASE, C)
        local_sum, local_n = p.sum(0), torch.tensor(float(n))
        results = {
            "global": _statistics(
                p,
                distributed.all_reduce_sum(local_n),
                distributed.all_reduce_sum(counts),
                distributed.all_reduce_sum(below),
                distributed.all_reduce_sum(local_sum),
            ),
            # The mistake the sum prevents: thresholds and prior from this rank's half alone.
            "local": _statistics(p, local_n, counts, below, local_sum),
        }
        thresholds = results["global"][0]
        loss, mask = fixmatch_loss(lg, p, thresholds)
        # DDP averages the per-rank losses; done by hand with a raw collective.
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        results["loss"], results["mask"] = loss / world, mask
        values = torch.tensor([rank + 1.0, 10.0 * rank])
        results["sum"] = distributed.all_reduce_sum(values)
        results["input_after"] = values
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory) -> list[dict]:
    """Run the 2-rank gloo job once (a few seconds) and return each rank's results."""
    return spawn_ranks(_gloo_worker, WORLD, tmp_path_factory.mktemp("gloo_consistency"))


@pytest.fixture(scope="module")
def one_process() -> dict:
    probs, logits = _global_batch()
    counts, below = confident_counts(probs, BASE, C)
    thresholds, running = _statistics(probs, torch.tensor(16.0), counts, below, probs.sum(0))
    loss, mask = fixmatch_loss(logits, probs, thresholds)
    return {"thresholds": thresholds, "running": running, "loss": loss, "mask": mask}


def test_two_gloo_ranks_match_one_process(gloo_results, one_process) -> None:
    # Counts are whole numbers (exact); the probability sums are added in another order: float32
    # rounding only, far inside 1e-6. The half-batch statistics (next test) are off by > 0.05.
    for result in gloo_results:
        thresholds, running = result["global"]
        torch.testing.assert_close(thresholds, one_process["thresholds"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(running, one_process["running"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(result["loss"], one_process["loss"], atol=1e-6, rtol=1e-5)
    mask = torch.cat([r["mask"] for r in gloo_results])
    assert mask.tolist() == one_process["mask"].tolist()
    assert 0 < int(mask.sum()) < 16


def test_half_batch_statistics_differ(gloo_results, one_process) -> None:
    # Proves the test above can fail: without the sum each rank's thresholds and prior are its own.
    for result in gloo_results:
        thresholds, running = result["local"]
        assert (thresholds - one_process["thresholds"]).abs().max().item() > 0.05
        assert (running - one_process["running"]).abs().max().item() > 0.005


def test_all_reduce_sum_with_two_ranks(gloo_results) -> None:
    for rank, result in enumerate(gloo_results):
        torch.testing.assert_close(result["sum"], torch.tensor([3.0, 10.0]))  # [1, 0] + [2, 10]
        torch.testing.assert_close(result["input_after"], torch.tensor([rank + 1.0, 10.0 * rank]))
