"""`toolkit student` trains the student of given teachers like the other stage commands, and refuses a
teacher that is not a classifier of this model in one line, before it creates anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit import cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded


def _tiny(data_root: str, out: Path) -> list[str]:
    return [f"run.data_root={data_root}", "data.train_subset=1500", "data.test_subset=200", "split.val_size=200",
            "model.width=8", "classifier.steps=30", "classifier.eval_every=15", "classifier.batch_size=64",
            "student.steps=30", "student.knn_k=0", "student.tta_views=0", "run.threads=1",
            f"run.output_dir={out}", "tracking.enabled=false"]


def test_student_command_trains_on_the_teachers_labels_and_resumes_as_finished(data_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli.main(["supervised", "--backend", "local", *_tiny(data_root, out)]) == 0
    teacher = next(out.glob("stages/supervised-*/model.pt"))
    argv = ["student", "--backend", "local", *_tiny(data_root, out), f"student.teachers=[{teacher}]"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "[student] 1 teachers label" in text
    student_dirs = list(out.glob("stages/student-*-from-*"))
    assert len(student_dirs) == 1 and (student_dirs[0] / "model.pt").is_file()
    assert cli.main(argv) == 0  # the same command again: finished, skipped
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("teacher", ["text", "missing", "none"])
def test_a_bad_teacher_is_one_line_and_creates_nothing(data_root, tmp_path, capsys, teacher):
    out = tmp_path / "runs"
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model\n")
    given = {"text": [f"student.teachers=[{bad}]"], "missing": [f"student.teachers=[{tmp_path / 'no.pt'}]"],
             "none": []}[teacher]
    assert cli.main(["student", "--backend", "local", *_tiny(data_root, out), *given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    cause = {"text": "student.teachers[0]", "missing": "neither an existing checkpoint file nor an MLflow run id",
             "none": "student.teachers is empty"}[teacher]
    assert len(err) == 1 and cause in err[0], err
    assert not out.exists(), list(out.rglob("*"))  # checked before the output folder is made
