"""Faults a user or an operator meets, each run for real through the CLI in a subprocess.

A lost Ray Train worker is replaced and training continues from the last checkpoint
without re-running the command; Ctrl-C and SIGTERM on both backends end with exit 130,
the MLflow run KILLED and a re-run resuming; a SIGKILLed driver leaves checkpoints a
re-run resumes from; a damaged newest checkpoint falls back to the previous one; a
damaged result or model file makes the stage run again; a second writer of the same
run is refused in one line while the first finishes intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from toolkit.tracking.runs import RUN_KEY_TAG

pytestmark = pytest.mark.slow

THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def settings(data_root: str, tmp_path: Path, **over) -> dict:
    """A tiny SimCLR run: 1,500 images, width 8, batch 128 (about 10 steps an epoch)."""
    base = {
        "run.data_root": data_root,
        "data.train_subset": 1500,
        "data.test_subset": 200,
        "split.val_size": 200,
        "model.width": 8,
        "pretrain.epochs": 4,
        "pretrain.batch_size": 128,
        "pretrain.warmup_epochs": 0.0,
        "classifier.steps": 40,
        "classifier.eval_every": 10,
        "classifier.batch_size": 64,
        "run.output_dir": str(tmp_path / "runs"),
        "run.threads": 1,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    base.update(over)
    return base


def command(name: str, over: dict) -> list[str]:
    return [sys.executable, "-m", "toolkit.cli", name, *(f"{k}={v}" for k, v in over.items())]


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **THREADS_ENV}


def runs(over: dict, key: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=over["tracking.uri"])
    exp = client.get_experiment_by_name("toolkit")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")


def losses(over: dict, run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=over["tracking.uri"]).get_metric_history(run_id, "loss")


class Running:
    """A CLI command in its own session, with its output in a file; always killed at the end."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env(), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready, what: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the command ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the command and the embedded Ray it started
            self.proc.wait()
        self._out.close()


def checkpoints_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))


def descendants_named(pid: int, word: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if word in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def interrupt_pretrain(over: dict, log: Path, ready, interrupt, timeout: float = 180.0) -> tuple[int, str]:
    """Run ``toolkit pretrain``; once ``ready(run)`` holds, ``interrupt(proc)``; then wait: (exit code, output)."""
    run = Running(command("pretrain", over), log)
    try:
        run.wait_for(lambda: ready(run), "the first checkpoint")
        interrupt(run.proc)
        return run.finish(timeout=timeout), run.text()
    finally:
        run.close()


def ray_epoch_1_registered(storage: Path):
    """Rank 0 prints an epoch's line once every rank has reported it: its checkpoint is registered."""
    return lambda run: "[pretrain] epoch 1/" in run.text() and bool(checkpoints_in(storage))


def local_checkpoint_written(folder: Path):
    return lambda run: bool(checkpoints_in(folder))


def rerun_resumes_in_the_same_run(over: dict, key: str, first_run_id: str) -> None:
    """The same command again: exit 0, the same MLflow run FINISHED, epoch 1 not trained twice."""
    again = subprocess.run(command("pretrain", over), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    (run_after,) = runs(over, key)
    assert run_after.info.run_id == first_run_id and run_after.info.status == "FINISHED"
    steps = sorted(m.step for m in losses(over, run_after.info.run_id))
    assert steps.count(1) == 1 and steps[-1] == over["pretrain.epochs"], steps


# ------------------------------------------------------------------ Ray backend


def test_a_killed_ray_train_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(data_root, tmp_path):
    over = settings(data_root, tmp_path, **{"run.name": "lost-worker", "run.backend": "ray", "ray.num_workers": 2})

    def kill_a_worker(proc) -> None:  # SIGKILL one rank mid-training, as a lost node would
        workers = descendants_named(proc.pid, "RayTrainWorker")
        assert workers, "no Ray Train worker found among the command's processes"
        workers[-1].kill()

    storage = tmp_path / "runs" / "ray" / "lost-worker-pretrain"
    rc, out = interrupt_pretrain(over, tmp_path / "out.log", ray_epoch_1_registered(storage), kill_a_worker, 300)
    assert rc == 0, out[-3000:]
    (mlflow_run,) = runs(over, "lost-worker-pretrain")
    assert mlflow_run.info.status == "FINISHED"
    # restarted from the checkpoint, not from scratch: epoch 1 was reported once (MLflow logs each report)
    steps = sorted(m.step for m in losses(over, mlflow_run.info.run_id))
    assert steps.count(1) == 1 and steps[-1] == 4, steps


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_on_the_ray_backend_exits_130_marks_the_run_killed_and_a_rerun_resumes(data_root, tmp_path, sig):
    over = settings(data_root, tmp_path, **{"run.name": "stop-ray", "run.backend": "ray", "ray.num_workers": 2})
    storage = tmp_path / "runs" / "ray" / "stop-ray-pretrain"
    rc, out = interrupt_pretrain(over, tmp_path / "first.log", ray_epoch_1_registered(storage),
                                 lambda proc: proc.send_signal(sig))
    assert rc == 130, out[-3000:]
    assert "interrupted; re-run the same command to resume" in out
    (killed,) = runs(over, "stop-ray-pretrain")
    assert killed.info.status == "KILLED"
    rerun_resumes_in_the_same_run(over, "stop-ray-pretrain", killed.info.run_id)


def test_sigterm_in_an_in_process_classifier_after_ray_started_exits_130_and_a_rerun_resumes(data_root, tmp_path):
    """The cpu profile's shape (run.classifiers_local): pretraining starts Ray, whose ray.init installs
    its own SIGTERM handler (sys.exit); a SIGTERM in the in-process classifier that follows must still
    be an interrupt: exit 130, no run left FAILED or RUNNING, and a re-run resumes that classifier."""
    over = settings(data_root, tmp_path, **{
        "run.name": "term-mixed", "run.backend": "ray", "ray.num_workers": 2, "run.classifiers_local": True,
        "pretrain.epochs": 1, "classifier.steps": 600, "pipeline.stages": "[pretrain,supervised]"})
    run = Running(command("pipeline", over), tmp_path / "first.log")
    try:
        run.wait_for(lambda: "[supervised] step 10/600" in run.text(), "the classifier's first report")
        run.proc.send_signal(signal.SIGTERM)
        rc, out = run.finish(timeout=120), run.text()
    finally:
        run.close()
    assert rc == 130, out[-3000:]
    assert "interrupted; re-run the same command to resume" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=over["tracking.uri"])
    exp = client.get_experiment_by_name("toolkit")
    statuses = {r.data.tags.get(RUN_KEY_TAG): r.info.status for r in client.search_runs([exp.experiment_id])}
    assert "KILLED" in statuses.values() and not {"FAILED", "RUNNING"} & set(statuses.values()), statuses
    again = subprocess.run(command("pipeline", over), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "[supervised] resuming at step" in again.stdout


# ------------------------------------------------------------------ local backend


def local(data_root: str, tmp_path: Path, name: str, **over) -> dict:
    return settings(data_root, tmp_path, **{"run.name": name, "run.backend": "local", "pretrain.epochs": 6, **over})


def test_sigterm_on_the_local_backend_exits_130_marks_the_run_killed_and_a_rerun_resumes(data_root, tmp_path):
    over = local(data_root, tmp_path, "term-local")
    folder = tmp_path / "runs" / "local" / "term-local-pretrain"
    rc, out = interrupt_pretrain(over, tmp_path / "out.log", local_checkpoint_written(folder),
                                 lambda proc: proc.send_signal(signal.SIGTERM), 120)
    assert rc == 130, out[-3000:]
    assert "interrupted; re-run the same command to resume" in out
    (killed,) = runs(over, "term-local-pretrain")
    assert killed.info.status == "KILLED"
    rerun_resumes_in_the_same_run(over, "term-local-pretrain", killed.info.run_id)


def test_a_sigkilled_driver_leaves_checkpoints_a_rerun_resumes_from(data_root, tmp_path):
    over = local(data_root, tmp_path, "kill9")
    folder = tmp_path / "runs" / "local" / "kill9-pretrain"
    interrupt_pretrain(over, tmp_path / "out.log", local_checkpoint_written(folder),
                       lambda proc: os.killpg(proc.pid, signal.SIGKILL), 60)
    (stale,) = runs(over, "kill9-pretrain")
    assert stale.info.status == "RUNNING"  # nobody could mark it: the process had no chance
    again = subprocess.run(command("pretrain", over), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming after epoch" in again.stdout
    (run_after,) = runs(over, "kill9-pretrain")
    assert run_after.info.run_id == stale.info.run_id and run_after.info.status == "FINISHED"
    assert run_after.data.tags["toolkit.resumed"] == "True"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(data_root, tmp_path):
    from toolkit.execution.backends import LocalSession

    over = local(data_root, tmp_path, "damaged", **{"pretrain.epochs": 2})
    done = subprocess.run(command("pretrain", over), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "runs" / "local" / "damaged-pretrain"
    older, newest = checkpoints_in(folder)[-2:]
    ckpt = newest / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])  # truncated, as by a full disk
    state = LocalSession(folder).restore()
    assert state is not None and state["epoch"] == 1 and Path(state["path"]).parent == older
    # and through the CLI: more epochs resume from epoch 1, with a warning naming the damaged file
    again = subprocess.run(command("pretrain", {**over, "pretrain.epochs": 3}), env=env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "[warning]" in again.stdout and "resuming after epoch 1" in again.stdout


@pytest.mark.parametrize("damage", ["result.json", "model.pt"])
def test_a_damaged_result_or_model_makes_the_stage_run_again(data_root, tmp_path, damage):
    over = local(data_root, tmp_path, f"redo-{damage.split('.')[0]}", **{"pretrain.epochs": 1})
    first = subprocess.run(command("pretrain", over), env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    stage = next((tmp_path / "runs" / "stages").iterdir())
    path = stage / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = subprocess.run(command("pretrain", over), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "already finished" not in again.stdout and "[warning]" in again.stdout
    assert "[pretrain] done in" in again.stdout


def test_a_second_writer_of_the_same_run_is_refused_in_one_line_and_the_first_finishes(data_root, tmp_path):
    # enough epochs that the first still runs when the second has started up (imports take
    # 5-20 s on a busy machine; with 3 epochs the first once finished first and the second
    # rightly found the stage done)
    over = local(data_root, tmp_path, "twice", **{"pretrain.epochs": 20})
    folder = tmp_path / "runs" / "local" / "twice-pretrain"
    first = Running(command("pretrain", over), tmp_path / "first.log")
    try:
        first.wait_for(lambda: len(checkpoints_in(folder)) >= 1, "the first checkpoint")
        second = subprocess.run(command("pretrain", over), env=env(), capture_output=True, text=True, timeout=120)
        rc = first.finish()
    finally:
        first.close()
    assert second.returncode == 2
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another process" in lines[0] and "Traceback" not in second.stderr, second.stderr
    assert rc == 0, first.text()[-3000:]
    (run,) = runs(over, "twice-pretrain")
    assert run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    losses = MlflowClient(tracking_uri=over["tracking.uri"]).get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 21))  # one writer: one value per epoch
