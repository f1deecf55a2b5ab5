"""Where a run's files live: the driver's absolute output folder, and the storage Ray shares between nodes.

Only the driver writes ``run.output_dir``. Ray Train and Tune checkpoints go to
``ray.storage_path``, which on a cluster of several nodes must be a mount every node
shares or a cloud URI: ``check_shared`` proves it before any work starts, by asking
each other node whether it sees a file the driver just wrote.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from toolkit.config import ConfigError, Execution

OUTPUT_ROOT_ENV = "TOOLKIT_OUTPUT_ROOT"
JOB_OUTPUT_ROOT = "~/toolkit-runs"  # a relative run.output_dir inside a Ray job resolves here


def in_ray_job_working_dir(cwd: Path | None = None) -> bool:
    """True inside the temporary working folder Ray unpacks a submitted job into (its hash changes with the code)."""
    return "_ray_pkg_" in str(cwd or Path.cwd())


def resolve_output_dir(output_dir: str) -> Path:
    """``run.output_dir`` made absolute: against ``$TOOLKIT_OUTPUT_ROOT``, else ``~/toolkit-runs`` inside a
    Ray job's temporary working folder (so re-submitting finds the same folder), else the current folder."""
    p = Path(output_dir).expanduser()
    if p.is_absolute():
        return p
    root = os.environ.get(OUTPUT_ROOT_ENV, "")
    if root:
        return (Path(root).expanduser() / p).resolve()
    if in_ray_job_working_dir():
        return (Path(JOB_OUTPUT_ROOT).expanduser() / p).resolve()
    return p.resolve()


def is_uri(path: str) -> bool:
    return "://" in path


def storage_path(execution: Execution) -> str:
    """``ray.storage_path`` (a local path made absolute, or a URI), else ``<run.output_dir>/ray``."""
    sp = execution.ray.storage_path
    if sp:
        return sp if is_uri(sp) else str(Path(sp).expanduser().resolve())
    return str(resolve_output_dir(execution.run.output_dir) / "ray")


_checked: set[str] = set()


def _sees(path: str) -> tuple[str, bool]:
    import ray

    return ray.get_runtime_context().get_node_id(), os.path.exists(path)


def check_shared(execution: Execution, path: str) -> None:
    """On a Ray cluster of several nodes, a local storage path must be one every node sees: else one line, now.

    Without this, a worker on another node writes its checkpoint to its own disk and the
    driver fails later ("checkpoint not found"), or a Tune trial's result is silently lost.
    """
    if is_uri(path) or path in _checked:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    marker = Path(path) / f".toolkit-shared-{uuid.uuid4().hex}"
    marker.write_text("written by the driver to check that every node sees this folder\n")
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(str(marker))
                for n in others]
        blind = [node for node, seen in ray.get(refs, timeout=120) if not seen]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        what = "ray.storage_path" if execution.ray.storage_path else "ray.storage_path (empty: <run.output_dir>/ray)"
        raise ConfigError(
            f"{what} = {path} is on this node's disk only ({len(blind)} of {len(others) + 1} nodes cannot see it): "
            "on a multi-node cluster set ray.storage_path to a mount every node shares or to s3://bucket/path"
        )
    _checked.add(path)
