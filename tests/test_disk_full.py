"""A full disk under the run folder and its sqlite MLflow store, for real: a small tmpfs is mounted in a
private mount namespace (``unshare --mount``; ``--map-root-user`` when not root), ``toolkit`` runs on it,
and what it prints is checked. Wanted: one line on stderr naming the full file system and the file, exit
2, no traceback (MLflow's store logs each database error with its traceback before raising it), and, once
there is space again, the same command resumes in the same MLflow run with each epoch logged once.
"""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.errors import describe_error

THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny(data_root: str, out: Path, **over) -> dict:
    """SimCLR on 1,500 images at width 8 (about 10 steps an epoch, ~300 KB a checkpoint), no MLflow model."""
    base = {
        "run.data_root": data_root, "data.train_subset": 1500, "data.test_subset": 200, "split.val_size": 200,
        "model.width": 8, "pretrain.epochs": 2, "pretrain.batch_size": 128, "pretrain.warmup_epochs": 0.0,
        "run.backend": "local", "run.threads": 1, "run.output_dir": str(out), "tracking.log_models": "false",
    }
    return {**base, **over}


def toolkit_line(over: dict) -> str:
    return shlex.join([sys.executable, "-m", "toolkit.cli", "pretrain", *(f"{k}={v}" for k, v in over.items())])


def in_small_disk(mount: Path, size: str, script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the bash ``script`` with a ``size`` tmpfs mounted at ``mount``, seen by this script alone."""
    mount.mkdir(parents=True, exist_ok=True)
    private = ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    full = f"set -u\nmount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount))}\n{script}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **THREADS_ENV}
    return subprocess.run([*private, "--", "bash", "-c", full], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
def test_a_disk_full_before_the_run_is_one_line_naming_it(data_root, tmp_path):
    """So little space that MLflow's sqlite store cannot be created: sqlite's "database or disk is full"
    comes wrapped in SQLAlchemy's and MLflow's errors, and MLflow logs it with its traceback."""
    disk = tmp_path / "disk"
    over = tiny(data_root, disk / "runs")
    done = in_small_disk(disk, "2m", f"""
dd if=/dev/zero of={disk}/filler bs=1k count=1900 status=none
{toolkit_line(over)} > {tmp_path}/out.txt 2> {tmp_path}/err.txt
echo "rc=$?"
""")
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    err = (tmp_path / "err.txt").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    # sqlite's words and the store's file, or the OS's for whatever file was being written
    assert lines[0].startswith("toolkit pretrain: error: ") and f": {disk}/runs/" in lines[0], lines[0]
    assert lines[0].endswith(f"(the disk is full: free space on the file system at {disk} and re-run the same "
                             "command to resume)"), lines[0]


@pytest.mark.slow
def test_a_disk_that_fills_during_the_run_is_one_line_and_the_rerun_resumes(data_root, tmp_path):
    """The disk fills once the first checkpoint is written (a file grows until ENOSPC): the run stops
    with one line; with the file removed, the same command resumes after the last saved epoch in the
    same MLflow run, and each epoch's loss is logged once."""
    disk = tmp_path / "disk"
    over = tiny(data_root, disk / "runs", **{"pretrain.epochs": 8})
    first_ckpt = f"{disk}/runs/local/*/checkpoint_000000"
    done = in_small_disk(disk, "4m", f"""
{toolkit_line(over)} > {tmp_path}/out1.txt 2> {tmp_path}/err1.txt &
pid=$!
for i in $(seq 600); do compgen -G "{first_ckpt}" > /dev/null && break; sleep 0.1; done
dd if=/dev/zero of={disk}/filler bs=4k status=none 2> /dev/null
wait $pid; echo "rc1=$?"
rm {disk}/filler
{toolkit_line(over)} > {tmp_path}/out2.txt 2> {tmp_path}/err2.txt
echo "rc2=$?"
cp {disk}/runs/mlflow.db {tmp_path}/mlflow.db
""")
    err1 = (tmp_path / "err1.txt").read_text()
    out1 = (tmp_path / "out1.txt").read_text()
    assert "rc1=2" in done.stdout, done.stdout + done.stderr + out1[-2000:] + err1[-3000:]
    lines = [ln for ln in err1.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err1, err1[-3000:]
    assert lines[0].startswith("toolkit pretrain: error: ") and f": {disk}/runs/" in lines[0], lines[0]
    assert lines[0].endswith(f"(the disk is full: free space on the file system at {disk} and re-run the same "
                             "command to resume)"), lines[0]
    out2 = (tmp_path / "out2.txt").read_text()
    assert "rc2=0" in done.stdout, out2[-2000:] + (tmp_path / "err2.txt").read_text()[-3000:]
    assert "[pretrain] resuming after epoch" in out2, out2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("toolkit").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))


def test_enospc_behind_the_last_error_is_still_the_full_disk():
    """MLflow failing to mark the run FAILED, while the real failure (a write hitting ENOSPC, which
    names no file) is being handled, must not hide it: the line names the disk and the file."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            Path("/dev/full").write_bytes(b"x" * 10)  # the kernel's always-full device: ENOSPC, no file named
        finally:
            raise MlflowException("(raised as a result of Query-invoked autoflush; consider using a session."
                                  "no_autoflush block if this flush is occurring prematurely)")
    except MlflowException as e:
        assert isinstance(e.__context__, OSError) and e.__context__.errno == errno.ENOSPC
        line = describe_error(e)
    assert line.startswith("ENOSPC: No space left on device: /dev/full (the disk is full: free space on the file "
                           "system at /") and line.endswith(" and re-run the same command to resume)"), line

