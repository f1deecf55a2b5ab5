"""benchmarks/edge_check.py stays working: a few of its cheap bad-input scenarios through its own functions
(the real CLI in a subprocess), and its judge failing what is not clean."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import edge_check  # noqa: E402

CHEAP = ["mistyped-key", "name-parent", "yaml-not-utf8", "predict-pickle-model"]


@pytest.mark.parametrize("name", CHEAP)
def test_cheap_bad_inputs_are_clean(name, tmp_path, data_root):
    (case,) = [c for c in edge_check.BAD_CASES if c.name == name]
    outcome = edge_check.run_bad(case, tmp_path, Path(data_root), timeout=120)
    assert outcome.ok, outcome.observed
    assert outcome.observed.startswith(f"toolkit {case.command}: error: ")


def test_the_bad_cases_have_distinct_names_and_are_many():
    names = [c.name for c in edge_check.BAD_CASES]
    assert len(names) == len(set(names)) and len(names) >= 60


def test_the_judge_fails_what_is_not_clean(tmp_path, data_root):
    (case,) = [c for c in edge_check.BAD_CASES if c.name == "mistyped-key"]
    files = edge_check.CaseFiles(tmp_path, Path(data_root))
    line = "toolkit pretrain: error: unknown config key 'pretrain.epoch'; did you mean 'pretrain.epochs'?\n"
    assert edge_check.judge_bad(case, edge_check.Proc(2, "", line), files, set())[1]
    assert not edge_check.judge_bad(case, edge_check.Proc(0, "", line), files, set())[1]
    assert not edge_check.judge_bad(case, edge_check.Proc(2, "", "Ray started\n" + line), files, set())[1]
    assert not edge_check.judge_bad(case, edge_check.Proc(2, "", "toolkit pretrain: error: bad\n"), files, set())[1]
    (tmp_path / "runs" / "stages" / "k").mkdir(parents=True)
    (tmp_path / "runs" / "stages" / "k" / ".lock").touch()
    observed, ok = edge_check.judge_bad(case, edge_check.Proc(2, "", line), files, set())
    assert not ok and "runs/stages/k" in observed and ".lock" in observed
    files.marker.touch()
    assert "marker" in edge_check.judge_bad(case, edge_check.Proc(2, "", line), files, set())[0]
