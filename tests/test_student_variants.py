"""benchmarks/student_variants.py picks each seed's teachers from a pipeline's finished stage folders by
their configs, and writes the per-seed figures with their mean ± std."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from toolkit.engine import checkpoints
from toolkit.stages.skeleton import StageResult

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("student_variants", REPO / "benchmarks" / "student_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(stages: Path, name: str, seed: int, init: str = "scratch", finished: bool = True) -> str:
    """A stage folder as the pipeline leaves it: config, model file, and (once finished) result.json."""
    folder = stages / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"split": {"seed": seed}, "model": {"init": init}}))
    model = str(checkpoints.save(folder / checkpoints.MODEL_FILE, {"kind": "classifier", "state_dict": {"w": torch.zeros(1)}}))
    if finished:
        StageResult(name.split("-")[0], name, model_path=model).save(folder)
    return model


@pytest.fixture
def stages(tmp_path):
    s = tmp_path / "run" / "stages"
    enc = _stage(s, "pretrain-aaaa", 0)
    made = {
        "encoder": enc,
        "scratch0": _stage(s, "pseudolabel-iterative-bbbb-from-cccc", 0),
        "simclr0": _stage(s, "pseudolabel-iterative-dddd", 0, init=f"simclr:{enc}"),
        "scratch1": _stage(s, "pseudolabel-iterative-eeee-from-ffff", 1),
        "student0": _stage(s, "student-gggg-from-hhhh", 0),
    }
    # interrupted: its model file is there, its result is not, so the pipeline would run it again
    _stage(s, "pseudolabel-iterative-iiii", 1, init=f"simclr:{enc}", finished=False)
    return s, made


def test_teachers_are_chosen_by_seed_and_start(stages):
    s, made = stages
    sv = _script()
    assert sv.teachers_for(s, 0, "scratch") == [made["scratch0"]]
    assert sv.teachers_for(s, 0, "both") == [made["scratch0"], made["simclr0"]]
    assert sv.teachers_for(s, 0, "second") == [made["student0"]]
    assert sv.teachers_for(s, 1, "scratch") == [made["scratch1"]]


@pytest.mark.parametrize("seed, which, says", [
    (1, "both", "no finished SimCLR-initialised iterative stage for split seed 1"),  # interrupted: no result
    (1, "second", "no finished student for split seed 1"),
    (2, "scratch", "no finished scratch iterative stage for split seed 2"),
])
def test_a_missing_teacher_is_one_clear_line(stages, seed, which, says):
    s, _ = stages
    with pytest.raises(SystemExit) as e:
        _script().teachers_for(s, seed, which)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_main_trains_each_seed_from_its_teachers_and_writes_mean_and_std(stages, tmp_path, monkeypatch, capsys):
    s, made = stages
    sv = _script()
    calls = []

    def fake_student(study, execution, teachers, encoder=None):
        calls.append((study.split.seed, study.model.seed, study.student.steps, execution.tracking.enabled, teachers,
                      encoder))
        acc = {0: 0.98, 1: 0.96}[study.split.seed]
        return StageResult("student", "k", metrics={"test_acc": acc, "val_acc": acc + 0.01,
                                                    "diagnostic/pseudo_precision_total": 0.97})

    monkeypatch.setattr(sv, "student", fake_student)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["student_variants.py", str(s.parent), str(out), "--seeds", "0,1",
                                      "student.steps=7"])
    assert sv.main() == 0
    assert calls == [(0, 0, 7, False, [made["scratch0"]], made["encoder"]),
                     (1, 1, 7, False, [made["scratch1"]], made["encoder"])]
    summary = json.loads((out / "student_variants.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]
    assert summary["test_acc"] == "97.00 ± 1.41%" and summary["overrides"] == ["student.steps=7"]
    assert "| mean ± std | 97.00 ± 1.41% |" in capsys.readouterr().out
