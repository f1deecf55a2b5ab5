"""What the fault scenarios of `edge_faults.py` are made of: a command running in the background, a
scenario's folder and tiny settings, its MLflow store read directly, and the checks it lists."""

from __future__ import annotations

import json

import subprocess
import time
from pathlib import Path
from typing import Callable

from edge_check import Proc, kill_group, mlflow_runs, query_store, run_cli, toolkit_argv, toolkit_env

class Checks:
    """Expectations in the order a scenario meets them, each with what was seen."""

    def __init__(self):
        self.items: list[tuple[str, bool, str]] = []

    def __call__(self, what: str, ok: bool, seen: object = "") -> bool:
        self.items.append((what, bool(ok), str(seen)[:200]))
        return bool(ok)

    def expected(self) -> str:
        return "; ".join(w for w, _, _ in self.items)

    def observed(self) -> str:
        bad = [f"NOT {w} (saw: {s})" for w, ok, s in self.items if not ok]
        return "; ".join(bad) if bad else f"all {len(self.items)} held"


class Running:
    """A toolkit command in its own session, stdout and stderr in files; killed (with its Ray) when closed."""

    def __init__(self, argv: list[str], folder: Path, tag: str):
        self.out_path, self.err_path = folder / f"{tag}.out", folder / f"{tag}.err"
        self._files = (self.out_path.open("w"), self.err_path.open("w"))
        self.proc = subprocess.Popen(argv, cwd=folder, env=toolkit_env(), stdout=self._files[0], stderr=self._files[1],
                                     start_new_session=True)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, ready: Callable[[], bool], timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if ready():
                return True
            time.sleep(0.2)
        return ready() and self.proc.poll() is None

    def finish(self, timeout: float = 300.0) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.close()

    def close(self) -> None:
        kill_tree(self.proc)
        for f in self._files:
            f.close()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command, every process it started (Ray's daemons may leave its group), then its group."""
    import psutil

    if proc.poll() is None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        except psutil.Error:
            pass
    kill_group(proc)


def ray_workers(proc: subprocess.Popen) -> list:
    import psutil

    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


class Ctx:
    """One scenario's folder, its tiny settings and what its MLflow store holds."""

    def __init__(self, root: Path, pristine: Path):
        self.root, self.pristine = root, pristine
        self.db = root / "mlflow.db"
        self.runs_done = 0

    def settings(self, name: str, **over) -> dict:
        base = {"run.data_root": str(self.pristine), "data.train_subset": 1500, "data.test_subset": 200,
                "split.val_size": 200, "model.width": 8, "pretrain.epochs": 4, "pretrain.batch_size": 128,
                "pretrain.warmup_epochs": 0.0, "classifier.steps": 40, "classifier.eval_every": 10,
                "classifier.batch_size": 64, "run.name": name, "run.backend": "local", "ray.num_workers": 2,
                "run.output_dir": str(self.root / "runs"), "run.threads": 1, "tracking.uri": f"sqlite:///{self.db}"}
        return {**base, **{k.replace("__", "."): v for k, v in over.items()}}

    def argv(self, command: str, over: dict) -> list[str]:
        return toolkit_argv(command, [f"{k}={v}" for k, v in over.items()])

    def start(self, command: str, over: dict, tag: str = "first") -> Running:
        return Running(self.argv(command, over), self.root, tag)

    def run(self, command: str, over: dict, timeout: float = 600.0) -> Proc:
        """Run a command to its end; its output is kept beside the scenario's files (see --keep)."""
        proc = run_cli(self.argv(command, over), self.root, timeout)
        self.runs_done += 1
        (self.root / f"run{self.runs_done}.out").write_text(proc.out)
        (self.root / f"run{self.runs_done}.err").write_text(proc.err)
        return proc

    def runs(self, key: str | None = None) -> list[tuple[str, str, str]]:
        return [r for r in mlflow_runs(self.db) if key is None or r[2] == key]

    def trial_runs(self) -> list[tuple[str, str]]:
        return query_store(self.db, "select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                                    "and t.key = 'mlflow.parentRunId'")

    def steps(self, run_id: str, metric: str) -> list[int]:
        rows = query_store(self.db, "select step from metrics where run_uuid = ? and key = ?", (run_id, metric))
        return sorted(s for (s,) in rows)

    def ckpt_folder(self, over: dict, command: str = "pretrain") -> Path:
        return self.root / "runs" / over["run.backend"] / f"{over['run.name']}-{command}"


def checkpoints_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))


def ray_registered(folder: Path) -> bool:
    """Ray has registered a checkpoint of this run (its snapshot names one). A folder Ray wrote but had not
    registered when a signal landed is not resumed, by design: it may postdate the signal (README)."""
    from toolkit.execution.ray_checkpoints import SNAPSHOT_FILE, registered

    try:
        return bool(registered(json.loads((folder / SNAPSHOT_FILE).read_text())))
    except (OSError, ValueError):
        return False


def one_line(c: Checks, err: str, word: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    c(f"one stderr line containing {word!r}, no traceback",
      len(lines) == 1 and word.lower() in lines[0].lower() and "Traceback" not in err, " | ".join(lines)[-300:])


def the_run(c: Checks, ctx: Ctx, key: str, status: str, run_id: str | None = None) -> str | None:
    """Expect exactly one MLflow run for ``key``, with ``status`` (and the id ``run_id``, when given)."""
    runs = ctx.runs(key)
    same = run_id is None or (len(runs) == 1 and runs[0][0] == run_id)
    c(f"one MLflow run for {key}, {status}" + (", the same run" if run_id else ""),
      len(runs) == 1 and runs[0][1] == status and same, [(r[0][:8], r[1]) for r in runs])
    return runs[0][0] if len(runs) == 1 else None


def rerun_resumes(c: Checks, ctx: Ctx, over: dict, run_id: str | None, word: str = "resuming",
                  command: str = "pretrain", metric: str = "loss") -> None:
    """The same command again: exit 0, says ``word``, one run FINISHED (the same one), each step logged once."""
    again = ctx.run(command, over)
    c("re-run exits 0", again.rc == 0, f"exit {again.rc}: {again.err.strip()[-200:]}")
    c(f"re-run says {word!r}", word in again.out, again.out.strip()[-200:])
    key = f"{over['run.name']}-{command}"
    rid = the_run(c, ctx, key, "FINISHED", run_id)
    if rid and command == "pretrain":
        steps = ctx.steps(rid, metric)
        c(f"each epoch's {metric} logged once (1..{over['pretrain.epochs']})",
          steps == list(range(1, over["pretrain.epochs"] + 1)), steps)
    elif rid:
        steps = ctx.steps(rid, metric)
        c(f"each step's {metric} logged once", len(steps) == len(set(steps)) and steps, steps)
