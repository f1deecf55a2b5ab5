"""A failed Ray Train worker is reported by its own failure, not by the survivors' lost-peer errors.

When one worker dies, the ranks waiting on it in a collective fail too, with gloo's (or NCCL's)
"Connection closed by peer"; Ray Train hands back every rank's failure, and the lowest rank is
often a survivor. The pure tests give ``describe_error`` such failures; the integration test
kills one of two real gloo workers in the middle of an all-reduce.
"""

from __future__ import annotations

import os
import sys

import pytest

from toolkit.errors import describe_error, root_failure

ray = pytest.importorskip("ray")

GLOO_LOST = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                         "[127.0.0.1]:50357")
GLOO_RESET = RuntimeError("[gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:6120: Connection reset by peer")


def test_the_dead_workers_own_failure_is_picked_over_lower_ranks_lost_peer_errors():
    cause = MemoryError("CUDA out of memory")
    assert root_failure({0: GLOO_LOST, 1: GLOO_RESET, 2: cause, 3: ValueError("later rank")}) is cause


def test_with_only_lost_peer_errors_the_lowest_rank_is_reported():
    assert root_failure({2: GLOO_RESET, 1: GLOO_LOST}) is GLOO_LOST


def test_the_lowest_rank_wins_among_real_causes():
    first = ValueError("rank 1's own")
    assert root_failure({3: KeyError("rank 3"), 1: first, 0: GLOO_LOST}) is first


def test_the_cli_line_names_the_root_cause(monkeypatch):
    from ray.train.v2.api.exceptions import WorkerGroupError

    monkeypatch.delenv("TOOLKIT_TRACEBACK", raising=False)
    err = WorkerGroupError("...", {0: GLOO_LOST, 1: FloatingPointError("loss is nan at step 7")})
    assert describe_error(err) == "a Ray Train worker failed: FloatingPointError: loss is nan at step 7"


def test_a_worker_that_died_is_reported_as_its_process_death_not_as_a_failed_health_check(monkeypatch):
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    monkeypatch.delenv("TOOLKIT_TRACEBACK", raising=False)
    died = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    line = describe_error(WorkerGroupError("...", {0: GLOO_LOST, 1: died}))
    assert line == "a Ray Train worker failed: ActorDiedError: The actor died unexpectedly before finishing this task."


# ------------------------------------------------------------------ real Ray Train: one of two gloo workers dies


@pytest.fixture(scope="module")
def ray_session():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop below is not importable by workers
    from toolkit.execution.backends import init_ray
    from toolkit.config import Execution

    init_ray(Execution())  # as every command starts it: on 127.0.0.1, with the token (gloo included)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _rank_1_dies_in_an_all_reduce(config: dict) -> None:
    import time

    import torch
    import torch.distributed as dist
    import ray.train

    x = torch.ones(4)
    dist.all_reduce(x)  # both ranks are connected
    if ray.train.get_context().get_world_rank() == 1:
        time.sleep(1.0)  # rank 0 is already waiting in the next all-reduce
        os._exit(3)  # as by the OOM killer: no Python exception on this rank
    dist.all_reduce(x)


@pytest.mark.slow
def test_a_killed_worker_is_reported_as_its_death_not_as_rank_0s_gloo_error(ray_session, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_rank_1_dies_in_an_all_reduce, scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="dies", storage_path=str(tmp_path),
                                                failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(Exception) as info:
        trainer.fit()
    failures = getattr(info.value, "worker_failures", {})
    print({rank: f"{type(f).__name__}: {str(f)[:200]}" for rank, f in failures.items()})
    line = describe_error(info.value)
    print(line)
    assert line and "\n" not in line
    assert "closed by peer" not in line.lower() and "reset by peer" not in line.lower(), line
    # rank 1's own failure: its process died, and how (Ray's exit detail, not only "health check failed")
    assert line.startswith("a Ray Train worker failed: ActorDiedError: ") and "exit" in line.lower(), line
