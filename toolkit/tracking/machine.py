"""What a run computed on and who ran it: the machine tags every MLflow run carries.

No MLflow here: the benchmarks and the GPU check name their device with it on machines without MLflow.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - no git is fine
        return "unknown"


def _user() -> str:
    """Who runs the command (MLflow's fluent runs tag it; the UI shows it as "Created by")."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no USER variable and no passwd entry (some containers)
        return ""


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)  # the machine does not change within a process; every run asks
def _machine() -> tuple[tuple[str, str], ...]:
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    tags = {"toolkit.torch": torch.__version__, "toolkit.cpu": f"{_cpu_model()} ({kernels})"}
    if torch.cuda.is_available():
        tags["toolkit.gpu"] = torch.cuda.get_device_name(0)
    return tuple(tags.items())


def machine_tags() -> dict[str, str]:
    """What the driver computes on, as run tags.

    The same seeds give other last digits on another CPU: torch picks its kernels by the
    vector instructions it finds (AVX2, AVX-512, ...), training runs drift apart from there, and
    the cpu profile's figures moved by up to half a point per seed between two 2-core AMD EPYC
    machines with the same packages (benchmarks/RESULTS.md). A figure is comparable only with
    its machine named. Workers on other nodes may differ; their throughput is in each training
    run's metrics.
    """
    return dict(_machine())


def device_label(device: Any) -> str:
    """How a benchmark names what it computed on: the GPU's name on CUDA, else "cpu" and
    ``toolkit.cpu`` (the CPU model and torch's kernel level)."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {machine_tags()['toolkit.cpu']}"
