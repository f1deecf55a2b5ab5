"""The GPU check's Ray part: the three GPU paths the in-process part never takes, on one GPU.

    bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]      (runs this after the local part)
    GPU_CHECK_PARTS=ray bash benchmarks/gpu_check.sh OUT_DIR  (this part alone)

1. Accelerate inside a Ray Train worker: a one-worker ``TorchTrainer`` reports the device, mixed
   precision and process group its ``make_accelerator`` got (on CUDA: cuda, bf16, NCCL) after a
   real training step, then ``toolkit pretrain`` trains SimCLR on Ray Train.
2. Ray Data actors with ``num_gpus``: ``toolkit pseudolabel`` (one-shot) labels its pool with
   ``inference.backend=ray``, one actor holding the GPU.
3. GPU Tune trials: ``toolkit tune`` with the gpu profile's ``trials.gpus`` (a quarter of
   a GPU each); every trial's MLflow run says the device it trained on (read in the trial).

Writes ``OUT_DIR/gpu_check_ray.json``. On a GPU host, a path that did not run where it should
(a CPU worker, no bf16, gloo, a trial on the CPU) fails the check (exit 1). Without a GPU the
same paths run on the CPU (how a test exercises this script); without Ray, one line says so
and the part ends (exit 0). Small settings by default; ``key=value`` overrides them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# on top of the gpu profile: a short run of each path (the local part measures the study itself)
SMALL = ["pretrain.epochs=2", "pretrain.max_images=8192", "classifier.steps=300", "classifier.eval_every=300",
         "pseudolabel.steps_per_round=300", "pseudolabel.rounds=2", "tune.num_samples=4", "tune.pool_subset=5000"]


def train_worker_probe(config: dict) -> None:
    """Inside a Ray Train worker: one bf16 (on GPU) step of the real classifier through ``make_accelerator``,
    given the SimCLR job ``toolkit pretrain`` sends its workers (device from ``jobs.worker_device``)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from toolkit.maths.models import Classifier
    from toolkit.engine.workers import make_accelerator

    job = config["job"]
    accelerator = make_accelerator(job)
    model = Classifier(job.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt = accelerator.prepare(model, opt)
    x = torch.rand(64, 1, 28, 28, device=accelerator.device)
    y = torch.randint(0, 10, (64,), device=accelerator.device)
    with accelerator.autocast():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        dtype = str(model(x).dtype)  # bf16 autocast gives bfloat16 logits
    accelerator.backward(loss)
    opt.step()
    metrics = {"device": str(accelerator.device), "mixed_precision": str(accelerator.mixed_precision),
               "process_group": dist.get_backend() if dist.is_initialized() else "none",
               "logits_dtype": dtype, "loss_finite": bool(torch.isfinite(loss).item())}
    # Ray Train V2 keeps only metrics reported with a checkpoint in the result
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def probe_train_worker(study, execution) -> dict:
    """Run ``train_worker_probe`` on one Ray Train worker with the execution's GPU settings."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from toolkit.engine.jobs import TrainJob
    from toolkit.stages.data_inputs import data_root_for_workers, load_data_and_split
    from toolkit.execution.storage import storage_path

    _, split = load_data_and_split(study, execution)
    job = TrainJob.simclr(study, execution, data_root_for_workers(execution), split)
    resources = {"CPU": execution.ray.cpus_per_worker, **({"GPU": 1} if execution.ray.use_gpu else {})}
    trainer = TorchTrainer(train_worker_probe, train_loop_config={"job": job},
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=execution.ray.use_gpu,
                                                        resources_per_worker=resources),
                           run_config=RunConfig(name="gpu-check-worker-probe", storage_path=storage_path(execution)))
    return dict(trainer.fit().metrics)


def trial_devices(execution, parent_run_id: str | None) -> list[dict]:
    """Each trial's logged device (tags ``execution.run.device`` and ``toolkit.device``) from its MLflow run."""
    if not parent_run_id:
        return []
    from mlflow.tracking import MlflowClient

    from toolkit.tracking.runs import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(execution))
    exp = client.get_experiment_by_name(execution.tracking.experiment).experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return [{"trial": r.data.tags.get("toolkit.tune.trial_id"), "run.device": r.data.tags.get("execution.run.device"),
             "device": r.data.tags.get("toolkit.device")} for r in runs]


def problems(on_gpu: bool, report: dict) -> list[str]:
    """What did not run where it should on a GPU host (nothing to check on a CPU host)."""
    if not on_gpu:
        return []
    w, out = report["train_worker"], []
    if not w["device"].startswith("cuda") or w["mixed_precision"] != "bf16" or w["process_group"] != "nccl":
        out.append(f"Ray Train worker: {w} (want cuda, bf16, nccl)")
    if report["pseudolabel"]["actor_resources"].get("GPU", 0) < 1:
        out.append(f"Ray Data actors hold no GPU: {report['pseudolabel']['actor_resources']}")
    trials = report["tune"]["trial_devices"]
    if not trials or any(t["run.device"] != "cuda" for t in trials):
        out.append(f"Tune trials not on the GPU: {trials}")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: bash benchmarks/gpu_check.sh OUT_DIR [key=value ...]", file=sys.stderr)
        return 2
    try:
        import ray
    except ImportError:
        print("[gpu_check] Ray part: skipped, Ray is not installed (pip install 'ray[train,tune,data]')", flush=True)
        return 0
    import torch

    from toolkit.config import ConfigError, load_config
    from toolkit.execution.pool_inference import _actor_bundle
    from toolkit.stages.pretrain import pretrain
    from toolkit.stages.pseudolabel import pseudolabel
    from toolkit.stages.tune import trial_resources, tune
    from toolkit.tracking.machine import device_label

    out = Path(argv[0]).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    # without a GPU the same paths run on the CPU: one trial per CPU, no GPU asked for
    device_settings = (["ray.use_gpu=true"] if on_gpu else
                       ["ray.use_gpu=false", "trials.gpus=0", "trials.cpus=1", "trials.max_concurrent=2"])
    tracking = importlib.util.find_spec("mlflow") is not None  # the trials' devices are read from their runs
    try:
        cfg = load_config(REPO / "launch" / "configs" / "gpu.yaml", [
            *SMALL, *device_settings, "run.backend=ray", "ray.num_workers=1", "inference.backend=ray",
            "inference.actors=1", "pseudolabel.mode=oneshot", "run.classifiers_local=true",
            f"tracking.enabled={str(tracking).lower()}", f"tracking.uri=sqlite:///{out / 'ray_part' / 'mlflow.db'}",
            f"run.output_dir={out / 'ray_part' / 'runs'}", *argv[1:]])
    except ConfigError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    study, execution = cfg.study, cfg.execution
    print(f"[gpu_check] Ray part on {device_label('cuda' if on_gpu else 'cpu')}"
          f"{'' if on_gpu else ' (no CUDA GPU visible: the GPU paths run on the CPU)'}", flush=True)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": device_label("cuda" if on_gpu else "cpu"),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "command": "bash benchmarks/gpu_check.sh " + " ".join(argv)}
    from toolkit.execution.backends import init_ray

    init_ray(execution)
    t0 = time.perf_counter()
    report["train_worker"] = probe_train_worker(study, execution)
    done = pretrain(study, execution)
    report["pretrain"] = {"seconds": time.perf_counter() - t0, "metrics": done.metrics}
    print(f"[gpu_check] Ray Train worker: {report['train_worker']}", flush=True)

    t0 = time.perf_counter()
    done = pseudolabel(study, execution)  # classifiers in-process (run.classifiers_local), the pool through Ray Data actors
    report["pseudolabel"] = {"seconds": time.perf_counter() - t0, "test_acc": done.metrics.get("test_acc"),
                             "val_acc": done.metrics.get("val_acc"), "actor_resources": _actor_bundle(execution.ray.use_gpu)}
    print(f"[gpu_check] Ray Data: {report['pseudolabel']}", flush=True)

    t0 = time.perf_counter()
    done = tune(study, execution)
    report["tune"] = {"seconds": time.perf_counter() - t0, "trial_resources": trial_resources(execution),
                      "trials": done.metrics.get("trials"), "best_val_acc": done.metrics.get("best_val_acc"),
                      "trial_devices": trial_devices(execution, done.run_id)}
    print(f"[gpu_check] Tune: {report['tune']}", flush=True)

    report["problems"] = problems(on_gpu, report)
    (out / "gpu_check_ray.json").write_text(json.dumps(report, indent=2, default=str))
    for line in report["problems"]:
        print(f"[gpu_check] FAILED: {line}", file=sys.stderr, flush=True)
    print(f"[gpu_check] Ray part done: {out / 'gpu_check_ray.json'}", flush=True)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
