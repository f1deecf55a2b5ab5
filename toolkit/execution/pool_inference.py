"""Batch inference over the unlabeled pool: class probabilities for each pseudo-labeling round.

Two drivers around one function (``pool_probs``): in-process (``predict_pool_local``)
and a Ray Data actor pool (``predict_pool_ray``), where each actor builds the model
from weights it receives through Ray's object store (``ray.put`` once per round, so an
actor on another node needs no file of the driver's), loads its node's own copy of
the MNIST training images once, and then maps batches of pool indices to
probabilities. Only weights and indices travel, never images.

Ray Data actors carry seconds of start-up overhead (ray#44905): on MNIST-sized
pools the in-process path is faster on one machine; the actor pool pays off
when the pool is large or spread over several GPU nodes. Ray is imported only
on the Ray path, so a GPU box without Ray can still run ``inference=local``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.engine import checkpoints
from toolkit.config import ConfigError, DataConfig, Execution, Study
from toolkit.datasets.mnist import resolve_root
from toolkit.datasets.streamed import take
from toolkit.datasets.training_data import load_image_data
from toolkit.engine.loops import predict_logits
from toolkit.engine.jobs import ModelWeights
from toolkit.maths.models import Classifier

# CPUs each inference actor reserves: a fraction, so an actor pool never takes every
# CPU and starves Ray Data's own tasks (an actor pool that does hangs: Ray Data's read tasks get no CPU).
ACTOR_NUM_CPUS = 0.5
# Least time given to a pool on several nodes to reserve its slots and start every actor
# (``ray.resource_wait_s`` when longer): an actor's start (worker process, torch import,
# MNIST load) takes 5-15 s on a busy node.
POOL_START_MIN_S = 120.0


def _as_index_array(indices: Any) -> np.ndarray:
    """LongTensor / array / list of indices -> contiguous int64 numpy array (N,)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))


def _check_in_range(idx: np.ndarray, n_images: int, where: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n_images):
        raise IndexError(
            f"{where}: pool indices span [{int(idx.min())}, {int(idx.max())}] but only {n_images} training images "
            f"are loaded (data.train_subset?)"
        )


def device_for(execution: Execution | None = None) -> torch.device:
    """Where the driver evaluates and predicts: ``run.device`` when it names one, else cuda if visible, else cpu."""
    if execution is not None and execution.run.device != "auto":
        if execution.run.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("run.device='cuda' is not allowed: no CUDA GPU is visible to this process")
        return torch.device(execution.run.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_classifier(weights: ModelWeights, device: torch.device | str) -> torch.nn.Module:
    """A classifier from weights passed by value, in eval mode and channels_last on ``device``: the one
    place a classifier is built from a model file's weights (stages, Ray Data actors, ``toolkit predict``;
    an MLflow model package is read by ``tracking.model_package``).

    The architecture comes from the weights' own config, so the caller's config need not match it.
    """
    if weights.kind != "classifier":
        raise checkpoints.CheckpointError(f"pool inference needs a classifier, got a '{weights.kind}' model")
    model = Classifier(checkpoints.model_config_of({"config": weights.config}), weights.spec)
    model.load_state_dict(weights.state_dict)
    return model.to(device=device, memory_format=torch.channels_last).eval()


def weights_from_file(model_path: str) -> ModelWeights:
    """A classifier model file as ``ModelWeights`` (``CheckpointError`` if missing or of another kind)."""
    return ModelWeights.from_payload(checkpoints.load_model_file(model_path, "classifier"))


def pool_probs(model: torch.nn.Module, images_u8: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Softmax probabilities (N, C) float32 for uint8 images (N, C, S, S) on the model's device.

    float32 throughout (no autocast): the probabilities feed a confidence threshold,
    and both drivers must agree to within float rounding.
    """
    return F.softmax(predict_logits(model, images_u8, batch_size), dim=1)


def predict_pool_local(weights: ModelWeights, images: torch.Tensor, indices: Any, batch_size: int = 2048,
                       device: torch.device | str | None = None) -> np.ndarray:
    """Probabilities (len(indices), 10) float32 for ``images[indices]`` (the uint8 training images), in
    their order, in-process on ``device`` (default: cuda when visible)."""
    idx = _as_index_array(indices)
    if idx.size == 0:
        return np.zeros((0, weights.spec.num_classes), dtype=np.float32)
    device = torch.device(device) if device is not None else device_for()
    model = build_classifier(weights, device)
    _check_in_range(idx, images.shape[0], "predict_pool_local")
    # index on the CPU, then move only the pool images (N, C, S, S) uint8
    pool = take(images, torch.from_numpy(idx)).to(device)
    return pool_probs(model, pool, batch_size).cpu().numpy().astype(np.float32, copy=False)


class PoolPredictor:
    """Ray Data ``map_batches`` callable: {"index": (B,)} -> {"index": (B,), "probs": (B, C) float32}.

    Constructed once per actor: the model and the uint8 training images (N, C, S, S)
    are loaded then and stay on the actor's device, so a batch costs one gather and
    one forward pass. ``images``: a Ray ObjectRef to a user's images (no other node can
    read their folder), or None: a benchmark, read from this node's copy at ``data_root``.
    """

    def __init__(self, weights: Any, data: DataConfig, data_root: str, images: Any, use_gpu: bool,
                 resident_bytes: int = 0):
        import ray

        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so "cuda" is that GPU
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        self.model = build_classifier(weights, self.device)
        # download=False: concurrent actors must not race to download; the data must be there
        if images is not None:
            self.images = ray.get(images).to(self.device)
        else:
            self.images = load_image_data(data, data_root, download=False, resident_bytes=resident_bytes).train_images.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # batches are read-only zero-copy views: copy before torch.from_numpy
        idx = np.array(batch["index"], dtype=np.int64, copy=True)
        _check_in_range(idx, self.images.shape[0], "PoolPredictor")
        x = self.images[torch.from_numpy(idx).to(self.device)]
        probs = pool_probs(self.model, x, batch_size=max(len(idx), 1))
        return {"index": idx, "probs": probs.cpu().numpy().astype(np.float32, copy=False)}


def _check_ray_resources(execution: Execution, num_actors: int) -> None:
    """Fail fast where Ray would otherwise wait forever for resources that do not exist."""
    import ray

    from toolkit.execution.backends import require_resources

    if execution.ray.use_gpu:  # on a cluster: wait for the autoscaler to add GPU nodes, within ray.resource_wait_s
        require_resources(execution, {"GPU": num_actors}, f"inference.actors={num_actors} with ray.use_gpu=true "
                                                    "(one GPU per actor)")
    cpus = ray.cluster_resources().get("CPU", 0)
    if num_actors * ACTOR_NUM_CPUS >= cpus:
        raise ConfigError(
            f"inference.actors={num_actors} is not allowed: {num_actors} actors x {ACTOR_NUM_CPUS} CPU "
            f"would take all {cpus:g} CPUs of the Ray cluster and starve Ray Data's tasks"
        )


def _actor_bundle(use_gpu: bool) -> dict[str, float]:
    """What one inference actor reserves (exactly its ``num_cpus`` / ``num_gpus``)."""
    return {"CPU": ACTOR_NUM_CPUS, **({"GPU": 1.0} if use_gpu else {})}


def spread_strategy(nodes: list[dict], bundle: dict[str, float], num_actors: int) -> str | None:
    """How to place ``num_actors`` actors of ``bundle`` on the alive ``nodes`` (as ``ray.nodes()`` lists them).

    None when at most one node could ever host an actor (one machine: nothing to spread);
    "STRICT_SPREAD" (every actor on its own node) when at least ``num_actors`` nodes could;
    else "SPREAD" (as evenly as the nodes allow). Judged on the nodes' total resources, not on
    what is free now: a busy node frees up, and the placement group waits for it.
    """
    fit = sum(1 for n in nodes if n.get("Alive")
              and all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items() if v > 0))
    if fit <= 1:
        return None
    return "STRICT_SPREAD" if fit >= num_actors else "SPREAD"


def _reserve_pool(execution: Execution, num_actors: int, timeout_s: float):
    """On a cluster of several nodes: a placement group of one bundle per actor, spread over the nodes
    (see ``spread_strategy``), once Ray has reserved it; None on one node. ``ConfigError`` when the
    bundles cannot be reserved within ``timeout_s``."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = _actor_bundle(execution.ray.use_gpu)
    strategy = spread_strategy(ray.nodes(), bundle, num_actors)
    if strategy is None:
        return None
    pg = placement_group([dict(bundle) for _ in range(num_actors)], strategy=strategy)
    if not pg.wait(timeout_s):
        remove_placement_group(pg)
        raise ConfigError(
            f"inference.actors={num_actors}: Ray could not reserve {num_actors} x {bundle} "
            f"({strategy}) within {timeout_s:.0f}s; the cluster has {ray.available_resources()} free "
            f"of {ray.cluster_resources()} (ray.resource_wait_s={execution.ray.resource_wait_s:g})"
        )
    return pg


def _reorder(indices: np.ndarray, got_index: np.ndarray, got_probs: np.ndarray) -> np.ndarray:
    """Rows of ``got_probs`` in the order of ``indices``; RuntimeError unless each index has exactly one row."""
    uniq, counts = np.unique(got_index, return_counts=True)
    missing = int(np.setdiff1d(indices, uniq, assume_unique=True).size)
    duplicated = int((counts > 1).sum())
    unexpected = int(np.setdiff1d(uniq, indices, assume_unique=True).size)
    if missing or duplicated or unexpected:
        raise RuntimeError(
            f"Ray Data pool inference returned {len(got_index)} rows for {len(indices)} pool indices: "
            f"{missing} indices missing, {duplicated} duplicated, {unexpected} not in the pool"
        )
    order = np.argsort(got_index, kind="stable")
    pos = np.searchsorted(got_index[order], indices)
    return np.ascontiguousarray(got_probs[order[pos]], dtype=np.float32)


def predict_pool_ray(execution: Execution, data: DataConfig, weights: ModelWeights, indices: Any, num_actors: int,
                     batch_size: int, images: torch.Tensor | None = None) -> np.ndarray:
    """Probabilities (len(indices), 10) float32 in the order of ``indices``, from a Ray Data actor pool.

    ``num_actors`` actors (one GPU each when ``ray.use_gpu``) each get the weights from
    the object store and load their node's MNIST once (``run.data_root``: the same path on
    every node). On a cluster of several nodes the actors are spread over them (each on its
    own node when there are enough: ``spread_strategy``) and all of them are up before the
    first batch is handed out; on one node Ray Data starts with the first actor up.
    Raises ``ConfigError`` when the cluster cannot host the pool, RuntimeError unless
    every pool index got exactly one prediction.
    """
    idx = _as_index_array(indices)
    if np.unique(idx).size != idx.size:
        raise ValueError(f"pool indices must be unique: {idx.size - np.unique(idx).size} repeated")
    if idx.size == 0:
        return np.zeros((0, weights.spec.num_classes), dtype=np.float32)
    if num_actors < 1 or batch_size < 1:
        raise ConfigError(f"num_actors={num_actors} and batch_size={batch_size} must both be >= 1")

    import pyarrow as pa  # Ray Data's own dependency
    import ray

    from toolkit.execution.backends import init_ray

    init_ray(execution)
    _check_ray_resources(execution, num_actors)

    # Small data is one block and one block feeds one actor. Cap the batch so there are
    # at least two batches per actor (actors come up one after another, and the first
    # one up would otherwise take everything), and hand Ray Data one block per batch
    # directly: that is what `repartition` would produce, without a shuffle stage.
    # Row order is not guaranteed through the pool: the index column travels with each row.
    batch = max(1, min(batch_size, math.ceil(idx.size / (2 * num_actors))))
    blocks = [pa.table({"index": chunk}) for chunk in np.split(idx, np.arange(batch, idx.size, batch))]
    ds = ray.data.from_arrow(blocks)

    # Several nodes: the pool is meant to use the whole cluster, and two things keep a plain
    # SPREAD pool on one node (seen on a 2-node cluster: the second actor never ran).
    # 1. SPREAD is best effort: an actor goes where there is room *now*, so while the round's
    #    training workers still hold a node's CPU both half-CPU actors land on the other node.
    #    A placement group of one bundle per actor (STRICT_SPREAD when there are enough nodes)
    #    reserves a slot on each node first; each actor fills one bundle, so no two share a node.
    # 2. Ray Data dispatches batches as soon as one actor is up: the first one took every
    #    batch (~1 s of work) while the other was still starting (5-15 s) and was then
    #    cancelled unplaced. ``wait_for_min_actors_s`` (this dataset's own DataContext copy)
    #    makes the pool start only once all ``num_actors`` actors are up.
    # One node: unchanged (SPREAD, batches from the first actor up).
    start_timeout = max(POOL_START_MIN_S, execution.ray.resource_wait_s)
    pg = _reserve_pool(execution, num_actors, start_timeout)
    if pg is None:
        scheduling: Any = "SPREAD"
    else:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # bundle index -1: any free bundle of the group; each actor takes a whole bundle
        scheduling = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=-1,
                                                      placement_group_capture_child_tasks=False)
        ds.context.wait_for_min_actors_s = int(math.ceil(start_timeout))
    try:
        ds = ds.map_batches(
            PoolPredictor,
            fn_constructor_kwargs={
                "weights": ray.put(weights),  # once per round, whatever the number of actors
                "data": data,
                "data_root": str(resolve_root(execution.run.data_root)),
                "images": ray.put(images) if images is not None else None,
                "use_gpu": execution.ray.use_gpu,
                "resident_bytes": execution.run.resident_mb << 20,
            },
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=batch,
            batch_format="numpy",
            num_gpus=1 if execution.ray.use_gpu else 0,
            num_cpus=ACTOR_NUM_CPUS,
            scheduling_strategy=scheduling,
        )
        got_index, got_probs = [], []
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            got_index.append(np.asarray(out["index"], dtype=np.int64))
            got_probs.append(np.asarray(out["probs"], dtype=np.float32).reshape(-1, weights.spec.num_classes))
    finally:
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)  # the pool has shut down (or failed): free the reserved slots
    got_i = np.concatenate(got_index) if got_index else np.zeros(0, dtype=np.int64)
    got_p = np.concatenate(got_probs) if got_probs else np.zeros((0, weights.spec.num_classes), dtype=np.float32)
    return _reorder(idx, got_i, got_p)


def predict_pool(study: Study, execution: Execution, weights: ModelWeights, indices: Any,
                 images: torch.Tensor) -> np.ndarray:
    """Pool probabilities (len(indices), 10) float32 via ``inference.backend`` ("ray" | "local").

    ``images``: the driver's uint8 training images (in-process inference reads them; the Ray
    actors load their node's own copy). Always in-process when ``run.backend=local``: that
    backend must work without Ray.
    """
    inf = execution.inference
    if inf.backend == "local" or execution.run.backend == "local":
        return predict_pool_local(weights, images, indices, batch_size=inf.batch_size, device=device_for(execution))
    # a user's images travel to the actors through the object store; a benchmark is read on each node
    own = images if study.data.own_images else None
    return predict_pool_ray(execution, study.data, weights, indices, inf.actors, inf.batch_size, own)
