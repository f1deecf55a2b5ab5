"""Schedules against hand-computed values: the formulas in the docstrings are what runs."""

import math

import pytest
import torch

from toolkit.maths.schedules import (
    THRESHOLD_SCHEDULES,
    constant_threshold,
    cosine_threshold,
    exponential_threshold,
    linear_threshold,
    step_threshold,
    rate_problem,
    threshold_at,
    warmup_cosine,
    warmup_cosine_lambda,
)


def _all_rounds(kind, start, floor, rounds, **kw):
    return [threshold_at(r, kind, start, floor, rounds, **kw) for r in range(rounds)]


ANY_RATE = dict(rate=0.5, step_every=1)  # read by exponential and step only


# --- threshold schedules: known values ---------------------------------------------------------


def test_schedule_names():
    assert THRESHOLD_SCHEDULES == ("constant", "linear", "exponential", "cosine", "step")


def test_constant_known_values():
    assert _all_rounds("constant", 0.95, 0.7, 4) == [0.95, 0.95, 0.95, 0.95]
    assert constant_threshold(2, 0.95, 0.7, 4) == 0.95


def test_linear_known_values():
    # start - (start - floor) * r / (rounds - 1) = 0.99 - 0.09 * r / 3
    assert _all_rounds("linear", 0.99, 0.9, 4) == pytest.approx([0.99, 0.96, 0.93, 0.90], abs=1e-12)
    assert linear_threshold(1, 0.99, 0.9, 4) == pytest.approx(0.96, abs=1e-12)


def test_exponential_known_values():
    # floor + (start - floor) * rate ** r = 0.9 + 0.09 * 0.5 ** r
    expected = [0.99, 0.945, 0.9225, 0.91125]
    assert _all_rounds("exponential", 0.99, 0.9, 4, rate=0.5) == pytest.approx(expected, abs=1e-12)
    # rate 0.1: 0.9 + 0.09 * 0.1 ** r
    assert _all_rounds("exponential", 0.99, 0.9, 3, rate=0.1) == pytest.approx([0.99, 0.909, 0.9009], abs=1e-12)
    assert exponential_threshold(3, 0.99, 0.9, 4, 0.5) == pytest.approx(0.91125, abs=1e-12)


def test_cosine_known_values():
    # floor + (start - floor) * 0.5 * (1 + cos(pi * r / (rounds - 1)))
    assert _all_rounds("cosine", 0.99, 0.9, 3) == pytest.approx([0.99, 0.945, 0.9], abs=1e-12)
    # rounds 5, r 1: cos(pi / 4) = 0.70710678...; 0.9 + 0.045 * 1.70710678... = 0.97681980515...
    assert cosine_threshold(1, 0.99, 0.9, 5) == pytest.approx(0.9768198051533946, abs=1e-12)
    # r 3: cos(3 pi / 4) = -0.70710678...; 0.9 + 0.045 * 0.29289321... = 0.91318019484...
    assert cosine_threshold(3, 0.99, 0.9, 5) == pytest.approx(0.9131801948466054, abs=1e-12)


def test_step_known_values():
    # start - rate * (r // step_every), clipped at floor
    got = _all_rounds("step", 0.99, 0.9, 8, rate=0.03, step_every=2)
    assert got == pytest.approx([0.99, 0.99, 0.96, 0.96, 0.93, 0.93, 0.90, 0.90], abs=1e-12)
    got = _all_rounds("step", 0.99, 0.9, 5, rate=0.04, step_every=1)
    assert got == pytest.approx([0.99, 0.95, 0.91, 0.90, 0.90], abs=1e-12)
    assert step_threshold(2, 0.99, 0.9, 5, 0.04, 1) == pytest.approx(0.91, abs=1e-12)
    # the config help's example on the default start, floor and rounds: a drop of 0.02 a round
    got = _all_rounds("step", 0.99, 0.9, 5, rate=0.02, step_every=1)
    assert got == pytest.approx([0.99, 0.97, 0.95, 0.93, 0.91], abs=1e-12)
    # a drop larger than start - floor reaches the floor at the first step (the config's 0.5)
    assert _all_rounds("step", 0.99, 0.9, 3, rate=0.5, step_every=1) == pytest.approx([0.99, 0.9, 0.9], abs=1e-12)


def test_rate_and_step_every_have_no_default_here():
    # the config holds the one default (tests/test_config_map.py); a kind that reads one needs it
    with pytest.raises(ValueError, match="^rate is required by the exponential schedule"):
        threshold_at(2, "exponential", 0.99, 0.9, 4)
    with pytest.raises(ValueError, match="^rate is required by the step schedule"):
        threshold_at(2, "step", 0.99, 0.9, 4, step_every=1)
    with pytest.raises(ValueError, match="^step_every is required"):
        threshold_at(2, "step", 0.99, 0.9, 4, rate=0.02)
    assert threshold_at(1, "linear", 0.99, 0.9, 4) == pytest.approx(0.96, abs=1e-12)


def test_rate_rules():
    assert rate_problem("exponential", 0.5) is None and rate_problem("step", 1.0) is None
    assert rate_problem("exponential", 1.0) == "must be in (0, 1) for exponential"
    assert rate_problem("step", 1.5) == "must be in (0, 1] for step"
    assert rate_problem("linear", 7.0) is None  # linear reads no rate


def test_single_round_is_start():
    for kind in THRESHOLD_SCHEDULES:
        assert threshold_at(0, kind, 0.97, 0.8, 1, **ANY_RATE) == 0.97


def test_floor_equal_start_is_constant():
    for kind in THRESHOLD_SCHEDULES:
        assert _all_rounds(kind, 0.9, 0.9, 5, **ANY_RATE) == [0.9] * 5


def test_rate_ignored_by_kinds_that_do_not_use_it():
    # a config may carry a rate that only exponential/step read
    assert threshold_at(1, "linear", 0.99, 0.9, 4, rate=7.0) == pytest.approx(0.96, abs=1e-12)


# --- threshold schedules: properties -----------------------------------------------------------


@pytest.mark.parametrize("kind", THRESHOLD_SCHEDULES)
@pytest.mark.parametrize("start,floor,rounds", [(0.99, 0.9, 6), (1.0, 0.5, 10), (0.8, 0.05, 3), (0.6, 0.6, 4)])
@pytest.mark.parametrize("rate,step_every", [(0.5, 1), (0.3, 2), (0.9, 3)])
def test_monotone_and_bounded(kind, start, floor, rounds, rate, step_every):
    values = _all_rounds(kind, start, floor, rounds, rate=rate, step_every=step_every)
    assert values[0] == start
    assert all(floor <= v <= start for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_linear_and_cosine_reach_floor_exactly(kind):
    assert threshold_at(6, kind, 0.99, 0.9, 7) == 0.9


# --- threshold schedules: errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(start=0.0), "start"),
        (dict(start=1.2), "start"),
        (dict(start=float("nan")), "start"),
        (dict(floor=0.0), "floor"),
        (dict(floor=-0.1), "floor"),
        (dict(floor=0.995), "floor"),  # above start
        (dict(rounds=0), "rounds"),
        (dict(rounds=2.5), "rounds"),
        (dict(round_index=4), "round_index"),  # == rounds
        (dict(round_index=-1), "round_index"),
        (dict(kind="exponential", rate=1.0), "rate"),
        (dict(kind="exponential", rate=0.0), "rate"),
        (dict(kind="step", rate=0.0), "rate"),
        (dict(kind="step", rate=1.5), "rate"),
        (dict(kind="step", step_every=0), "step_every"),
    ],
)
def test_threshold_errors_name_the_argument(kwargs, name):
    args = dict(round_index=0, kind="linear", start=0.99, floor=0.9, rounds=4, **ANY_RATE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name} "):
        threshold_at(**args)


def test_unknown_kind_lists_allowed_kinds():
    with pytest.raises(ValueError, match="kind") as err:
        threshold_at(0, "polynomial", 0.99, 0.9, 4, **ANY_RATE)
    for kind in THRESHOLD_SCHEDULES:
        assert kind in str(err.value)


def test_per_kind_functions_validate_too():
    with pytest.raises(ValueError, match="floor"):
        linear_threshold(0, 0.9, 0.95, 3)
    with pytest.raises(ValueError, match="rate"):
        exponential_threshold(0, 0.99, 0.9, 3, rate=1.1)


# --- warmup_cosine -----------------------------------------------------------------------------


def test_warmup_cosine_known_values():
    # W = 2, T = 10, base 1, final 0
    lr = [warmup_cosine(s, 10, 2, 1.0) for s in range(11)]
    assert lr[0] == pytest.approx(0.5, abs=1e-12)  # base * 1 / 2
    assert lr[1] == pytest.approx(1.0, abs=1e-12)  # base * 2 / 2
    assert lr[2] == pytest.approx(1.0, abs=1e-12)  # cosine progress 0
    assert lr[6] == pytest.approx(0.5, abs=1e-12)  # progress 4 / 8 = 0.5
    assert lr[8] == pytest.approx(0.14644660940672627, abs=1e-12)  # 0.5 * (1 + cos(3 pi / 4))
    assert lr[10] == 0.0
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))


def test_warmup_cosine_final_ratio_and_base():
    # base 2, final_ratio 0.1 -> final 0.2; midpoint of the cosine = 0.2 + 1.8 * 0.5 = 1.1
    assert warmup_cosine(6, 10, 2, 2.0, 0.1) == pytest.approx(1.1, abs=1e-12)
    assert warmup_cosine(10, 10, 2, 2.0, 0.1) == pytest.approx(0.2, abs=1e-12)
    assert warmup_cosine(25, 10, 2, 2.0, 0.1) == pytest.approx(0.2, abs=1e-12)  # past the end


def test_warmup_cosine_edge_warmups():
    assert warmup_cosine(0, 10, 0, 0.3) == pytest.approx(0.3, abs=1e-12)  # no warmup: pure cosine
    assert warmup_cosine(5, 10, 0, 0.3) == pytest.approx(0.15, abs=1e-12)
    # warmup over the whole run: 0.25, 0.5, 0.75, 1.0, then final
    assert [warmup_cosine(s, 4, 4, 1.0) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0])


@pytest.mark.parametrize(
    "args,name",
    [
        ((0, 0, 0, 1.0, 0.0), "total_steps"),
        ((0, 10, -1, 1.0, 0.0), "warmup_steps"),
        ((0, 10, 11, 1.0, 0.0), "warmup_steps"),
        ((0, 10, 2, 1.0, -0.1), "final_ratio"),
        ((0, 10, 2, 1.0, 1.5), "final_ratio"),
        ((-1, 10, 2, 1.0, 0.0), "step"),
        ((0, 10, 2, 0.0, 0.0), "base"),
    ],
)
def test_warmup_cosine_errors(args, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        warmup_cosine(*args)


def test_warmup_cosine_lambda_drives_lambdalr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_lambda(10, 2, 0.1))
    seen = []
    for _ in range(11):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [warmup_cosine(s, 10, 2, 0.1, 0.1) for s in range(11)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[0] == pytest.approx(0.05, abs=1e-12)
    assert seen[10] == pytest.approx(0.01, abs=1e-12)
    assert math.isclose(warmup_cosine_lambda(10, 2)(6), 0.5)


def test_warmup_cosine_lambda_validates_eagerly():
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lambda(5, 6)
