"""The fixed cost of one Ray Train run: empty ``TorchTrainer`` fits on an embedded Ray.

    python benchmarks/bench_train_startup.py [--fits 3] [--workers 2] [--variants default no-watcher ...]

Each fit starts a worker group as toolkit's training stages do (``--workers`` gloo workers of
one CPU each), whose loop reports once and returns, so what is measured is close to what
every training stage pays before and after its own steps. Ray is started with the resources
``backends.init_ray`` asks for, but without its log-quieting worker setup hook, and the
trainer is a plain ``TorchTrainer`` without toolkit's metrics callback, so toolkit's own runs
pay a little more. Each variant runs in a fresh process
(its own Ray), the variants in turn, ``--rounds`` times, so a machine that changes speed
during the run touches every variant alike. Variants set Ray Train's environment variables:

- ``default``: Ray Train's defaults (any ``RAY_TRAIN_*`` variable of the shell removed);
- ``no-watcher``: ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` (one actor fewer per fit);
- ``fast-poll``: the above and ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5`` (default 2 s).

Prints seconds per fit for each variant and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "default": {},
    "no-watcher": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
    "fast-poll": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
}


def _loop(config: dict) -> None:
    import ray.train

    ray.train.report({"rank": ray.train.get_context().get_world_rank()})


def fits(n: int, workers: int, storage: str) -> list[float]:
    """Seconds of ``n`` empty fits in this process (an embedded Ray started the way toolkit starts it)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             log_to_driver=False)
    seconds = []
    for i in range(n):
        t = time.perf_counter()
        TorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"empty-{i}", storage_path=storage)).fit()
        seconds.append(time.perf_counter() - t)
    ray.shutdown()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fits", type=int, default=3, help="fits per variant and round")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="write the seconds as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one variant's fits, in a process whose environment the parent set
        with tempfile.TemporaryDirectory() as storage:
            print(json.dumps(fits(args.fits, args.workers, storage)))
        return 0
    seconds: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            env = {k: x for k, x in os.environ.items() if not k.startswith("RAY_TRAIN_")}
            out = subprocess.run([sys.executable, __file__, "--child", "--fits", str(args.fits),
                                  "--workers", str(args.workers)], env={**env, **VARIANTS[v]},
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                print(f"variant {v}: the fits failed (exit {out.returncode}); its output is above", file=sys.stderr)
                return 1
            seconds[v] += json.loads(out.stdout.strip().splitlines()[-1])
    for v, s in seconds.items():
        print(f"{v:>10}: {statistics.fmean(s):5.1f} s per fit (min {min(s):.1f}, max {max(s):.1f}; "
              f"{', '.join(f'{x:.1f}' for x in s)})")
    if args.out:
        args.out.write_text(json.dumps(seconds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
