"""The GPU check's local part: the gpu profile in-process on split seeds 0-4, every figure into one JSON.

    bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]

Runs ``toolkit pipeline --config launch/configs/gpu.yaml`` on the in-process backend
(a GPU box may have torch, accelerate and scikit-learn but no Ray and no MLflow),
with MLflow off, and writes ``OUT_DIR/gpu_check.json``: the device, each stage's test
and validation accuracy per seed, mean ± std over seeds, the probe accuracies, and
seconds per stage, and the report's table under both protocols (standard: validation
labels may choose; strict: only the 100 labels decide). ``key=value`` overrides the
profile (a tiny setting runs the same script on a CPU in the tests). The test set only reports.
What it needs is checked first: a missing package is one line, before any training. The Ray
paths (Ray Train workers, Ray Data actors, Tune trials on the GPU) are ``gpu_check_ray.py``.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# on top of the profile: in-process, no MLflow, the five split seeds
CHECK_OVERRIDES = ["run.backend=local", "ray.use_gpu=false", "inference.backend=local", "tracking.enabled=false",
                   "pipeline.seeds=[0,1,2,3,4]"]


# import name -> pip name of what the local part imports (seaborn and pandas: every stage's plots)
NEEDS = {"torch": "torch", "accelerate": "accelerate", "sklearn": "scikit-learn", "yaml": "pyyaml",
         "matplotlib": "matplotlib", "seaborn": "seaborn", "pandas": "pandas"}


def missing_packages() -> list[str]:
    """The pip names of NEEDS that this Python cannot import (imported now: a broken install counts too)."""
    missing = []
    for module, pip in NEEDS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip)
    return missing


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]", file=sys.stderr)
        return 2
    missing = missing_packages()
    if missing:  # found now, not after an hour of training when the first plot is drawn
        print(f"gpu_check: error: missing packages: {', '.join(missing)} (pip install {' '.join(missing)})",
              file=sys.stderr)
        return 2
    import torch

    from toolkit.config import ConfigError, load_config
    from toolkit.stages.pipeline import pipeline
    from toolkit.stages.report import final_model_figures, table_rows
    from toolkit.tracking.machine import device_label, machine_tags

    out = Path(argv[0]).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = load_config(REPO / "launch" / "configs" / "gpu.yaml",
                          [*CHECK_OVERRIDES, f"run.output_dir={out / 'runs'}", *argv[1:]])
    except ConfigError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    machine = machine_tags()  # the CPU model and the kernels torch chose: figures depend on them
    device = device_label("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[gpu_check] device: {device}; seeds {cfg.pipeline.seeds}; output {out}", flush=True)
    t0 = time.perf_counter()
    results = pipeline(cfg.study, cfg.execution)
    seconds = time.perf_counter() - t0

    # test_acc_plain: the student's network on one view (its test_acc averages augmented views)
    per_seed = {str(seed): {stage: {"test_acc": r.metrics.get("test_acc"), "val_acc": r.metrics.get("val_acc"),
                                    "seconds": r.seconds, "skipped": r.skipped,
                                    **({"test_acc_plain": r.metrics["test_acc_plain"]}
                                       if "test_acc_plain" in r.metrics else {})}
                            for stage, r in stages.items()}
                for seed, stages in results.items()}
    stages = sorted({s for r in results.values() for s in r})
    means = {}
    for stage in stages:
        vals = [r[stage].metrics["test_acc"] for r in results.values() if stage in r and "test_acc" in r[stage].metrics]
        if vals:
            means[stage] = summary(vals)
    probes = {}
    for r in results.values():
        if "probe" in r:
            for k, v in r["probe"].metrics.items():
                if k.endswith("/test_acc"):
                    probes.setdefault(k, []).append(v)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "torch": torch.__version__,
        "cpu": machine["toolkit.cpu"],
        "command": "bash benchmarks/gpu_check.sh " + " ".join(argv),
        "seeds": cfg.pipeline.seeds,
        "wall_seconds": seconds,
        "test_acc_mean_std": means,
        "probe_test_acc": {k: summary(v) for k, v in probes.items()},
        "per_seed": per_seed,
        "final_model": {str(seed): final_model_figures(stages) for seed, stages in results.items()},
        "table": [{k: row[k] for k in ("result", "standard", "strict", "mean", "std", "strict_mean", "strict_std")}
                  for row in table_rows(results)],
        "protocols": f"standard: the {10 * cfg.split.labels_per_class} training labels and {cfg.split.val_size} "
                     "validation labels may decide (probe C, best final model); strict: only the training labels "
                     "(every model is its last weights; probe C by cross-validation inside them; final model = the "
                     "last stage). The test set only reports.",
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"[gpu_check] done in {seconds:.0f}s: {out / 'gpu_check.json'}", flush=True)
    for row in report["table"]:
        print(f"[gpu_check] {row['result']}: standard {row['standard']}, strict {row['strict']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
