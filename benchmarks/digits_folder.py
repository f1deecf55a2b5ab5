"""scikit-learn's digits as a user's own image folder: the toolkit pipeline against LabelSpreading, per split seed.

    python benchmarks/digits_folder.py --seeds 0 1 2 3 4 --labels-per-class 5 --work /tmp/digits-bench \\
        [--toolkit-args "key=value ..."] [--baseline-only] [--timeout SECONDS] [--toolkit-module toolkit.cli] \\
        [--tag NAME] [--keep-out]

The data are ``sklearn.datasets.load_digits`` (1797 real 8x8 scans, values 0..16, 10 classes;
shipped with scikit-learn, nothing downloaded). For each split seed k:

1. ``numpy.random.default_rng(k)`` draws ``--labels-per-class`` images of each digit (class 0
   first, then 1, ...); the other images are the unlabeled pool. ``WORK/seed<k>/data`` gets
   ``labeled/<digit>/<index:04d>.png`` and ``unlabeled/<index:04d>.png`` (``index``: the row in
   ``load_digits``), 8-bit grayscale PNGs with pixel = round(v * 255 / 16). The pool's true
   labels go to ``WORK/seed<k>/truth.csv`` (``file,label``), outside the data folder, so
   nothing the toolkit reads holds a hidden label.
2. Baseline: scikit-learn's ``LabelSpreading`` on the same split, transductive accuracy on the
   pool. The headline baseline is ``kernel='knn', n_neighbors=7`` on the 64 pixels / 16 (on
   seeds 0-4 with 5 labels per class it gives 92.56%, sample std 2.18, population std 1.95:
   the "92.6 +- 2.0%" reference, if that used the population std). Two rbf settings are
   reported beside it: ``gamma=0.25`` on the pixels / 16, and ``gamma=0.25`` on the raw 0..16
   pixels, the setting of scikit-learn's own label-propagation digits examples (the same as
   gamma 64 on pixels / 16), which is the strongest of the three.
3. Toolkit (unless ``--baseline-only``): ``python -m toolkit.cli pipeline data.name=folder
   run.data_root=WORK/seed<k>/data run.output_dir=WORK/seed<k>/out`` plus ``--toolkit-args``
   (split with shell rules), run from the repository root with this interpreter (``toolkit.cli``:
   the ``toolkit`` console script's module, as ``edge_check.py`` calls it; the package itself has
   no ``__main__``; ``--toolkit-module`` changes it); its output goes to
   ``WORK/seed<k>/toolkit.log`` and its wall time is recorded. On ``--timeout`` its whole
   process group is killed. ``out/pool_labels.csv``
   (columns read by name: ``file`` relative to ``unlabeled/``, ``label``, ``confidence``; any
   others ignored) is scored against the truth: accuracy over the whole pool (a file missing
   from the CSV counts as wrong), coverage, whether every pool file appears exactly once, and
   the accuracy of the most confident half of the labeled files. As a diagnostic, the CSV's
   ``ensemble_label`` column (the teachers' kNN-smoothed ensemble the student learned from),
   when present, is scored too.

``--tag NAME`` keeps the files of several configs apart: ``results-NAME.json``,
``seed<k>/toolkit-NAME.log``, ``seed<k>/out-NAME`` (a copy of the scored CSV goes to
``seed<k>/pool_labels-NAME.csv``). ``--keep-out`` shares one output folder per seed,
``seed<k>/out``, between runs and does not clear it, so a config that differs from an earlier
one only in later stages reuses the finished stages (the toolkit skips a stage whose study
sections did not change, e.g. the SimCLR pretraining): its recorded time then covers only
the stages that ran (the log says which were skipped; ``toolkit_skipped`` lists them).

Prints a markdown table (one row per seed, then mean +- sample std and the 95% t-interval over
seeds of each column) and writes the same to ``WORK/results.json`` (``results-TAG.json`` with
``--tag``; rewritten after each seed).
``WORK`` belongs to the script: it must be empty, new, or a folder this script made before; each
run rewrites ``seed<k>/data`` and ``truth.csv`` and (unless ``--keep-out``) removes the seed's out
folder before the pipeline runs, so every recorded time is then a run from scratch. Exit status 1
when a pipeline run failed or its CSV did not cover the pool exactly once, else 0.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MARKER = ".digits_folder_bench"  # marks a work folder this script made (so it may clear its sub-folders)

# LabelSpreading settings: name -> (estimator keywords, feature scale: pixels are divided by it)
BASELINES = {
    "knn7": ({"kernel": "knn", "n_neighbors": 7}, 16.0),
    "rbf0.25": ({"kernel": "rbf", "gamma": 0.25}, 16.0),
    "rbf0.25_raw": ({"kernel": "rbf", "gamma": 0.25}, 1.0),
}
HEADLINE_BASELINE = "knn7"
BASELINE_TITLES = {
    "knn7": "LabelSpreading knn k=7 (px/16)",
    "rbf0.25": "LabelSpreading rbf γ=0.25 (px/16)",
    "rbf0.25_raw": "LabelSpreading rbf γ=0.25 (raw 0..16)",
}


# ----------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw 0..16 images as float64 (n, 8, 8), 8-bit pixels (n, 8, 8), targets (n,)), read-only."""
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = np.asarray(d.images, dtype=np.float64)
    pixels = np.rint(raw * (255 / 16)).astype(np.uint8)  # round(v * 255 / 16); v = 8 -> 127.5 -> 128 either way
    target = np.asarray(d.target, dtype=np.int64)
    for a in (raw, pixels, target):
        a.flags.writeable = False
    return raw, pixels, target


def split_indices(target: np.ndarray, seed: int, labels_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(labeled rows, unlabeled rows), both sorted: ``labels_per_class`` rows of each class drawn
    without replacement by ``numpy.random.default_rng(seed)``, classes in ascending order."""
    if labels_per_class < 1:
        raise ValueError(f"labels_per_class must be at least 1, got {labels_per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(target):
        rows = np.flatnonzero(target == c)
        if len(rows) <= labels_per_class:
            raise ValueError(f"class {c} has {len(rows)} images: too few for {labels_per_class} labels and a pool")
        chosen.append(rng.choice(rows, labels_per_class, replace=False))
    labeled = np.sort(np.concatenate(chosen))
    unlabeled = np.setdiff1d(np.arange(len(target)), labeled)
    return labeled, unlabeled


def write_digits_folder(root, seed: int, labels_per_class: int) -> dict[str, int]:
    """Write the split of ``seed`` as an image folder under ``root`` (which must be new or empty):
    ``labeled/<digit>/<index:04d>.png`` and ``unlabeled/<index:04d>.png``. Returns the pool's truth,
    ``{file relative to unlabeled/ (posix): true digit}``, in file order; it is not written here."""
    from PIL import Image

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    _, pixels, target = digits()
    labeled, unlabeled = split_indices(target, seed, labels_per_class)
    for c in np.unique(target):
        (root / "labeled" / str(c)).mkdir(parents=True, exist_ok=True)
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for i in labeled:
        Image.fromarray(pixels[i]).save(root / "labeled" / str(target[i]) / f"{i:04d}.png")
    truth = {}
    for i in unlabeled:
        name = f"{i:04d}.png"
        Image.fromarray(pixels[i]).save(root / "unlabeled" / name)
        truth[name] = int(target[i])
    return truth


def write_truth(path, truth: dict[str, int]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for name, label in truth.items():
            w.writerow([name, label])


# ----------------------------------------------------------------------------- baseline

def baseline_accuracy(seed: int, labels_per_class: int, setting: str = HEADLINE_BASELINE) -> float:
    """Transductive accuracy of LabelSpreading (``BASELINES[setting]``) on the pool of the split."""
    from sklearn.semi_supervised import LabelSpreading

    kwargs, scale = BASELINES[setting]
    raw, _, target = digits()
    x = raw.reshape(len(raw), -1) / scale
    labeled, unlabeled = split_indices(target, seed, labels_per_class)
    y = np.full(len(target), -1)
    y[labeled] = target[labeled]
    model = LabelSpreading(**kwargs).fit(x, y)
    return float(np.mean(model.transduction_[unlabeled] == target[unlabeled]))


# ----------------------------------------------------------------------------- toolkit

TOOLKIT_MODULE = "toolkit.cli"


def toolkit_command(data_dir, out_dir, toolkit_args: str = "", python: str | None = None,
                    module: str = TOOLKIT_MODULE) -> list[str]:
    return [python or sys.executable, "-m", module, "pipeline", "data.name=folder",
            f"run.data_root={Path(data_dir)}", f"run.output_dir={Path(out_dir)}", *shlex.split(toolkit_args)]


def run_toolkit(data_dir, out_dir, toolkit_args: str = "", log_path=None, timeout: float | None = None,
                module: str = TOOLKIT_MODULE) -> dict:
    """Run the pipeline once from the repository root; stdout and stderr go to ``log_path``.
    Returns ``{"command", "returncode", "seconds", "pool_labels"}`` (returncode None when it ran
    past ``timeout`` and its process group was killed)."""
    cmd = toolkit_command(data_dir, out_dir, toolkit_args, module=module)
    log_path = Path(log_path) if log_path else Path(out_dir).parent / "toolkit.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        except BaseException:  # Ctrl-C: take the pipeline down with us
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
    seconds = time.perf_counter() - t0
    return {"command": shlex.join(cmd), "returncode": rc, "seconds": seconds,
            "pool_labels": str(Path(out_dir) / "pool_labels.csv")}


def read_pool_labels(csv_path) -> list[tuple[str, str, float]]:
    """(file, label, confidence) per row of ``pool_labels.csv``, columns found by name in the
    header (others ignored). A confidence that is empty or not a number reads as NaN."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("file", "label", "confidence") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: no column {', '.join(missing)} in header {reader.fieldnames}")
        rows = []
        for r in reader:
            try:
                conf = float(r["confidence"])
            except (TypeError, ValueError):
                conf = math.nan
            rows.append(((r["file"] or "").strip(), (r["label"] or "").strip(), conf))
    return rows


def score_ensemble_labels(csv_path, truth: dict[str, int]) -> float | None:
    """Accuracy over the pool of the CSV's ``ensemble_label`` column (a missing file counts as
    wrong; the first row of a file is scored), or None when the CSV has no such column."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if "ensemble_label" not in (reader.fieldnames or []):
            return None
        first: dict[str, str] = {}
        for r in reader:
            first.setdefault((r["file"] or "").strip(), (r["ensemble_label"] or "").strip())
    if not truth:
        return math.nan
    return sum(first.get(name) == str(label) for name, label in truth.items()) / len(truth)


def skipped_stages(log_path) -> list[str]:
    """The stages a pipeline log says it skipped (``[stage] <key> already finished``)."""
    out = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if " already finished" in line and line.startswith("["):
            out.append(line[1:line.index("]")])
    return out


def score_pool_labels(csv_path, truth: dict[str, int]) -> dict:
    """Score ``pool_labels.csv`` against the pool's truth (labels compared as class names, ``str(digit)``).

    ``accuracy``: correct / pool size (a pool file missing from the CSV counts as wrong);
    ``accuracy_covered``: correct / pool files present; ``coverage``: pool files present / pool size;
    ``duplicates``: pool files on more than one row (the first row is scored); ``unknown``: rows
    naming no pool file; ``exactly_once``: every pool file on exactly one row and nothing else;
    ``top50_accuracy``: accuracy of the ceil(n/2) most confident of the n pool files present
    (NaN confidence last, ties in file order)."""
    rows = read_pool_labels(csv_path)
    first: dict[str, tuple[str, float]] = {}
    counts: dict[str, int] = {}
    unknown = 0
    for name, label, conf in rows:
        if name not in truth:
            unknown += 1
            continue
        counts[name] = counts.get(name, 0) + 1
        first.setdefault(name, (label, conf))
    n = len(truth)
    right = {name: label == str(truth[name]) for name, (label, _) in first.items()}
    correct = sum(right.values())
    ranked = sorted(first, key=lambda name: (-first[name][1] if not math.isnan(first[name][1]) else math.inf, name))
    top = ranked[:math.ceil(len(ranked) / 2)]
    duplicates = sum(1 for c in counts.values() if c > 1)
    return {
        "pool": n,
        "rows": len(rows),
        "covered": len(first),
        "coverage": len(first) / n if n else math.nan,
        "duplicates": duplicates,
        "unknown": unknown,
        "exactly_once": len(first) == n and duplicates == 0 and unknown == 0,
        "accuracy": correct / n if n else math.nan,
        "accuracy_covered": correct / len(first) if first else math.nan,
        "top50_n": len(top),
        "top50_accuracy": sum(right[name] for name in top) / len(top) if top else math.nan,
    }


# ----------------------------------------------------------------------------- summary

def summarize(values) -> dict:
    """Mean, sample std (ddof=1) and 95% t-interval of the values that are not None / NaN."""
    from scipy import stats

    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    out = {"n": int(len(v)), "mean": None, "std": None, "ci95": None}
    if len(v):
        out["mean"] = float(v.mean())
    if len(v) > 1:
        std = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(v) - 1)) * std / math.sqrt(len(v))
        out.update(std=std, ci95=[out["mean"] - half, out["mean"] + half])
    return out


COLUMNS = (  # (key in a row, title, is a fraction shown as %)
    *((f"baseline_{name}", BASELINE_TITLES[name], True) for name in BASELINES),
    ("toolkit_accuracy", "toolkit acc", True),
    ("toolkit_coverage", "toolkit coverage", True),
    ("toolkit_top50_accuracy", "toolkit top-50% conf. acc", True),
    ("toolkit_ensemble_accuracy", "teachers' smoothed ensemble acc (diagnostic)", True),
    ("toolkit_seconds", "toolkit time (s)", False),
)


def _fmt(x, pct: bool) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.2f}" if pct else f"{x:.1f}"


def markdown_table(rows: list[dict], summary: dict) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| seed | " + " | ".join(t + (" %" if pct else "") for _, t, pct in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(_fmt(r.get(k), pct) for k, _, pct in cols) + " |")
    ms, ci = [], []
    for k, _, pct in cols:
        s = summary[k]
        ms.append("–" if s["mean"] is None else _fmt(s["mean"], pct) + ("" if s["std"] is None else " ± " + _fmt(s["std"], pct)))
        ci.append("–" if s["ci95"] is None else f"[{_fmt(s['ci95'][0], pct)}, {_fmt(s['ci95'][1], pct)}]")
    lines.append("| mean ± std | " + " | ".join(ms) + " |")
    lines.append("| 95% t-interval | " + " | ".join(ci) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def prepare_work(work: Path) -> None:
    """Make ``work`` (or accept an empty folder or one this script made) and mark it as ours."""
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise SystemExit(f"{work} is not empty and was not made by this script: pick a new --work folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by benchmarks/digits_folder.py; its seed<k>/ folders are rewritten on each run\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--labels-per-class", type=int, default=5)
    ap.add_argument("--work", required=True, help="folder for the data, truth, pipeline outputs and results.json")
    ap.add_argument("--toolkit-args", default="", help='more pipeline overrides, one string: "key=value key=value"')
    ap.add_argument("--baseline-only", action="store_true", help="write the folders and run the baselines only")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per pipeline run (default: none)")
    ap.add_argument("--toolkit-module", default=TOOLKIT_MODULE, help="module run by python -m (default: %(default)s)")
    ap.add_argument("--tag", default="", help="name of this config: results-TAG.json, seed<k>/toolkit-TAG.log, "
                                              "seed<k>/out-TAG (unless --keep-out), seed<k>/pool_labels-TAG.csv")
    ap.add_argument("--keep-out", action="store_true",
                    help="share seed<k>/out between runs and do not clear it: finished stages whose study did not "
                         "change are skipped (their time is then not in the recorded seconds)")
    args = ap.parse_args(argv)
    if args.tag and (args.tag != Path(args.tag).name or args.tag.startswith(".") or not args.tag.strip()):
        ap.error(f"--tag must be a plain name (no folders), got {args.tag!r}")
    suffix = f"-{args.tag}" if args.tag else ""

    work = Path(args.work).expanduser().resolve()
    prepare_work(work)
    results = {
        "dataset": "sklearn.datasets.load_digits (1797 images, 8x8, 10 classes)",
        "labels_per_class": args.labels_per_class,
        "seeds": args.seeds,
        "toolkit_args": args.toolkit_args,
        "tag": args.tag,
        "keep_out": args.keep_out,
        "baseline_only": args.baseline_only,
        "headline_baseline": HEADLINE_BASELINE,
        "baselines": {name: {"title": BASELINE_TITLES[name], "sklearn_kwargs": kw, "pixels_divided_by": scale}
                      for name, (kw, scale) in BASELINES.items()},
        "python": sys.executable,
        "cpu_count": os.cpu_count(),
        "rows": [],
        "summary": {},
    }
    ok = True
    for seed in args.seeds:
        seed_dir = work / f"seed{seed}"
        data_dir = seed_dir / "data"
        out_dir = seed_dir / ("out" if args.keep_out else f"out{suffix}")
        log_path = seed_dir / f"toolkit{suffix}.log"
        shutil.rmtree(data_dir, ignore_errors=True)
        truth = write_digits_folder(data_dir, seed, args.labels_per_class)
        write_truth(seed_dir / "truth.csv", truth)
        row: dict = {"seed": seed, "labeled": args.labels_per_class * 10, "pool": len(truth)}
        for name in BASELINES:
            row[f"baseline_{name}"] = baseline_accuracy(seed, args.labels_per_class, name)
        row["baseline_accuracy"] = row[f"baseline_{HEADLINE_BASELINE}"]
        if not args.baseline_only:
            if not args.keep_out:
                shutil.rmtree(out_dir, ignore_errors=True)
            csv_path = out_dir / "pool_labels.csv"
            csv_path.unlink(missing_ok=True)  # a shared folder's CSV is an earlier run's: never score it
            print(f"seed {seed}: running the pipeline (log: {log_path})", file=sys.stderr, flush=True)
            run = run_toolkit(data_dir, out_dir, args.toolkit_args, log_path, args.timeout, args.toolkit_module)
            row.update(toolkit_command=run["command"], toolkit_returncode=run["returncode"],
                       toolkit_seconds=run["seconds"], toolkit_out=str(out_dir),
                       toolkit_skipped=skipped_stages(log_path))
            if run["returncode"] == 0 and csv_path.is_file():
                shutil.copyfile(csv_path, seed_dir / f"pool_labels{suffix}.csv")
                score = score_pool_labels(csv_path, truth)
                row.update({f"toolkit_{k}": v for k, v in score.items()})
                row["toolkit_ensemble_accuracy"] = score_ensemble_labels(csv_path, truth)
                ok &= score["exactly_once"]
                print(f"seed {seed}: accuracy {100 * score['accuracy']:.2f}% in {run['seconds']:.0f} s"
                      + (f" (skipped: {', '.join(row['toolkit_skipped'])})" if row["toolkit_skipped"] else ""),
                      file=sys.stderr, flush=True)
            else:
                ok = False
                row["toolkit_error"] = (f"exit status {run['returncode']}" if run["returncode"] != 0
                                        else f"no {csv_path}")
                last = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
                print(f"seed {seed}: pipeline failed ({row['toolkit_error']}); last line of {log_path}:"
                      f"\n  {last[-1] if last else '(empty)'}", file=sys.stderr, flush=True)
        results["rows"].append(row)
        results["summary"] = {k: summarize([r.get(k) for r in results["rows"]]) for k, _, _ in COLUMNS}
        (work / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")

    table = markdown_table(results["rows"], results["summary"])
    print(f"digits (load_digits), {args.labels_per_class} labels per class, split seeds {args.seeds}; "
          f"headline baseline: {BASELINE_TITLES[HEADLINE_BASELINE]}")
    print(table)
    results["table"] = table
    (work / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {work / f'results{suffix}.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
