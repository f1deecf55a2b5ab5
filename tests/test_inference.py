"""Pool inference: Ray Data actor pools (1 and 2 actors) against the in-process loop, on real MNIST.

One Ray session for the module; a random-init small classifier; a shuffled pool so
that a result in the wrong order cannot pass.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.engine import checkpoints
from toolkit.execution import pool_inference as inference
from toolkit.engine.checkpoints import CheckpointError
from toolkit.config import Config, ConfigError
from toolkit.datasets.mnist import load_mnist
from toolkit.maths.models import Classifier, SimCLRModel

DATA_ROOT = os.environ.get("TOOLKIT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
TRAIN_SUBSET = 2000
POOL_SIZE = 600


@pytest.fixture(scope="module")
def cfg() -> Config:
    return Config().replace(
        **{
            "run.data_root": DATA_ROOT,
            "data.train_subset": TRAIN_SUBSET,
            "model.width": 8,
            "model.depth": 2,
            "inference.batch_size": 256,
        }
    )


@pytest.fixture(scope="module")
def model_path(cfg, tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = Classifier(cfg.model)
    path = tmp_path_factory.mktemp("inference") / "model.pt"
    checkpoints.save(path, checkpoints.model_payload("classifier", cfg.study.to_dict(), model.state_dict()))
    return str(path)


@pytest.fixture(scope="module")
def images(cfg) -> torch.Tensor:
    """The uint8 training images the driver holds (in-process inference takes them; Ray actors load their own)."""
    return load_mnist(cfg.run.data_root, train_subset=cfg.data.train_subset).train_images


@pytest.fixture(scope="module")
def weights(model_path):
    """The model as it travels to actors: by value (ModelWeights), never as the driver's path."""
    return inference.weights_from_file(model_path)


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    # shuffled, not sorted: the result must follow this order
    return np.random.default_rng(0).permutation(TRAIN_SUBSET)[:POOL_SIZE]


@pytest.fixture(scope="module")
def local_probs(weights, images, pool) -> np.ndarray:
    return inference.predict_pool_local(weights, images, pool, batch_size=256, device="cpu")


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


def test_local_probs_are_float32_rows_summing_to_one(local_probs, pool):
    assert local_probs.shape == (POOL_SIZE, 10) and local_probs.dtype == np.float32
    np.testing.assert_allclose(local_probs.sum(1), 1.0, atol=1e-5)
    # Rows of different images differ by far more than the atol=1e-5 used to compare runs
    # below (float32 rounding of other batch sizes, thread counts and processes: seen <= 1e-7),
    # so a row in the wrong place cannot pass (seen: neighbours differ by >= 6.6e-4).
    assert np.abs(np.diff(local_probs, axis=0)).max(1).min() > 1e-4


def test_local_follows_the_order_of_indices(weights, images, pool, local_probs):
    # the same images in sorted order give the same rows, permuted
    order = np.argsort(pool)
    sorted_probs = inference.predict_pool_local(weights, images, torch.from_numpy(pool[order]), batch_size=100,
                                                device="cpu")
    np.testing.assert_allclose(sorted_probs, local_probs[order], atol=1e-5)  # other batches: other kernels


@pytest.mark.parametrize("num_actors", [1, 2])
def test_ray_data_matches_local(ray_session, cfg, weights, pool, local_probs, num_actors):
    t0 = time.perf_counter()
    probs = inference.predict_pool_ray(cfg.execution, cfg.study.data, weights, pool, num_actors=num_actors,
                                       batch_size=256)
    print(f"\nRay Data map, {num_actors} actor(s), {POOL_SIZE} images: {time.perf_counter() - t0:.2f}s")
    assert probs.shape == (POOL_SIZE, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # one row per pool index, in the pool's (shuffled) order
    np.testing.assert_allclose(probs, local_probs, atol=1e-5)


def test_predict_pool_dispatches_on_config(cfg, weights, images, pool, local_probs, monkeypatch):
    calls = []
    monkeypatch.setattr(inference, "predict_pool_ray", lambda *a, **kw: calls.append((a, kw)) or "ray")
    ray_cfg = cfg.replace(**{"inference.backend": "ray", "inference.actors": 3, "run.backend": "ray"})
    assert inference.predict_pool(ray_cfg.study, ray_cfg.execution, weights, pool, images) == "ray"
    # the actors get the execution, the data section and the indices, never the driver's images (a benchmark:
    # each node reads its own copy)
    assert calls == [((ray_cfg.execution, ray_cfg.study.data, weights, pool, 3, 256, None), {})]
    # run.backend=local wins over inference.backend=ray: that backend must work without Ray
    local_cfg = cfg.replace(**{"inference.backend": "ray", "run.backend": "local", "run.device": "cpu"})
    np.testing.assert_allclose(inference.predict_pool(local_cfg.study, local_cfg.execution, weights, pool, images),
                               local_probs, atol=1e-5)
    assert len(calls) == 1


def test_ray_use_gpu_without_gpu_fails_fast(ray_session, cfg, weights, pool):
    if ray_session.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this Ray cluster has a GPU")
    with pytest.raises(ConfigError, match="ray.use_gpu"):
        inference.predict_pool_ray(cfg.execution.replace(**{"ray.use_gpu": True}), cfg.study.data, weights, pool,
                                   num_actors=1, batch_size=256)


def _node(alive=True, **resources):
    return {"Alive": alive, "Resources": resources}


def test_spread_strategy_one_actor_per_node_when_the_cluster_can():
    cpu = inference._actor_bundle(use_gpu=False)
    gpu = inference._actor_bundle(use_gpu=True)
    assert gpu == {"CPU": inference.ACTOR_NUM_CPUS, "GPU": 1.0}
    # one machine (this module's Ray, a single-node cluster): nothing to spread, the pool is left as it was
    assert inference.spread_strategy([_node(CPU=4)], cpu, 2) is None
    # a dead node does not count
    assert inference.spread_strategy([_node(CPU=1), _node(alive=False, CPU=1)], cpu, 2) is None
    # two nodes, two actors: each on its own node; more actors than nodes: as even as possible
    two = [_node(CPU=1), _node(CPU=1, node_b=1)]
    assert inference.spread_strategy(two, cpu, 2) == "STRICT_SPREAD"
    assert inference.spread_strategy(two, cpu, 3) == "SPREAD"
    # GPU actors count only the nodes with a GPU (a CPU head with GPU: 0 hosts none)
    cloud = [_node(CPU=6, GPU=0), _node(CPU=4, GPU=1), _node(CPU=4, GPU=1)]
    assert inference.spread_strategy(cloud, gpu, 2) == "STRICT_SPREAD"
    assert inference.spread_strategy(cloud, gpu, 4) == "SPREAD"
    assert inference.spread_strategy(cloud[:2], gpu, 2) is None
    # a node too small for one actor does not count
    assert inference.spread_strategy([_node(CPU=4), _node(CPU=0.25)], cpu, 2) is None


def test_reorder_names_missing_and_duplicated_indices():
    want = np.array([5, 3, 9, 1])
    probs = np.eye(10, dtype=np.float32)[:4]
    with pytest.raises(RuntimeError, match="1 indices missing, 1 duplicated"):
        inference._reorder(want, np.array([3, 9, 9, 1]), probs)
    # a full set in any order comes back in the order asked for
    got = inference._reorder(want, np.array([1, 9, 3, 5]), probs)
    np.testing.assert_array_equal(got.argmax(1), [3, 2, 1, 0])


def test_wrong_kind_model_file_is_a_clear_checkpoint_error(cfg, images, tmp_path):
    path = tmp_path / "simclr.pt"
    checkpoints.save(path, checkpoints.model_payload("simclr", cfg.study.to_dict(), SimCLRModel(cfg.model).state_dict()))
    with pytest.raises(CheckpointError, match="holds a 'simclr' model, expected 'classifier'"):
        inference.weights_from_file(str(path))
    simclr = inference.ModelWeights.from_payload(checkpoints.load(path))
    with pytest.raises(CheckpointError, match="simclr"):
        inference.predict_pool_local(simclr, images, [0, 1, 2], device="cpu")
