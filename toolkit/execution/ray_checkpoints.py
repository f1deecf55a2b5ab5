"""Which of a Ray Train run's checkpoint folders Ray registered; the others are strays.

Rank 0 uploads each checkpoint into ``<storage>/<run>/checkpoint_<time>`` first; Ray's
controller then registers it, recording the registered ones in
``checkpoint_manager_snapshot.json`` beside them (what ``get_checkpoint()`` resumes from,
and what ``num_to_keep`` deletes). A run stopped in between (Ctrl-C, SIGTERM, a lost
driver) leaves a folder Ray never registered: newer than every registered one, never
deleted, and holding an epoch whose metrics never reached MLflow. So only registered
folders count: a damaged checkpoint falls back to an older registered one, never to a
stray, and the strays are removed before the next ``fit()``.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants


def registered(snapshot: dict[str, Any]) -> list[str]:
    """Checkpoint folder names Ray registered, oldest first.

    Registration order: the toolkit gives Ray no ``checkpoint_score_attribute``, so Ray keeps its
    list in the order the checkpoints were reported (folder times could come from several nodes'
    clocks). The latest registered one and those awaiting validation are registered too.
    """
    names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results") or []]
    for extra in [snapshot.get("latest_checkpoint_result")] + list(snapshot.get("pending_training_results") or []):
        name = (extra or {}).get("checkpoint_dir_name")
        if name and name not in names:
            names.append(name)
    return names


def registered_before(snapshot: dict[str, Any], name: str) -> list[str]:
    """The registered checkpoints reported before ``name``, newest first (none if ``name`` is not registered)."""
    names = registered(snapshot)
    return names[: names.index(name)][::-1] if name in names else []


def strays(snapshot: dict[str, Any], folders: list[str]) -> list[str]:
    """The ``checkpoint_*`` names among ``folders`` that Ray did not register."""
    known = set(registered(snapshot))
    return sorted(f for f in folders if f.startswith("checkpoint_") and f not in known)


def read_snapshot(fs, run_dir: str) -> dict[str, Any] | None:
    """Ray's record of ``run_dir`` on the pyarrow filesystem ``fs``; None when there is none (yet)."""
    try:
        with fs.open_input_stream(posixpath.join(run_dir, SNAPSHOT_FILE)) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def older_registered_checkpoints(ckpt) -> list:
    """The registered ``ray.train.Checkpoint`` s reported before ``ckpt``, newest first."""
    import ray.train

    run_dir, name = posixpath.split(ckpt.path.rstrip("/"))
    snapshot = read_snapshot(ckpt.filesystem, run_dir)
    if snapshot is None:
        return []
    return [ray.train.Checkpoint(path=posixpath.join(run_dir, older), filesystem=ckpt.filesystem)
            for older in registered_before(snapshot, name)]


def remove_strays(storage: str, run_name: str) -> list[str]:
    """Delete the checkpoint folders of ``<storage>/<run_name>`` Ray never registered; return their names.

    Nothing is deleted while Ray has no readable record of the run: nothing is known to be stray.
    Called by the driver before ``fit()``, under the run's lock: no one else writes there then.
    """
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)  # as Ray resolves ray.storage_path
    run_dir = posixpath.join(root, run_name)
    try:
        snapshot = read_snapshot(fs, run_dir)
    except ValueError:  # a damaged record: Ray says so itself when it reads it
        return []
    if snapshot is None:
        return []
    listed = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    stray = strays(snapshot, [i.base_name for i in listed if i.type == pyarrow.fs.FileType.Directory])
    for name in stray:
        fs.delete_dir(posixpath.join(run_dir, name))
    return stray
