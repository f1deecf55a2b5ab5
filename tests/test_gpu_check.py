"""The GPU check script runs end to end with a tiny setting (on a CPU, or on the GPU where there is one)
and writes the promised JSON: its local part, and its Ray part (the Ray GPU paths, on the CPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu_with_a_tiny_setting(data_root, tmp_path):
    out = tmp_path / "check"
    tiny = ["data.train_subset=1500", "data.test_subset=300", "split.val_size=200", "model.width=8",
            "model.convs_per_stage=1", "pretrain.epochs=1", "pretrain.batch_size=128", "pretrain.warmup_epochs=0",
            "classifier.steps=20", "classifier.eval_every=10", "classifier.batch_size=64", "pseudolabel.rounds=2",
            "pseudolabel.steps_per_round=10", "tracking.tsne_points=0", "probe.all_labels=false", "pipeline.seeds=[0,1]",
            "run.threads=1", f"run.data_root={data_root}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GPU_CHECK_PARTS": "local",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), *tiny], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").read_text().count("[gpu_check]") >= 2
    import torch

    from toolkit.tracking.machine import device_label

    # the gpu profile runs on the GPU where there is one, else on the CPU; the label names which
    assert report["seeds"] == [0, 1] and report["device"] == device_label("cuda" if torch.cuda.is_available() else "cpu")
    # which kernels the figures came from (they differ between CPU types)
    assert report["cpu"].endswith(f"({torch.backends.cpu.get_cpu_capability()})")
    if not torch.cuda.is_available():
        assert report["cpu"] in report["device"]
    stages = {"supervised", "oneshot", "iterative", "simclr_iterative"}
    assert stages <= set(report["test_acc_mean_std"])
    for stage in stages:
        m = report["test_acc_mean_std"][stage]
        assert m["n"] == 2 and 0.2 < m["mean"] <= 1.0  # well above chance (0.1) even for 20-step models
        for seed in ("0", "1"):
            row = report["per_seed"][seed][stage]
            assert row["seconds"] > 0 and 0 < row["val_acc"] <= 1
    assert "100-labels/linear/test_acc" in report["probe_test_acc"]
    # the student's figure averages augmented views; its one-view figure is there beside it
    for seed in ("0", "1"):
        student = report["per_seed"][seed]["student"]
        assert 0.2 < student["test_acc"] <= 1 and 0.2 < student["test_acc_plain"] <= 1
    assert "student, one view (no test-time augmentation)" in {row["result"] for row in report["table"]}


def test_gpu_check_without_an_output_folder_is_a_usage_line():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage:")


@pytest.mark.slow
def test_gpu_check_ray_part_runs_the_three_ray_paths(data_root, tmp_path):
    """Ray Train worker with Accelerate, Ray Data actors, Tune trials: on the CPU here (the GPU on a GPU host)."""
    import torch

    out = tmp_path / "check"
    tiny = ["data.train_subset=1500", "data.test_subset=300", "split.val_size=200", "model.width=8",
            "model.convs_per_stage=1", "pretrain.epochs=1", "pretrain.max_images=256", "pretrain.batch_size=128",
            "pretrain.warmup_epochs=0", "classifier.steps=20", "classifier.eval_every=20", "classifier.batch_size=64",
            "pseudolabel.steps_per_round=10", "pseudolabel.rounds=2", "tune.num_samples=2", "tune.pool_subset=500",
            "ray.cpus_per_worker=0.5", "run.threads=1", f"run.data_root={data_root}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GPU_CHECK_PARTS": "ray",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), *tiny], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads((out / "gpu_check_ray.json").read_text())
    gpu = torch.cuda.is_available()
    worker = report["train_worker"]
    assert worker["loss_finite"] and worker["device"].startswith("cuda" if gpu else "cpu")
    assert (worker["process_group"], worker["mixed_precision"]) == (("nccl", "bf16") if gpu else ("gloo", "no"))
    assert report["pretrain"]["seconds"] > 0 and 0 < report["pseudolabel"]["test_acc"] <= 1
    assert report["pseudolabel"]["actor_resources"].get("GPU", 0) == (1.0 if gpu else 0)
    assert report["tune"]["trials"] == 2 and report["tune"]["trial_resources"]["gpu"] == (0.25 if gpu else 0)
    devices = report["tune"]["trial_devices"]
    assert len(devices) == 2 and {d["run.device"] for d in devices} == {"cuda" if gpu else "cpu"}
    assert report["problems"] == [] and (out / "gpu_check_ray.log").read_text().count("[gpu_check]") >= 4
