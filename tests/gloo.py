"""Run a function on 2 (or more) gloo ranks in fresh processes and collect what each rank saved:
how the distributed tests compare N ranks against one process."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, world: int, out_dir: Path) -> list[dict]:
    """``worker(rank, world, port, out_dir)`` on ``world`` processes; each saves ``rank<r>.pt`` in ``out_dir``.
    Skips the calling test where torch.distributed has no gloo backend."""
    import pytest
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
