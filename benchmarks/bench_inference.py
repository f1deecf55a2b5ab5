"""Pool inference throughput: Ray Data actor pool against a plain in-process loop, in one run.

    python benchmarks/bench_inference.py [--data-root ../shared/data] [--pool 58900] [--actors 1 2]

All paths run the same model file over the same pool indices (the unlabeled pool of
the default split) and must return the same probabilities: the script prints the largest
difference and fails above 1e-5.
On a CPU the loop runs twice: with its forward passes capped at ``engine.CPU_FORWARD_BATCH``
images (what toolkit does) and with passes of the whole ``--batch-size``. The Ray figures
include what a pseudo-labeling round pays: actor start-up, model and data loading per
actor, scheduling and the gather (measured against a warm Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.engine import checkpoints  # noqa: E402
from toolkit.engine import loops as engine
from toolkit.config import Config  # noqa: E402
from toolkit.datasets.mnist import load_mnist, make_split  # noqa: E402
from toolkit.execution.pool_inference import device_for, predict_pool_local, predict_pool_ray, weights_from_file  # noqa: E402
from toolkit.maths.models import Classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = os.environ.get("TOOLKIT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--data-root", default=default_root)
    ap.add_argument("--pool", type=int, default=0, help="pool images (0: the whole unlabeled pool)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    cfg = Config().replace(**{"run.data_root": args.data_root, "model.width": args.width,
                              "inference.batch_size": args.batch_size})
    data = load_mnist(args.data_root)
    pool = make_split(data.train_labels, cfg.split.labels_per_class, cfg.split.val_size, cfg.split.seed).pool
    if args.pool:
        pool = pool[: args.pool]
    torch.manual_seed(0)
    model = Classifier(cfg.model)
    model_file = Path(tempfile.mkdtemp()) / "model.pt"
    checkpoints.save(model_file, checkpoints.model_payload("classifier", cfg.study.to_dict(), model.state_dict()))
    weights = weights_from_file(str(model_file))  # what a round hands to either path

    device = device_for(cfg.execution)
    on_cpu = device.type == "cpu"
    rows = []
    # the in-process path reads the driver's images (as a round does); the actors load their own
    predict_pool_local(weights, data.train_images, pool[:256], device=device)  # warm-up: imports, first kernels
    t0 = time.perf_counter()
    ref = predict_pool_local(weights, data.train_images, pool, batch_size=args.batch_size, device=device)
    dt = time.perf_counter() - t0
    passes = f" (CPU forward passes of {engine.CPU_FORWARD_BATCH})" if on_cpu else ""
    rows.append({"path": f"in-process loop{passes}", "seconds": dt, "images_per_s": len(pool) / dt, "max_abs_diff": 0.0})
    if on_cpu:  # the same loop with forward passes of the whole --batch-size
        capped, engine.CPU_FORWARD_BATCH = engine.CPU_FORWARD_BATCH, args.batch_size
        try:
            t0 = time.perf_counter()
            probs = predict_pool_local(weights, data.train_images, pool, batch_size=args.batch_size, device=device)
            dt = time.perf_counter() - t0
        finally:
            engine.CPU_FORWARD_BATCH = capped
        rows.append({"path": f"in-process loop, forward passes of {args.batch_size}", "seconds": dt,
                     "images_per_s": len(pool) / dt, "max_abs_diff": float(np.abs(probs - ref).max())})

    import ray

    from toolkit.execution.backends import init_ray

    init_ray(cfg.execution)
    for n in args.actors:
        t0 = time.perf_counter()
        probs = predict_pool_ray(cfg.execution, cfg.study.data, weights, pool, num_actors=n, batch_size=args.batch_size)
        dt = time.perf_counter() - t0
        max_diff = float(np.abs(probs - ref).max())
        rows.append({"path": f"Ray Data, {n} actor(s)", "seconds": dt, "images_per_s": len(pool) / dt, "max_abs_diff": max_diff})
    ray.shutdown()

    print(f"# pool inference, {len(pool)} images, width {args.width}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, load(1m) {os.getloadavg()[0]:.2f}")
    print("| path | seconds | images/s | vs in-process | max abs. difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = rows[0]["images_per_s"]
    for r in rows:
        print(f"| {r['path']} | {r['seconds']:.2f} | {r['images_per_s']:,.0f} | {r['images_per_s'] / base:.2f}x "
              f"| {r['max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    worst = max(r["max_abs_diff"] for r in rows)
    if worst > 1e-5:  # every path must return the in-process probabilities
        sys.exit(f"paths disagree: max abs. probability difference {worst:.1e} > 1e-5")


if __name__ == "__main__":
    main()
