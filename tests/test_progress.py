"""The driver's progress line: rate and time left from the units done since timing began."""

from __future__ import annotations

import pytest

from toolkit.engine import workers as train_loops
from toolkit.engine.workers import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(train_loops.time, "perf_counter", c)
    return c


def _eta(line: str) -> float:
    return float(line.rsplit("eta ", 1)[1].rstrip("s\n"))


def test_steps_reported_in_chunks_give_the_right_eta(clock, capsys):
    progress = Progress("supervised", 600, "step", rank=0)
    clock.now += 20.0  # 200 steps in 20 s -> 400 left take 40 s
    progress(200, {"val_acc": 0.5})
    line = capsys.readouterr().out
    assert line.startswith("[supervised] step 200/600") and _eta(line) == pytest.approx(40, abs=1)


def test_a_resumed_run_counts_only_the_new_units(clock, capsys):
    progress = Progress("pretrain", 10, "epoch", rank=0, start=6)
    clock.now += 30.0  # epoch 7 took 30 s -> 3 left take 90 s
    progress(7, {"loss": 1.0})
    assert _eta(capsys.readouterr().out) == pytest.approx(90, abs=1)


def test_other_ranks_stay_silent(clock, capsys):
    Progress("pretrain", 10, "epoch", rank=1)(1, {"loss": 1.0})
    assert capsys.readouterr().out == ""
