"""The report's 95% interval of a mean over split seeds, against scipy's t-distribution."""

import math

import pytest
from scipy import stats

from toolkit.stages.report import interval95, interval_text, to_markdown, _row


@pytest.mark.parametrize("n", [2, 3, 5, 10, 31])
def test_interval_matches_scipys_t_interval(n):
    values = [0.985 + 0.001 * ((7 * i) % 5) for i in range(n)]
    mean, sem = sum(values) / n, stats.sem(values)
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    got = interval95(values)
    assert got is not None
    # the table's t quantiles have 3 decimals; beyond 30 seeds it uses the normal quantile
    assert got[0] == pytest.approx(low, abs=3e-3 * sem + 1e-12)
    assert got[1] == pytest.approx(high, abs=3e-3 * sem + 1e-12)


def test_interval_needs_two_seeds():
    assert interval95([0.99]) is None
    assert interval_text([0.99]) == "-"
    assert interval_text([]) == "-"


def test_report_table_shows_the_interval_beside_mean_and_std():
    row = _row("student", "student", {100: 0.99, 101: 0.98, 102: 0.97}, {100: 0.99, 101: 0.98, 102: 0.97}, None)
    low, high = interval95([0.99, 0.98, 0.97])
    assert math.isclose(low + high, 2 * 0.98)
    text = to_markdown([row], [100, 101, 102])
    assert f"[{100 * low:.2f}, {100 * high:.2f}]%" in text
    assert "95% interval" in text.splitlines()[3]
