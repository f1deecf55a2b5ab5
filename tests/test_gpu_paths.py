"""The GPU-only branches, checked on a CPU until a CUDA run does: each is imported, its annotations
resolve, and the Ray resources the GPU settings ask for are the intended ones (Ray Train workers,
Ray Data actors, Tune trials), with Ray's and Accelerate's entry points replaced by recorders.

What runs on a GPU host instead of this: ``bash benchmarks/gpu_check.sh`` (its Ray part runs the
three paths for real). The Ray-part script's own logic (what counts as a failure, Ray missing)
is checked here too.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from toolkit.config import Config, ConfigError, Execution, load_config
from toolkit.datasets.mnist import make_split

REPO = Path(__file__).resolve().parents[1]
GPU_PROFILE = REPO / "launch" / "configs" / "gpu.yaml"


class Stop(Exception):
    """Raised by a recorder where the real call would start work."""


def gpu_profile(*overrides: str) -> Config:
    return load_config(GPU_PROFILE, list(overrides))


def tiny_split():
    """A split as the driver computes it once (labeled / val / pool indices) for a job that never loads data."""
    from toolkit.datasets.mnist import Split

    return Split(torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 100), seed=0, labels_per_class=1)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_gpu_branch_imports_and_its_annotations_resolve():
    import toolkit.execution.backends as backends
    import toolkit.execution.pool_inference as inference
    import toolkit.engine.jobs as jobs
    import toolkit.stages.tune as tune_stage
    import toolkit.stages.tune_trial as tune_trial
    import toolkit.engine.workers as train_loops
    import toolkit.tracking.tune_runs as tune_records

    ray_part = load_script("gpu_check_ray.py")
    local_part = load_script("gpu_check.py")
    branches = [train_loops.make_accelerator, jobs.worker_device, jobs.TrainJob.simclr, jobs.TrainJob.for_classifier,
                backends.run_training, backends.check_gpu_visible,
                inference.PoolPredictor.__init__, inference.predict_pool_ray, inference._actor_bundle,
                tune_stage.trial_resources, tune_stage.trial_trainable, tune_stage._start_ray,
                tune_trial.trial_execution, tune_trial.placed_device, tune_trial.device_report, tune_trial._trial,
                tune_records.kill_trial_runs,
                ray_part.main, ray_part.train_worker_probe, ray_part.problems, local_part.main]
    for fn in branches:
        hints = typing.get_type_hints(fn)  # every name in the annotations exists (a NameError otherwise)
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert all(p in hints for p in params), fn.__qualname__  # every parameter annotated


def test_gpu_profile_tune_trials_hold_a_quarter_gpu_each_and_train_on_it():
    from toolkit.engine.jobs import worker_device
    from toolkit.stages import tune as tune_stage
    from toolkit.stages.tune_trial import TrialJob, _trial_study, placed_device, trial_execution

    cfg = gpu_profile()
    job = TrialJob(base=cfg.study, execution=trial_execution(cfg.execution), key="k", simclr=None, start=None,
                   simclr_choices={}, splits=[make_split(torch.arange(2000) % 10, 10, 100, 0)], images=None)
    trainable = tune_stage.trial_trainable(cfg.execution, job)
    # what the Tuner asks Ray for, per trial (Tune resolves with_resources' factory when it wraps the function)
    assert trainable._resources.required_resources == {"CPU": 2.0, "GPU": 0.25}
    assert trainable._resources.bundles == [{"CPU": 2.0, "GPU": 0.25}]
    assert cfg.trials.max_concurrent == 4  # four trials fill one GPU
    # the trial trains in-process on what Ray gave it, with one thread per reserved CPU
    assert job.execution.run.threads == 2 and job.execution.run.backend == "local"
    assert placed_device([0]) == "cuda" and placed_device([]) == "cpu"
    # what _trial runs: the base study at the point, and the trial's execution with the device Ray placed it on
    assert _trial_study(job, {}) == cfg.study
    placed = job.execution.replace(**{"run.device": placed_device([0])})
    assert placed.run.device == "cuda"
    assert worker_device(placed, "classifier") == "cuda" and worker_device(placed, "simclr") == "cuda"
    # the default (cpu) profile: a whole CPU, no GPU
    assert tune_stage.trial_resources(Execution()) == {"cpu": 1.0, "gpu": 0.0}


def test_the_tune_driver_asks_ray_for_the_trials_gpu_share(monkeypatch):
    import toolkit.execution.backends as backends
    from toolkit.stages import tune as tune_stage

    asked = []
    monkeypatch.setattr(backends, "init_ray", lambda cfg: None)
    monkeypatch.setattr(backends, "require_resources", lambda cfg, need, what: asked.append(need))
    monkeypatch.setattr(tune_stage, "check_shared", lambda cfg, path: None)
    tune_stage._start_ray(gpu_profile().execution)
    assert asked == [{"CPU": 2.0, "GPU": 0.25}]


def test_a_trial_given_a_gpu_torch_cannot_see_fails_readably_else_reports_cuda():
    from toolkit.stages.tune_trial import device_report
    from toolkit.tracking.machine import device_label

    assert device_report(Execution().replace(**{"run.device": "cpu"})) == {"device": "cpu",
                                                                           "device_name": device_label("cpu")}
    cuda = Execution().replace(**{"run.device": "cuda"})
    if torch.cuda.is_available():
        assert device_report(cuda) == {"device": "cuda", "device_name": device_label("cuda")}
    else:
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            device_report(cuda)


def test_ray_train_workers_ask_for_one_gpu_each_and_accelerate_for_bf16(monkeypatch):
    import accelerate

    import toolkit.execution.backends as backends
    from toolkit.engine.jobs import TrainJob
    from toolkit.engine.workers import make_accelerator

    cfg = gpu_profile("ray.num_workers=2")
    job = TrainJob.simclr(cfg.study, cfg.execution, "/data", tiny_split())
    asked, built = [], []

    class RecordingTrainer:
        interrupted = False

        def __init__(self, **kwargs):
            built.append(kwargs)

        def fit(self):
            raise Stop

    monkeypatch.setattr(backends, "init_ray", lambda cfg: None)
    monkeypatch.setattr(backends, "require_resources", lambda cfg, need, what: asked.append(need))
    monkeypatch.setattr(backends, "check_shared", lambda cfg, path: None)
    monkeypatch.setattr(backends, "_interruptible_trainer_class", lambda: RecordingTrainer)
    with pytest.raises(Stop):
        backends.run_training(cfg.execution, job, "probe")
    assert asked == [{"CPU": 2.0, "GPU": 2}]
    scaling = built[0]["scaling_config"]
    assert scaling.num_workers == 2 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1}
    # what the workers get: the job alone (Ray carries it by value), no config or execution beside it
    assert list(built[0]["train_loop_config"]) == ["job"] and built[0]["train_loop_config"]["job"] is job
    assert job.device == "cuda"  # ray.use_gpu: the worker uses the GPU Ray gave it (jobs.worker_device)

    made = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: made.append(kwargs) or kwargs)
    make_accelerator(job)  # inside a GPU worker: Accelerate on the GPU, bf16 autocast
    assert made == [{"cpu": False, "mixed_precision": "bf16"}]
    cpu_job = TrainJob.simclr(cfg.study, cfg.execution.replace(**{"ray.use_gpu": False}), "/data", tiny_split())
    assert cpu_job.device == "cpu"
    make_accelerator(cpu_job)
    assert made[-1] == {"cpu": True, "mixed_precision": "no"}


def test_ray_data_actors_ask_for_one_gpu_each(ray_session, monkeypatch, fake_mnist_root):
    import ray.data

    import toolkit.execution.backends as backends
    import toolkit.execution.pool_inference as inference
    from toolkit.engine.jobs import ModelWeights
    from toolkit.maths.models import Classifier

    cfg = gpu_profile(f"run.data_root={fake_mnist_root}", "data.train_subset=1000", "model.width=8")
    asked, mapped = [], []
    monkeypatch.setattr(backends, "require_resources", lambda cfg, need, what: asked.append(need))

    def recording_map_batches(self, fn, **kwargs):
        mapped.append((fn, kwargs))
        raise Stop

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording_map_batches)
    weights = ModelWeights("classifier", cfg.study.to_dict(), Classifier(cfg.model).state_dict())
    with pytest.raises(Stop):
        inference.predict_pool_ray(cfg.execution, cfg.study.data, weights, list(range(100)), num_actors=1, batch_size=50)
    assert asked == [{"GPU": 1}]
    fn, kwargs = mapped[0]
    assert fn is inference.PoolPredictor and kwargs["num_gpus"] == 1 and kwargs["fn_constructor_kwargs"]["use_gpu"]
    assert kwargs["compute"].min_size == 1 and inference._actor_bundle(True) == {"CPU": inference.ACTOR_NUM_CPUS,
                                                                                 "GPU": 1.0}


def test_the_ray_part_fails_a_gpu_host_where_a_path_ran_on_the_cpu():
    ray_part = load_script("gpu_check_ray.py")
    good = {"train_worker": {"device": "cuda:0", "mixed_precision": "bf16", "process_group": "nccl"},
            "pseudolabel": {"actor_resources": {"CPU": 0.5, "GPU": 1.0}},
            "tune": {"trial_devices": [{"trial": "a", "run.device": "cuda", "device": "NVIDIA H100"}]}}
    assert ray_part.problems(True, good) == [] and ray_part.problems(False, good) == []
    cpu_worker = {**good, "train_worker": {"device": "cpu", "mixed_precision": "no", "process_group": "gloo"}}
    cpu_trial = {**good, "tune": {"trial_devices": [{"trial": "a", "run.device": "cpu", "device": "cpu"}]}}
    no_trials = {**good, "tune": {"trial_devices": []}}
    for bad, what in ((cpu_worker, "Ray Train worker"), (cpu_trial, "Tune trials"), (no_trials, "Tune trials")):
        (line,) = ray_part.problems(True, bad)
        assert line.startswith(what)
    assert ray_part.problems(False, cpu_trial) == []  # a CPU host: the same paths, on the CPU by design


def test_without_ray_the_ray_part_says_so_in_one_line(tmp_path):
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shim")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_ray.py"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [
        "[gpu_check] Ray part: skipped, Ray is not installed (pip install 'ray[train,tune,data]')"]
    assert done.stderr == ""


def test_a_missing_plot_package_is_one_line_before_any_training(tmp_path):
    local_part = load_script("gpu_check.py")
    assert local_part.missing_packages() == []
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['seaborn'] = None  # import seaborn -> ImportError\n")
    env = {**os.environ, "PYTHONPATH": str(shim), "GPU_CHECK_PARTS": "local",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout + done.stderr)[-2000:]
    assert done.stdout.strip() == "gpu_check: error: missing packages: seaborn (pip install seaborn)"
