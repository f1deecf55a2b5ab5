"""NT-Xent: against a slow reference from the paper, invariances, and 2 gloo ranks == 1 process."""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from unittest import mock

import pytest
from gloo import spawn_ranks
import torch
import torch.distributed as dist

from toolkit.maths import distributed
from toolkit.maths import losses
from toolkit.maths.losses import nt_xent_loss


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """Chen et al. 2020, eq. 1, one anchor at a time, in float64 Python arithmetic.

    Embeddings are z = [z1; z2] (2N of them); the positive of i is i + N (mod 2N).
    """
    z = torch.cat([z1, z2]).double()
    two_n = z.shape[0]
    n = two_n // 2

    def sim(u: torch.Tensor, v: torch.Tensor) -> float:
        return (u @ v).item() / (u.norm().item() * v.norm().item())

    total = 0.0
    for i in range(two_n):
        j = (i + n) % two_n
        numerator = math.exp(sim(z[i], z[j]) / temperature)
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(two_n) if k != i)
        total += -math.log(numerator / denominator)
    return total / two_n


def _views(n: int = 6, d: int = 5, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


# --- (a) the slow reference ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.07, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_paper_reference(temperature: float, seed: int) -> None:
    z1, z2 = _views(seed=seed)
    expected = reference_nt_xent(z1, z2, temperature)
    # float32 against float64 (seen 2e-7 relative); counting the anchor itself among the
    # negatives, a wrong positive or a wrong temperature is off by > 1e-2
    assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-4)


def test_matches_reference_in_float64() -> None:
    z1, z2 = _views(n=5, d=3, dtype=torch.float64)
    loss = nt_xent_loss(z1, z2, 0.3)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference_nt_xent(z1, z2, 0.3), rel=1e-12)


def test_single_pair_has_zero_loss() -> None:
    # With one pair, the positive is the only candidate: the softmax is certain.
    z1, z2 = _views(n=1)
    assert nt_xent_loss(z1, z2, 0.5).item() == pytest.approx(0.0, abs=1e-6)


# --- (b) invariances ----------------------------------------------------------------------


def test_swapping_views_gives_same_loss() -> None:
    z1, z2 = _views()
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.2), nt_xent_loss(z2, z1, 0.2))


def test_scaling_embeddings_does_not_matter() -> None:
    z1, z2 = _views()
    # A different positive scale per row: cosine similarity ignores all of them.
    s1 = torch.linspace(0.1, 30.0, z1.shape[0])[:, None]
    s2 = torch.linspace(5.0, 0.5, z2.shape[0])[:, None]
    torch.testing.assert_close(nt_xent_loss(z1 * s1, z2 * s2, 0.5), nt_xent_loss(z1, z2, 0.5))


def test_aligned_views_score_lower_than_random() -> None:
    n, d = 8, 16
    aligned = torch.eye(n, d)  # both views identical, pairs orthogonal to each other
    z1, z2 = _views(n=n, d=d)
    low = nt_xent_loss(aligned, aligned.clone(), 0.5).item()
    random = nt_xent_loss(z1, z2, 0.5).item()
    # Closed form for the aligned case: positive logit 1/t, 2n-2 negatives at 0.
    assert low == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / 0.5)), rel=1e-5)
    assert low < random - 1.0


def test_bf16_inputs_are_computed_in_float32() -> None:
    z1, z2 = _views(n=16, d=8)
    b1 = z1.bfloat16().requires_grad_()
    b2 = z2.bfloat16().requires_grad_()
    loss = nt_xent_loss(b1, b2, 0.1)
    assert loss.dtype == torch.float32
    # Same value as float32 maths on the bf16-rounded inputs.
    expected = nt_xent_loss(b1.detach().float(), b2.detach().float(), 0.1)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert b1.grad is not None and b1.grad.dtype == torch.bfloat16


def test_gather_is_a_no_op_without_process_group() -> None:
    assert not distributed.is_dist()
    z1, z2 = _views()
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.5, gather=True), nt_xent_loss(z1, z2, 0.5, gather=False))


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan")])
def test_rejects_bad_temperature(temperature: float) -> None:
    z1, z2 = _views()
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, temperature)


@pytest.mark.parametrize(
    "shape1, shape2",
    [((6, 5), (5, 5)), ((6, 5), (6, 4)), ((6,), (6,)), ((2, 3, 4), (2, 3, 4)), ((0, 5), (0, 5))],
)
def test_rejects_bad_shapes(shape1: tuple[int, ...], shape2: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="z1 and z2|empty"):
        nt_xent_loss(torch.randn(shape1), torch.randn(shape2), 0.5)


def test_distributed_helpers_fall_back_to_one_process() -> None:
    t = torch.randn(3, 2, requires_grad=True)
    assert (distributed.world_size(), distributed.rank()) == (1, 0)
    assert distributed.gather_with_grad(t) is t


# --- (c) 2 gloo ranks x B/2 == 1 process x B ------------------------------------------------

N_GLOBAL, D_IN, D_OUT, TEMPERATURE, WORLD = 8, 6, 4, 0.5, 2


class _NaiveGather(torch.autograd.Function):
    """The known-wrong gather (lightly #1528, bolts #179): backward keeps only this rank's
    slice of its own gradient and never all_reduces, dropping the other ranks' terms."""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.n = t.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_out):
        start = dist.get_rank() * ctx.n
        return grad_out[start : start + ctx.n]


def _problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A tiny shared projection and a global batch of two views; identical in every process."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(D_IN, D_OUT)
    g = torch.Generator().manual_seed(1)
    return layer, torch.randn(N_GLOBAL, D_IN, generator=g), torch.randn(N_GLOBAL, D_IN, generator=g)


def _loss_and_grads(layer, x1, x2, gather: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.zero_grad()
    loss = nt_xent_loss(layer(x1), layer(x2), TEMPERATURE, gather=gather)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in layer.parameters()]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        layer, x1, x2 = _problem()
        n = N_GLOBAL // world
        mine = slice(rank * n, (rank + 1) * n)
        results: dict = {}
        for mode in ("gather", "naive", "local"):
            patch = (
                mock.patch.object(losses, "gather_with_grad", _NaiveGather.apply)
                if mode == "naive"
                else contextlib.nullcontext()
            )
            with patch:
                loss, grads = _loss_and_grads(layer, x1[mine], x2[mine], gather=mode != "local")
            # What DDP does, done by hand with raw collectives (independent of the code under test):
            # average the loss for reporting and the parameter gradients for the update.
            for t in [loss, *grads]:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t /= world
            results[mode] = (loss, grads)

        local = torch.arange(3.0) + 10 * rank  # rank 0: [0, 1, 2], rank 1: [10, 11, 12]
        results["helpers"] = {
            "world_size": distributed.world_size(),
            "rank": distributed.rank(),
            "gathered_with_grad": distributed.gather_with_grad(local.clone().requires_grad_()).detach(),
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory) -> list[dict]:
    """Run the 2-rank gloo job once (a couple of seconds) and return each rank's results."""
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("gloo"))


@pytest.fixture(scope="module")
def single_process() -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer, x1, x2 = _problem()
    return _loss_and_grads(layer, x1, x2)


def test_two_gloo_ranks_match_one_process(gloo_results, single_process) -> None:
    # Two half-batch matmuls and an all_reduce sum in another order than one full-batch pass:
    # float32 rounding only (seen 1.2e-7 on gradients up to 1.6). The known-wrong gather is
    # off by 0.19 (next test), so 1e-5 is a real check with room for any BLAS build.
    ref_loss, ref_grads = single_process
    for result in gloo_results:
        loss, grads = result["gather"]
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)


def test_naive_gather_gives_same_loss_but_wrong_gradients(gloo_results, single_process) -> None:
    # Proves the test above can fail: the forward pass is identical, so the loss matches
    # and the bug is silent; only the gradients show it.
    ref_loss, ref_grads = single_process
    loss, grads = gloo_results[0]["naive"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    worst = max((g - ref).abs().max().item() for g, ref in zip(grads, ref_grads))
    assert worst > 1e-3, f"naive gather unexpectedly matched (max grad diff {worst:.2e})"


def test_local_negatives_differ_from_global(gloo_results, single_process) -> None:
    # gather=False contrasts against the local half only: a different (easier) objective.
    ref_loss, _ = single_process
    loss, _ = gloo_results[0]["local"]
    assert loss.item() < ref_loss.item() - 0.1


def test_distributed_helpers_with_two_ranks(gloo_results) -> None:
    expected_gather = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    for r, result in enumerate(gloo_results):
        h = result["helpers"]
        assert (h["world_size"], h["rank"]) == (WORLD, r)
        torch.testing.assert_close(h["gathered_with_grad"], expected_gather)
