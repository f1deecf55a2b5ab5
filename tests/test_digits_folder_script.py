"""benchmarks/digits_folder.py, its pure parts: the folder it writes, the scoring of a
pool_labels.csv, the summary and one LabelSpreading baseline. No toolkit pipeline runs here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "digits_folder.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("digits_folder_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _labeled_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "labeled").rglob("*.png"))


def test_folder_holds_the_split_and_the_scans(bench, tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    truth = bench.write_digits_folder(tmp_path / "d", seed=0, labels_per_class=5)
    root = tmp_path / "d"
    assert sorted(p.name for p in root.iterdir()) == ["labeled", "unlabeled"]  # no truth inside the data folder
    assert sorted(p.name for p in (root / "labeled").iterdir()) == [str(c) for c in range(10)]
    labeled = _labeled_files(root)
    assert len(labeled) == 50
    for c in range(10):
        files = list((root / "labeled" / str(c)).iterdir())
        assert len(files) == 5
        for f in files:
            i = int(f.stem)
            assert d.target[i] == c
            with Image.open(f) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size == (8, 8)
                px = np.asarray(im)
            assert np.array_equal(px, np.rint(d.images[i] * 255 / 16).astype(np.uint8))
    pool = sorted(p.name for p in (root / "unlabeled").iterdir())
    assert len(pool) == 1797 - 50 and list(truth) == pool and set(truth) == set(pool)
    labeled_rows = {int(Path(f).stem) for f in labeled}
    assert labeled_rows.isdisjoint(int(Path(f).stem) for f in pool)
    for name in pool[::97]:
        i = int(Path(name).stem)
        assert truth[name] == d.target[i]
        with Image.open(root / "unlabeled" / name) as im:
            assert im.mode == "L"
            assert np.array_equal(np.asarray(im), np.rint(d.images[i] * 255 / 16).astype(np.uint8))
    # v = 16 is white, v = 0 black, v = 8 (255 * 8 / 16 = 127.5) rounds to 128
    _, pixels, _ = bench.digits()
    assert pixels.max() == 255 and pixels.min() == 0 and set(np.unique(pixels)) <= {round(v * 255 / 16) for v in range(17)}
    assert 128 in np.unique(pixels)

    assert bench.write_digits_folder(tmp_path / "again", 0, 5) == truth
    assert _labeled_files(tmp_path / "again") == labeled
    bench.write_digits_folder(tmp_path / "other", 1, 5)
    assert _labeled_files(tmp_path / "other") != labeled
    with pytest.raises(FileExistsError):
        bench.write_digits_folder(root, 0, 5)


def test_truth_csv_round_trips(bench, tmp_path):
    bench.write_truth(tmp_path / "s" / "truth.csv", {"0001.png": 1, "0002.png": 7})
    assert (tmp_path / "s" / "truth.csv").read_text().splitlines() == ["file,label", "0001.png,1", "0002.png,7"]


def test_pool_labels_are_scored_by_column_name(bench, tmp_path):
    truth = {"a.png": 1, "b.png": 2, "c.png": 3, "d.png": 4, "sub/e.png": 5}
    csv_path = tmp_path / "pool_labels.csv"
    # columns in another order, extra ones ignored; d.png missing; one wrong label (b)
    csv_path.write_text(
        "round,label,file,agreement,confidence\n"
        "1,1,a.png,1.0,0.99\n"
        "1,9,b.png,0.5,0.95\n"
        "2,3,c.png,1.0,0.40\n"
        "2,5,sub/e.png,1.0,0.30\n"
    )
    s = bench.score_pool_labels(csv_path, truth)
    assert s["pool"] == 5 and s["covered"] == 4 and s["coverage"] == pytest.approx(0.8) and s["coverage"] < 1
    assert not s["exactly_once"] and s["duplicates"] == 0 and s["unknown"] == 0
    assert s["accuracy"] == pytest.approx(3 / 5)  # the missing file counts as wrong
    assert s["accuracy_covered"] == pytest.approx(3 / 4)
    assert s["top50_n"] == 2 and s["top50_accuracy"] == pytest.approx(1 / 2)  # a (right), b (wrong)

    full = tmp_path / "full.csv"
    full.write_text("file,label,confidence\n" + "".join(f"{f},{c},{c / 10}\n" for f, c in truth.items()))
    s = bench.score_pool_labels(full, truth)
    assert s["exactly_once"] and s["coverage"] == 1 and s["accuracy"] == 1 and s["top50_n"] == 3

    dup = tmp_path / "dup.csv"
    dup.write_text("file,label,confidence\na.png,1,0.9\na.png,2,0.8\nzzz.png,1,0.5\n")
    s = bench.score_pool_labels(dup, {"a.png": 1})
    assert s["duplicates"] == 1 and s["unknown"] == 1 and not s["exactly_once"] and s["accuracy"] == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("file,prediction\na.png,1\n")
    with pytest.raises(ValueError, match="label"):
        bench.score_pool_labels(bad, truth)


def test_summary_and_table(bench):
    s = bench.summarize([0.9, 0.92, 0.94, None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2)
    assert s["ci95"] == pytest.approx([0.92 - half, 0.92 + half])
    assert bench.summarize([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci95": None}
    rows = [{"seed": 0, "baseline_knn7": 0.9}, {"seed": 1, "baseline_knn7": 0.94}]
    summary = {k: bench.summarize([r.get(k) for r in rows]) for k, _, _ in bench.COLUMNS}
    table = bench.markdown_table(rows, summary)
    assert "| 0 | 90.00 |" in table and "92.00 ± 2.83" in table and "toolkit" not in table


def test_toolkit_command(bench, tmp_path):
    cmd = bench.toolkit_command(tmp_path / "data", tmp_path / "out", "train.epochs=2 'run.name=a b'", python="py")
    assert cmd == ["py", "-m", "toolkit.cli", "pipeline", "data.name=folder", f"run.data_root={tmp_path / 'data'}",
                   f"run.output_dir={tmp_path / 'out'}", "train.epochs=2", "run.name=a b"]


def test_label_spreading_baseline_is_sane(bench):
    acc = bench.baseline_accuracy(0, 5)
    assert 0.8 < acc < 1.0
    assert acc == bench.baseline_accuracy(0, 5)  # the same split each time


FAKE_PIPELINE = '''
import csv, sys
from pathlib import Path
assert sys.argv[1] == "pipeline" and "data.name=folder" in sys.argv, sys.argv
kv = dict(a.split("=", 1) for a in sys.argv[2:])
if kv.get("fake.fail"):
    print("fake pipeline: error: asked to fail", file=sys.stderr)
    sys.exit(2)
pool = sorted(p.relative_to(Path(kv["run.data_root"]) / "unlabeled").as_posix()
              for p in (Path(kv["run.data_root"]) / "unlabeled").rglob("*.png"))
out = Path(kv["run.output_dir"])
out.mkdir(parents=True)
with open(out / "pool_labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "label", "confidence", "agreement", "round"])
    for name in pool:
        w.writerow([name, "1", 0.5, 1.0, 1])
'''


def test_main_runs_a_stand_in_pipeline_and_scores_it(bench, tmp_path, monkeypatch, capsys):
    """The whole script on one seed, the pipeline replaced by a module that labels every pool image '1'."""
    import json

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "fake_pipeline.py").write_text(FAKE_PIPELINE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    work = tmp_path / "work"
    assert bench.main(["--seeds", "0", "--work", str(work), "--toolkit-module", "fake_pipeline"]) == 0
    res = json.loads((work / "results.json").read_text())
    (row,) = res["rows"]
    truth = (work / "seed0" / "truth.csv").read_text().splitlines()[1:]
    ones = sum(line.endswith(",1") for line in truth)
    assert row["pool"] == len(truth) == 1747 and row["toolkit_exactly_once"] and row["toolkit_coverage"] == 1
    assert row["toolkit_accuracy"] == pytest.approx(ones / 1747) and row["toolkit_seconds"] > 0
    assert row["baseline_accuracy"] == row["baseline_knn7"] > 0.8
    assert "| 0 |" in capsys.readouterr().out and res["summary"]["toolkit_accuracy"]["n"] == 1

    # a failing pipeline: exit status 1, the error recorded, the stale output of the last run gone
    assert bench.main(["--seeds", "0", "--work", str(work), "--toolkit-module", "fake_pipeline",
                       "--toolkit-args", "fake.fail=1"]) == 1
    (row,) = json.loads((work / "results.json").read_text())["rows"]
    assert row["toolkit_error"] == "exit status 2" and not (work / "seed0" / "out").exists()
    assert "asked to fail" in capsys.readouterr().err

    # a folder the script did not make is refused
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "file").write_text("x")
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0", "--work", str(tmp_path / "someone"), "--baseline-only"])
