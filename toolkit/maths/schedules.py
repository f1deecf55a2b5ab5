"""Learning-rate and pseudo-label threshold schedules as pure functions of the step or round.

Every formula is written in its function's docstring and pinned by ``tests/test_schedules.py``
on hand-computed values, so the code cannot drift from what the docs say.
"""

from __future__ import annotations

import math
from typing import Callable

# The schedules take every setting as an argument, without defaults: the defaults are the
# config's (``PseudoLabelConfig``), which also holds their names and which rate each accepts,
# so the config, below this floor, never imports the maths.
from toolkit.config.study_sections import THRESHOLD_SCHEDULES, rate_problem


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_warmup_cosine(total_steps: int, warmup_steps: int, final_ratio: float) -> None:
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be <= total_steps ({total_steps}), got {warmup_steps}")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base: float, final_ratio: float = 0.0
) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    With ``W = warmup_steps``, ``T = total_steps`` and ``final = base * final_ratio``::

        step <  W:       lr = base * (step + 1) / W
        W <= step < T:   lr = final + (base - final) * 0.5 * (1 + cos(pi * (step - W) / (T - W)))
        step >= T:       lr = final

    So the last warmup step reaches ``base`` exactly, the first cosine step is ``base`` too,
    and the curve would reach ``final`` at ``step == T`` (one past the last step of a run of
    ``T`` steps). ``W = 0`` gives a pure cosine.
    """
    _check_warmup_cosine(total_steps, warmup_steps, final_ratio)
    _check_int("step", step, 0)
    if not base > 0.0:
        raise ValueError(f"base must be > 0, got {base}")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    final = base * final_ratio
    if step >= total_steps:
        return final
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lambda(
    total_steps: int, warmup_steps: int, final_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier ``step -> warmup_cosine(step, total_steps, warmup_steps, 1.0, final_ratio)``.

    For ``torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(...))``: the
    optimizer's lr is the ``base``, and LambdaLR calls the function with 0 at construction and
    with 1, 2, ... after each ``scheduler.step()``. Arguments are validated here, not at step 0.
    """
    _check_warmup_cosine(total_steps, warmup_steps, final_ratio)

    def multiplier(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, 1.0, final_ratio)

    return multiplier


# ---------------------------------------------------------------------------------------------
# Pseudo-label confidence thresholds, one value per offline round r = 0, 1, ..., rounds - 1
# ---------------------------------------------------------------------------------------------


def _check_threshold_args(round_index: int, start: float, floor: float, rounds: int) -> None:
    _check_int("rounds", rounds, 1)
    _check_int("round_index", round_index, 0)
    if round_index >= rounds:
        raise ValueError(f"round_index must be < rounds ({rounds}), got {round_index}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1], got {start}")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    if floor > start:
        raise ValueError(f"floor must be <= start ({start}), got {floor}")


def _check_rate(kind: str, rate: float) -> None:
    problem = rate_problem(kind, rate)
    if problem:
        raise ValueError(f"rate {problem}, got {rate}")


def _clip(value: float, start: float, floor: float) -> float:
    # Guards against float round-off pushing a value a hair outside [floor, start].
    return min(start, max(floor, value))


def constant_threshold(round_index: int, start: float, floor: float, rounds: int) -> float:
    """``threshold(r) = start`` for every round (``floor`` is validated but unused)."""
    _check_threshold_args(round_index, start, floor, rounds)
    return start


def linear_threshold(round_index: int, start: float, floor: float, rounds: int) -> float:
    """``threshold(r) = start - (start - floor) * r / (rounds - 1)``; ``start`` if ``rounds == 1``.

    Round 0 uses ``start``, the last round uses ``floor``.
    """
    _check_threshold_args(round_index, start, floor, rounds)
    if rounds == 1:
        return start
    return _clip(start - (start - floor) * round_index / (rounds - 1), start, floor)


def exponential_threshold(round_index: int, start: float, floor: float, rounds: int, rate: float) -> float:
    """``threshold(r) = floor + (start - floor) * rate ** r`` with ``rate`` in (0, 1).

    The gap to ``floor`` shrinks by the factor ``rate`` each round; ``floor`` is approached,
    not reached, so ``rounds`` only bounds ``r``.
    """
    _check_threshold_args(round_index, start, floor, rounds)
    _check_rate("exponential", rate)
    return _clip(floor + (start - floor) * rate**round_index, start, floor)


def cosine_threshold(round_index: int, start: float, floor: float, rounds: int) -> float:
    """``threshold(r) = floor + (start - floor) * 0.5 * (1 + cos(pi * r / (rounds - 1)))``.

    ``start`` at round 0, ``floor`` at the last round, ``start`` if ``rounds == 1``; drops
    slowly at first and last, fastest in the middle.
    """
    _check_threshold_args(round_index, start, floor, rounds)
    if rounds == 1:
        return start
    value = floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * round_index / (rounds - 1)))
    return _clip(value, start, floor)


def step_threshold(
    round_index: int, start: float, floor: float, rounds: int, rate: float, step_every: int
) -> float:
    """``threshold(r) = max(floor, start - rate * (r // step_every))`` with ``rate`` in (0, 1].

    ``rate`` is the drop in threshold units, applied once every ``step_every`` rounds; the
    floor is reached at ``r = step_every * ceil((start - floor) / rate)``. E.g. start 0.99,
    floor 0.9, rate 0.03, step_every 2: 0.99, 0.99, 0.96, 0.96, 0.93, 0.93, 0.9, ...
    """
    _check_threshold_args(round_index, start, floor, rounds)
    _check_rate("step", rate)
    _check_int("step_every", step_every, 1)
    return _clip(start - rate * (round_index // step_every), start, floor)


def threshold_at(
    round_index: int,
    kind: str,
    start: float,
    floor: float,
    rounds: int,
    rate: float | None = None,
    step_every: int | None = None,
) -> float:
    """Confidence threshold for round ``round_index`` of ``rounds`` under schedule ``kind``.

    ``kind`` is one of ``THRESHOLD_SCHEDULES``; the formula of each is in its function:
    constant ``start``; linear ``start - (start - floor) * r / (rounds - 1)``; exponential
    ``floor + (start - floor) * rate ** r``; cosine
    ``floor + (start - floor) * 0.5 * (1 + cos(pi * r / (rounds - 1)))``; step
    ``start - rate * (r // step_every)``. Every result lies in ``[floor, start]``.
    ``rate`` is read only by ``exponential`` and ``step``, ``step_every`` only by ``step``;
    a kind that reads one needs it given (there is no default here: the config's is the one).
    """
    if kind not in THRESHOLD_SCHEDULES:
        raise ValueError(f"kind must be one of {', '.join(THRESHOLD_SCHEDULES)}; got {kind!r}")
    if kind in ("exponential", "step") and rate is None:
        raise ValueError(f"rate is required by the {kind} schedule")
    if kind == "step" and step_every is None:
        raise ValueError("step_every is required by the step schedule")
    if kind == "constant":
        return constant_threshold(round_index, start, floor, rounds)
    if kind == "linear":
        return linear_threshold(round_index, start, floor, rounds)
    if kind == "cosine":
        return cosine_threshold(round_index, start, floor, rounds)
    if kind == "exponential":
        return exponential_threshold(round_index, start, floor, rounds, rate)
    return step_threshold(round_index, start, floor, rounds, rate, step_every)
