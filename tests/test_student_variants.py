"""benchmarks/student_variants.py picks each seed's teachers from a pipeline's stage folders by their configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("student_variants", REPO / "benchmarks" / "student_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(stages: Path, name: str, seed: int, init: str = "scratch", finished: bool = True) -> str:
    folder = stages / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"split": {"seed": seed}, "model": {"init": init}}))
    if finished:
        (folder / "model.pt").write_bytes(b"weights")
    return str(folder / "model.pt")


@pytest.fixture
def stages(tmp_path):
    s = tmp_path / "stages"
    enc = _stage(s, "pretrain-aaaa", 0)
    made = {
        "scratch0": _stage(s, "pseudolabel-iterative-bbbb-from-cccc", 0),
        "simclr0": _stage(s, "pseudolabel-iterative-dddd", 0, init=f"simclr:{enc}"),
        "scratch1": _stage(s, "pseudolabel-iterative-eeee-from-ffff", 1),
        "student0": _stage(s, "student-gggg-from-hhhh", 0),
    }
    _stage(s, "pseudolabel-iterative-iiii", 1, init=f"simclr:{enc}", finished=False)  # interrupted: no model file
    return s, made


def test_teachers_are_chosen_by_seed_and_start(stages):
    s, made = stages
    sv = _script()
    assert sv.teachers_for(s, 0, "scratch") == [made["scratch0"]]
    assert sv.teachers_for(s, 0, "both") == [made["scratch0"], made["simclr0"]]
    assert sv.teachers_for(s, 0, "second") == [made["student0"]]
    assert sv.teachers_for(s, 1, "scratch") == [made["scratch1"]]


@pytest.mark.parametrize("seed, which, says", [
    (1, "both", "no SimCLR-initialised iterative stage for split seed 1"),  # its folder has no model file
    (1, "second", "no finished student for split seed 1"),
    (2, "scratch", "no finished scratch iterative stage for split seed 2"),
])
def test_a_missing_teacher_is_one_clear_line(stages, seed, which, says):
    s, _ = stages
    with pytest.raises(SystemExit) as e:
        _script().teachers_for(s, seed, which)
    assert says in str(e.value) and "\n" not in str(e.value)
