"""A damaged checkpoint on the Ray backend falls back only to checkpoints Ray registered before it.

Rank 0 uploads a checkpoint before Ray's controller registers it; a run stopped in between
leaves a folder Ray never registered ("stray"), newer than the latest registered one. The
fallback once took the newest folder on disk, the stray: a re-run then resumed *forward*, past
epochs MLflow never saw. Pure tests pick from Ray's record (its snapshot file); the
integration test runs SIMCLR pretraining on Ray twice, with a stray and a damaged latest
checkpoint between the runs, and reads the second run's MLflow loss history.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from toolkit.engine import checkpoints
from toolkit.execution.ray_checkpoints import registered, registered_before, strays


def _result(name: str, epoch: int) -> dict:
    return {"version": 0, "checkpoint_dir_name": name, "metrics": {"epoch": epoch}}


# Ray's checkpoint_manager_snapshot.json after epochs 1-3 with num_to_keep=2 (epoch 1's folder deleted)
SNAPSHOT = {
    "ray_version": "2.60.0",
    "checkpoint_results": [_result("checkpoint_2026-01-01_10-00-02.000000", 2),
                           _result("checkpoint_2026-01-01_10-00-03.000000", 3)],
    "checkpoint_report_indices": [1, 2],
    "latest_checkpoint_result": _result("checkpoint_2026-01-01_10-00-03.000000", 3),
    "pending_training_results": [],
    "pending_validation_specs": [],
    "current_report_index": 3,
    "validated_checkpoint_dir_names": [],
    "timed_out_validation_checkpoint_dir_names": [],
    "failed_validation_checkpoint_dir_names": [],
}
E2, E3 = (r["checkpoint_dir_name"] for r in SNAPSHOT["checkpoint_results"])
STRAY = "checkpoint_2026-01-01_10-00-04.000000"  # epoch 4, uploaded after the signal, never registered


def test_a_damaged_latest_checkpoint_falls_back_to_older_registered_ones_only():
    assert registered_before(SNAPSHOT, E3) == [E2]  # not the newer stray, whatever its name
    assert registered_before(SNAPSHOT, E2) == []
    assert registered_before(SNAPSHOT, STRAY) == []  # a folder Ray does not know has no "before"


def test_registration_order_decides_not_folder_names():
    # checkpoints uploaded by rank 0 on another node carry that node's clock in their names
    skewed = {**SNAPSHOT, "checkpoint_results": [_result("checkpoint_z_first", 1), _result("checkpoint_a_second", 2),
                                                 _result("checkpoint_m_third", 3)],
              "latest_checkpoint_result": _result("checkpoint_m_third", 3)}
    assert registered_before(skewed, "checkpoint_m_third") == ["checkpoint_a_second", "checkpoint_z_first"]


def test_strays_are_the_checkpoint_folders_ray_did_not_register():
    folders = [E2, E3, STRAY, "checkpoint_2026-01-01_09-59-59.000000", "some_other_folder"]
    assert strays(SNAPSHOT, folders) == ["checkpoint_2026-01-01_09-59-59.000000", STRAY]
    assert strays(SNAPSHOT, [E2, E3]) == []
    # the latest and those awaiting validation are registered even when not (yet) in checkpoint_results
    pending = {**SNAPSHOT, "checkpoint_results": [], "pending_training_results": [_result(E2, 2)]}
    assert registered(pending) == [E3, E2] and strays(pending, [E2, E3, STRAY]) == [STRAY]


# ------------------------------------------------------------------ real Ray Train

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    from toolkit.execution.backends import init_ray
    from toolkit.config import Execution

    init_ray(Execution())  # as every command starts it: on 127.0.0.1, with the token (gloo included)
    yield
    ray.shutdown()


def _checkpoint_folders(ray_dir: Path) -> list[str]:
    return sorted(p.name for p in ray_dir.glob("checkpoint_*") if p.is_dir())


def _loss_steps(cfg, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    from toolkit.tracking.stores import tracking_uri

    return [m.step for m in MlflowClient(tracking_uri=tracking_uri(cfg.execution)).get_metric_history(run_id, "loss")]


@pytest.mark.slow
def test_a_rerun_with_a_stray_and_a_damaged_latest_checkpoint_resumes_backwards(ray_session, tiny_config, one_thread):
    import pyarrow.fs
    import ray.train

    from toolkit.execution.ray_checkpoints import older_registered_checkpoints, read_snapshot
    from toolkit.stages.pretrain import pretrain

    cfg = tiny_config.replace(**{"run.backend": "ray", "ray.num_workers": 1, "data.train_subset": 600,
                                 "pretrain.batch_size": 128, "pretrain.warmup_epochs": 0.0,
                                 "pretrain.epochs": 3, "run.name": "fallback"})
    first = pretrain(cfg.study, cfg.execution)
    assert _loss_steps(cfg, first.run_id) == [1, 2, 3]
    ray_dir = Path(cfg.run.output_dir).resolve() / "ray" / "fallback-pretrain"
    snapshot = read_snapshot(pyarrow.fs.LocalFileSystem(), str(ray_dir))
    kept = registered(snapshot)
    assert len(kept) == 2 and _checkpoint_folders(ray_dir) == sorted(kept)  # num_to_keep
    previous, latest = (ray_dir / name for name in kept)
    assert checkpoints.load(latest)["epoch"] == 3 and checkpoints.load(previous)["epoch"] == 2

    # what a SIGTERM between rank 0's upload and Ray's registration leaves: a newer folder, epoch 4
    stray = ray_dir / "checkpoint_9999-12-31_23-59-59.999999"
    shutil.copytree(latest, stray)
    payload = torch.load(stray / checkpoints.CHECKPOINT_FILE, weights_only=True)
    checkpoints.save(stray / checkpoints.CHECKPOINT_FILE, {**payload, "epoch": 4})
    # then the latest registered checkpoint is cut in half (a full disk, a copy interrupted)
    damaged = latest / checkpoints.CHECKPOINT_FILE
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    fallback = older_registered_checkpoints(ray.train.Checkpoint(path=str(latest)))
    assert [Path(c.path).name for c in fallback] == [previous.name]

    more = cfg.replace(**{"pretrain.epochs": 6})
    again = pretrain(more.study, more.execution)
    # resumed after epoch 2 (the previous registered checkpoint), not after the stray's epoch 4: the
    # loss history has every epoch (each logged once), where resuming forward left a hole at 4
    # (6 epochs instead of 3 is another study: a run of its own, as tracking.mlflow_run decides)
    assert again.run_id != first.run_id
    assert _loss_steps(cfg, again.run_id) == [3, 4, 5, 6]
    assert checkpoints.load(again.model_path)["epoch"] == 6
    assert not stray.exists(), "the stray of the interrupted run was left behind"
    assert len(_checkpoint_folders(ray_dir)) == 2  # num_to_keep holds again
