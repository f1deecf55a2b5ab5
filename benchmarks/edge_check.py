"""Bad inputs and faults through the real `toolkit` command, counted: how many end well.

Each scenario runs `python -m toolkit.cli ...` in a subprocess as a user would, on tiny real
MNIST data copied to a temporary root (the shared files are never touched), with its own
fresh `run.output_dir`, and a timeout. Offline: an embedded Ray, MLflow on sqlite files.

* bad input (cases in `edge_bad_inputs.py`): "clean" = exit code 2, exactly one line on stderr and no traceback
  anywhere, the line naming the culprit; nothing created (no stage folder, no checkpoint
  folder, no `.lock`, no new MLflow run in any store) and no marker file from a crafted pickle.
* faults (`edge_faults.py`): "survived" = every expectation the scenario lists holds (nothing
  lost, the exit code, the MLflow run's status, a re-run resuming where it should).

    python benchmarks/edge_check.py --json edge.json             # everything (faults: ~1 h on a busy 2-core machine; root)
    python benchmarks/edge_check.py --only bad                   # bad inputs only (~15 min there)
    python benchmarks/edge_check.py --only faults --filter sigint --keep

Prints a table per scenario (name, expected, observed, ok) and the two totals; `--json PATH`
writes the same. `--keep` leaves the temporary folders (their path is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_bad_inputs import BAD_CASES, MNIST_FILES, SECRET, BadCase, CaseFiles  # beside this file

REPO = Path(__file__).resolve().parents[1]
# valid, tiny settings before every bad case's own (which come later and win): a case the
# toolkit wrongly accepts then costs seconds of training, not an hour
SAFETY_NET = ("data.train_subset=1500", "data.test_subset=200", "split.val_size=200", "model.width=8",
              "pretrain.epochs=1", "pretrain.batch_size=128", "classifier.steps=10", "classifier.eval_every=10",
              "pseudolabel.rounds=1", "pseudolabel.steps_per_round=10", "tune.num_samples=1", "run.threads=1")


@dataclass
class Outcome:
    name: str
    kind: str  # "bad" or "fault"
    expected: str
    observed: str
    ok: bool
    seconds: float


@dataclass
class Proc:
    rc: int | None  # None: killed at its timeout
    out: str
    err: str


def toolkit_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **(extra or {})}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group (it and the embedded Ray it started)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def toolkit_argv(command: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "toolkit.cli", command, *args]


def run_cli(argv: list[str], cwd: Path, timeout: float, env: dict | None = None) -> Proc:
    """Run a command to its end (or its timeout, then its process group is killed)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=toolkit_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Proc(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return Proc(None, out, err)


def query_store(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` in a sqlite MLflow store, read-only and directly (no MLflow import); [] when there is none."""
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return list(con.execute(sql, args))
    except sqlite3.Error:
        return []
    finally:
        con.close()


def mlflow_runs(db: Path) -> list[tuple[str, str, str]]:
    """(run id, status, run key tag) of every run in a sqlite MLflow store."""
    return query_store(db, "select r.run_uuid, r.status, coalesce(t.value, '') from runs r left join tags t "
                           "on t.run_uuid = r.run_uuid and t.key = 'toolkit.run_key'")


def all_runs(root: Path) -> set[str]:
    return {r[0] for db in root.rglob("*.db") for r in mlflow_runs(db)}



def created_things(case_root: Path, runs_before: set[str]) -> list[str]:
    """What a refused command must not have left: stage/checkpoint folders, locks, MLflow runs."""
    found = []
    for out in case_root.rglob("runs"):
        for sub in ("stages", "local", "ray"):
            if (out / sub).is_dir() and any((out / sub).iterdir()):
                found.append(f"{out.name}/{sub}/{next((out / sub).iterdir()).name}")
    found += [str(p.relative_to(case_root)) for p in case_root.rglob(".lock")]
    new_runs = all_runs(case_root) - runs_before
    if new_runs:
        found.append(f"{len(new_runs)} MLflow run(s)")
    return found


def judge_bad(case: BadCase, proc: Proc, files: CaseFiles, runs_before: set[str]) -> tuple[str, bool]:
    """(what was seen, clean?) for one bad input's command."""
    lines = proc.err.strip("\n").splitlines()
    problems = []
    if proc.rc != 2:
        problems.append("timed out" if proc.rc is None else f"exit {proc.rc}")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if "Traceback" in proc.err + proc.out:
        problems.append("traceback")
    if lines and case.mentions.lower() not in lines[-1].lower():
        problems.append(f"line does not name {case.mentions!r}")
    if SECRET in proc.err + proc.out:
        problems.append("credential echoed")
    if files.marker.exists():
        problems.append("crafted pickle ran (marker file created)")
    made = created_things(files.root, runs_before)
    if made:
        problems.append("created " + ", ".join(made))
    shown = (lines[-1] if lines else "(no stderr)")[:160]
    return (shown if not problems else "; ".join(problems) + f" | {shown}"), not problems


def run_bad(case: BadCase, root: Path, pristine: Path, timeout: float) -> Outcome:
    case_root = root / "bad" / case.name
    case_root.mkdir(parents=True)
    files = CaseFiles(case_root, pristine)
    t0 = time.perf_counter()
    try:
        args = case.args(files)
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
        return Outcome(case.name, "bad", "", f"could not build the case: {type(e).__name__}: {e}", False, 0.0)
    runs_before = all_runs(case_root)
    safe = [f"run.output_dir={case_root / 'runs'}", f"run.data_root={pristine}", *SAFETY_NET]
    proc = run_cli(toolkit_argv(case.command, [*safe, *args]), case_root, timeout, case.env)
    observed, ok = judge_bad(case, proc, files, runs_before)
    expected = f"exit 2, one line naming {case.mentions!r}, nothing created"
    return Outcome(case.name, "bad", expected, observed, ok, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the run


def copy_mnist(source: Path, dest: Path) -> Path:
    """Copy MNIST/raw's four idx files into ``dest`` (damage is always done to copies of copies)."""
    raw = dest / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copyfile(source / "MNIST" / "raw" / name, raw / name)
    return dest


def default_data_root() -> Path:
    env = os.environ.get("TOOLKIT_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def print_table(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        print(f"{'ok  ' if o.ok else 'FAIL'} {o.kind:5s} {o.name:36s} {o.seconds:6.1f}s  expected: {o.expected}")
        print(f"{'':48s}observed: {o.observed}")


def totals(outcomes: list[Outcome]) -> dict:
    bad = [o for o in outcomes if o.kind == "bad"]
    faults = [o for o in outcomes if o.kind == "fault"]
    return {"bad_inputs_clean": sum(o.ok for o in bad), "bad_inputs_tried": len(bad),
            "faults_survived": sum(o.ok for o in faults), "faults_tried": len(faults)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("bad", "faults"), help="run one part only")
    parser.add_argument("--filter", default="", help="only scenarios whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--json", help="write the table and totals here")
    parser.add_argument("--data-root", default=str(default_data_root()), help="folder holding MNIST/raw")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per bad input")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from edge_faults import FAULTS, run_fault  # beside this file

    root = Path(tempfile.mkdtemp(prefix="edge-check-"))
    print(f"[edge] working in {root}", flush=True)
    outcomes: list[Outcome] = []
    try:
        pristine = copy_mnist(Path(args.data_root).expanduser(), root / "mnist")
        if args.only != "faults":
            for case in (c for c in BAD_CASES if args.filter in c.name):
                outcomes.append(run_bad(case, root, pristine, args.timeout))
                print_table(outcomes[-1:])
        if args.only != "bad":
            for fault in (f for f in FAULTS if args.filter in f.name):
                outcomes.append(run_fault(fault, root, pristine))
                print_table(outcomes[-1:])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = totals(outcomes)
    print(f"\nbad inputs clean / tried: {summary['bad_inputs_clean']} / {summary['bad_inputs_tried']}")
    print(f"faults survived / tried: {summary['faults_survived']} / {summary['faults_tried']}")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "scenarios": [asdict(o) for o in outcomes]}, indent=2))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
