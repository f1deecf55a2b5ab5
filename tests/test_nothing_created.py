"""Bad input creates nothing: every input ``tests/test_bad_input.py`` rejects (and bad ``toolkit predict``
inputs) ends with exit 2 and one line, and leaves the output folder and the MLflow store as they were.

Here tracking is on, with its default sqlite store inside ``run.output_dir``: a command that
opened an MLflow run, took a run's ``.lock`` or made a stage folder before finding the bad
input leaves a new path under ``tmp_path``. Each case compares every path under ``tmp_path``
(the broken files the case built included) before and after the command.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_bad_input import CASES, Ctx, no_ray  # noqa: F401 - no_ray: Ray must not start here either

from toolkit import cli

HEX_ID = "0123456789abcdef0123456789abcdef"


def _paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _mlflow_runs(root: Path) -> list[str]:
    """Every run (any status) in every sqlite store under ``root``."""
    out = []
    for db in root.rglob("*.db"):
        con = sqlite3.connect(db)
        try:
            out += [f"{db.name}: {r[0]} {r[1]}" for r in con.execute("select run_uuid, status from runs")]
        except sqlite3.Error:
            pass
        finally:
            con.close()
    return out


def _run_and_check(tmp_path: Path, command: str, argv: list[str], capsys) -> str:
    """Run ``toolkit COMMAND ARGV``; assert exit 2, one line on stderr, nothing new under ``tmp_path``; the line."""
    before = _paths(tmp_path)
    capsys.readouterr()
    try:
        rc = cli.main([command, *argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip("\n").splitlines()) == 1 and "Traceback" not in err, err
    new = sorted(_paths(tmp_path) - before)
    assert not [p for p in new if Path(p).name == ".lock"], f"a run lock was left: {new}"
    assert not [p for p in new if "stages" in Path(p).parts], f"a stage folder was left: {new}"
    assert not _mlflow_runs(tmp_path), f"an MLflow run was created: {_mlflow_runs(tmp_path)}"
    assert not new, f"bad input created {new}"
    return err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_rejected_input_creates_nothing(case, tmp_path, data_root, capsys):
    ctx = Ctx(tmp_path, data_root)
    args = case.argv(ctx) if callable(case.argv) else list(case.argv)
    # tracking on, its store in the output folder: an MLflow run would show there (a case's own values win)
    safe = [f"run.output_dir={tmp_path / 'runs'}", "tracking.enabled=true", f"run.data_root={data_root}"]
    err = _run_and_check(tmp_path, case.command, [*safe, *args], capsys)
    assert case.expect.lower() in err.lower(), err  # refused for its own bad input, not for the settings around it


# bad `toolkit predict` inputs: (model, images); MODEL / IMAGES: a valid classifier file / idx3 file
PREDICT = [
    ("MODEL", "missing.idx3", "no such file"),
    ("MODEL", "notes.txt", "unknown format"),
    ("missing-model.pt", "IMAGES", "no such file, and not an MLflow run id or model URI"),
    ("notes.txt", "IMAGES", "not a readable toolkit checkpoint"),
    ("", "IMAGES", "predict.model is empty"),
    ("MODEL", "", "predict.input is empty"),
    (HEX_ID, "IMAGES", HEX_ID),
    (f"runs:/{HEX_ID}/model", "IMAGES", HEX_ID),
    ("models:/no-such-model/1", "IMAGES", "no-such-model"),
]


@pytest.mark.parametrize("model, images, words", PREDICT, ids=[f"{m or 'empty'}|{i or 'empty'}" for m, i, _ in PREDICT])
def test_rejected_predict_input_creates_nothing(model, images, words, tmp_path, data_root, capsys):
    ctx = Ctx(tmp_path, data_root)
    ctx.file("notes.txt", "hello")
    good_images = ctx.file("ok-idx3-ubyte", (2051).to_bytes(4, "big") + (1).to_bytes(4, "big") + (28).to_bytes(4, "big")
                           + (28).to_bytes(4, "big") + bytes(784))
    model_ref = {"MODEL": ctx.ckpt("classifier")}.get(model, str(tmp_path / model) if model.endswith((".pt", ".txt")) else model)
    images_ref = good_images if images == "IMAGES" else (str(tmp_path / images) if images else "")
    argv = [f"run.output_dir={tmp_path / 'runs'}", f"predict.model={model_ref}", f"predict.input={images_ref}",
            f"predict.output={tmp_path / 'out' / 'labels.csv'}"]
    err = _run_and_check(tmp_path, "predict", argv, capsys)
    assert words in err, err


def test_a_value_overridden_later_is_still_checked(tmp_path, capsys):
    """``--backend local`` does not hide ``run.backend=gpu``: each value given is validated."""
    err = _run_and_check(tmp_path, "pretrain", [f"run.output_dir={tmp_path / 'runs'}", "run.backend=gpu",
                                                "--backend", "local"], capsys)
    assert "run.backend='gpu' is not allowed" in err and "overridden by a later value" in err, err


def test_a_stage_reads_its_data_before_it_makes_its_folder(tmp_path, data_root):
    """The run skeleton itself (not only the CLI's preflight): broken MNIST files fail before the stage's folder,
    its ``.lock`` or its MLflow run exist."""
    from toolkit.config import Config
    from toolkit.datasets.mnist import DataError
    from toolkit.stages.pretrain import pretrain

    ctx = Ctx(tmp_path, data_root)
    cfg = Config().replace(**{"run.data_root": ctx.data("train-labels-idx1-ubyte", b""), "run.output_dir": str(tmp_path / "runs"),
                              "run.backend": "local", "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    before = _paths(tmp_path)
    with pytest.raises(DataError, match="truncated"):
        pretrain(cfg.study, cfg.execution)
    assert sorted(_paths(tmp_path) - before) == []
