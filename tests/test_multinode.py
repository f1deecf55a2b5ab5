"""Issue 8 on a real 2-node Ray cluster whose second node has its own filesystem (tests/multinode.py).

Every job goes through ``launch/submit.py`` (Ray Jobs API) with the ``cpu`` profile and
small settings, as a user would send it to a cluster; the nodes export their own
``TOOLKIT_DATA_DIR`` (each its own MNIST copy at the same path). ``run.output_dir`` is
an absolute folder on the head, ``ray.storage_path`` a folder both nodes see (NFS) or an
S3 bucket (moto), ``tracking.uri`` a real MLflow server with proxied artifacts.

After each job: the MLflow server holds every run (nested ones too) with its artifacts,
and node b's disk (its view of the run folder, the MLflow store, Ray's
``session_*/artifacts`` and working-dir copies, its private ``$TMPDIR``) holds nothing the
toolkit wrote.

    TOOLKIT_DATA_DIR=/path/to/data python -m pytest tests/test_multinode.py -x -q

Needs root (``unshare``/``mount``/``nsenter``), ``ray[default]`` (dashboard, Jobs API),
``mlflow`` and ``moto[server]`` in the environment running pytest.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from multinode import BUCKET, MNIST_FILES, MultiNodeCluster, REPO, VENV_BIN

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

JOB_TIMEOUT = 900  # s per job; each takes 0.5-3 min on an idle 2-core machine (several times that under load)
SMALL = {
    "data.train_subset": 4096,
    "data.test_subset": 1000,
    "split.val_size": 500,
    "pretrain.epochs": 2,
    "classifier.steps": 60,
    "classifier.eval_every": 30,
    "pseudolabel.rounds": 2,
    "pseudolabel.steps_per_round": 60,
    "ray.num_workers": 2,
}
# what the toolkit writes (never Ray's own logs, sockets or the uploaded code)
_TOOLKIT_NAMES = {"rounds.json", "result.json", "best.yaml", "trials.csv", "search.json", "space.yaml", "split.json",
                  "config.yaml", "mlflow.db", "model.pt", "base_point.json"}
_TOOLKIT_SUFFIXES = (".pt", ".ckpt", ".db", ".png", ".csv", ".tmp")


def _toolkit_like(rel: str) -> bool:
    parts = Path(rel).parts
    name = parts[-1] if parts else ""
    return (name in _TOOLKIT_NAMES or name.endswith(_TOOLKIT_SUFFIXES) or name.startswith("toolkit")
            or any(p.startswith(("checkpoint_", "toolkit-", "round")) or p in ("runs", "outputs", "mlruns", "mlartifacts",
                                                                              "stages", "tune")
                   for p in parts[:-1]))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(data_root):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.fail("the multi-node fixture needs root with unshare, mount and nsenter (CI runs as root)", pytrace=False)
    for tool in ("ray", "mlflow", "moto_server"):
        if not (VENV_BIN / tool).exists():
            pytest.fail(f"{tool} missing in {VENV_BIN}: install the project with its cluster test dependencies "
                        "(ray[default], mlflow, moto[server])", pytrace=False)
    c = MultiNodeCluster(Path(data_root) / "MNIST" / "raw")
    c.start()
    print(f"\n[multinode] cluster up in {c.timings['setup_s']:.0f}s {c.timings} at {c.root} "
          f"(dashboard {c.dashboard_url}, mlflow {c.mlflow_uri}, s3 {c.s3_endpoint})", flush=True)
    try:
        yield c
    finally:
        c.stop()
        print(f"\n[multinode] cluster down in {c.timings['teardown_s']:.0f}s", flush=True)


def overrides(c: MultiNodeCluster, name: str, storage: str | None = "shared", **extra) -> list[str]:
    """The small settings of one test's job: its own run folder, storage subfolder and MLflow experiment."""
    kv = dict(SMALL)
    kv.update({
        "run.name": name,
        "run.output_dir": str(c.run_dir / name),
        "tracking.uri": c.mlflow_uri,
        "tracking.experiment": f"mn-{name}",
    })
    if storage == "shared":
        kv["ray.storage_path"] = str(c.shared_dir / name)
    elif storage:
        kv["ray.storage_path"] = storage
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def submission_id(logs: str) -> str:
    m = re.search(r"submitted (\S+):", logs)
    assert m, f"no submission id in submit.py's output:\n{tail(logs)}"
    return m.group(1)


def tail(logs: str, n: int = 60) -> str:
    return "\n".join(logs.splitlines()[-n:])


def assert_succeeded(rc: int, logs: str, what: str) -> None:
    assert rc == 0, f"{what}: submit.py exited {rc}; last lines of the job:\n{tail(logs)}"


def assert_on_both_nodes(c: MultiNodeCluster, logs: str, class_contains: str, what: str) -> None:
    """Actors of the job whose class name contains ``class_contains`` ran on the head and on node b."""
    everything = c.job_actors(submission_id(logs))
    nodes = {a["node_id"] for a in everything if class_contains in (a["class_name"] or "")}
    known = c.node_ids()
    assert known.get("b") in nodes and known.get("head") in nodes, (
        f"{what}: expected {class_contains} actors on both nodes {known}; the job's actors: "
        + json.dumps([(a["class_name"], (a["node_id"] or "never placed")[:12], a["state"]) for a in everything]))


def node_b_toolkit_files(c: MultiNodeCluster) -> dict[str, list[str]]:
    """What the toolkit left on node b's disk, by place (empty lists when clean)."""
    found = {
        "run folder": c.node_b_sees(c.run_dir),
        "mlflow store": c.node_b_sees(c.mlflow_dir),
        "data folder (besides MNIST)": [f for f in c.node_b_sees(c.data_dir) if not f.startswith("MNIST/raw/")],
        "its $TMPDIR": [f for f in c.node_b_sees(c.node_b_tmp) if _toolkit_like(f)],
    }
    ray_files = c.node_b_sees(c.ray_tmp)
    found["ray session_*/artifacts"] = [f for f in ray_files if re.match(r"session_[^/]+/artifacts/", f)]
    # node b's copy of the uploaded checkout: anything in it that the checkout lacks was written there
    # (e.g. a relative run.output_dir resolved in the job's working dir); bytecode caches aside
    found["ray working_dir copies"] = [
        f for f in ray_files
        if re.match(r"session_[^/]+/runtime_resources/working_dir_files/[^/]+/.", f)
        and "__pycache__" not in f and not (REPO / f.split("/", 4)[4]).exists()
    ]
    return {k: v for k, v in found.items() if v}


def assert_node_b_clean(c: MultiNodeCluster) -> None:
    left = node_b_toolkit_files(c)
    assert not left, f"the toolkit wrote on node b's own disk: {json.dumps(left, indent=1)[:3000]}"


def mlflow_runs(c: MultiNodeCluster, experiment: str) -> list:
    client = c.mlflow_client()
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"MLflow server has no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=1000)


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifact_files(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _stored_on_server(c: MultiNodeCluster, run, path: str) -> bool:
    """``path`` (as ``list_artifacts`` names it) is a file in the server's artifact store: the run's own
    artifacts, or those of a logged model of the run (listed as ``<model name>/<file>``)."""
    exp = c.artifacts_dir / run.info.experiment_id
    if (exp / run.info.run_id / "artifacts" / path).is_file():
        return True
    rest = path.split("/", 1)[-1]
    return (exp / "models").is_dir() and any((m / "artifacts" / rest).is_file() for m in (exp / "models").iterdir())


def assert_mlflow_complete(c: MultiNodeCluster, experiment: str, top_level: int = 1) -> list:
    """Every run of the experiment (nested included) finished on the server, with metrics; every artifact a run
    lists is in the server's own store (proxied, never a path on a node); top-level runs hold the model."""
    with c.mlflow_scope():
        return _assert_mlflow_complete(c, experiment, top_level)


def _assert_mlflow_complete(c: MultiNodeCluster, experiment: str, top_level: int) -> list:
    client = c.mlflow_client()
    runs = mlflow_runs(c, experiment)
    ids = {r.info.run_id for r in runs}
    tops = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(tops) == top_level, f"{experiment}: expected {top_level} top-level run(s), got {[r.info.run_name for r in tops]}"
    for r in runs:
        name = f"{experiment}/{r.info.run_name} ({r.info.run_id})"
        parent = r.data.tags.get("mlflow.parentRunId")
        assert parent is None or parent in ids, f"{name}: parent run {parent} is not on the server"
        stopped_early = r.data.tags.get("toolkit.tune.status") == "stopped_early"
        assert r.info.status == "FINISHED" or (stopped_early and r.info.status == "KILLED"), \
            f"{name}: status {r.info.status}"
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), \
            f"{name}: artifacts not proxied by the server: {r.info.artifact_uri}"
        files = _artifact_files(client, r.info.run_id)
        assert files or parent, f"{name}: no artifacts"
        missing = [f for f in files if not _stored_on_server(c, r, f)]
        assert not missing, f"{name}: artifacts listed but not in the server's store {c.artifacts_dir}: {missing}"
        assert r.data.metrics, f"{name}: no metrics"
    for r in tops:
        assert any(f.endswith((".pt", ".pth", ".pt2", "MLmodel")) for f in _artifact_files(client, r.info.run_id)), \
            f"{experiment}/{r.info.run_name}: no model artifact"
    return runs


def top_run(c: MultiNodeCluster, experiment: str):
    tops = [r for r in mlflow_runs(c, experiment) if "mlflow.parentRunId" not in r.data.tags]
    assert len(tops) == 1, f"{experiment}: {len(tops)} top-level runs"
    return tops[0]


class Job:
    """``cluster.submit`` in a background thread (to act on the cluster while the job runs)."""

    def __init__(self, c: MultiNodeCluster, args: list[str], timeout: float = JOB_TIMEOUT):
        self.result: tuple[int, str] | None = None
        self.error: BaseException | None = None
        self.log = c.job_log_path(args[0])

        def run():
            try:
                self.result = c.submit(args, timeout=timeout, log=self.log)
            except BaseException as e:  # noqa: BLE001 - reported by wait()
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def log_text(self) -> str:
        """What submit.py has printed so far (the job's log as it streams)."""
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> tuple[int, str]:
        self.thread.join(timeout)
        if self.error:
            raise self.error
        assert self.result is not None, "job still running"
        return self.result


# ------------------------------------------------------------------ the fixture itself


def test_cluster_fixture(cluster, tmp_path):
    """2 nodes / 2 CPUs; node b sees neither the run folder nor the head's data, but shared storage, its MNIST and S3."""
    c = cluster
    import urllib.error
    import urllib.request

    # token authentication is on: the Jobs API refuses a request without the token
    req = urllib.request.Request(f"{c.dashboard_url}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    req.add_header("Authorization", f"Bearer {c.token}")
    assert urllib.request.urlopen(req, timeout=10).status == 200

    (c.run_dir / "marker-run.txt").write_text("head only")
    (c.shared_dir / "marker-shared.txt").write_text("everyone")
    try:
        seen = c.ray_python(f"""
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            nodes = [n for n in ray.nodes() if n["Alive"]]
            b = [n["NodeID"] for n in nodes if "node_b" in n["Resources"]][0]

            @ray.remote(num_cpus=0.1)
            def probe(run_dir, shared_dir, bucket):
                import tempfile
                import pyarrow.fs as pafs
                raw = os.path.join(os.environ["TOOLKIT_DATA_DIR"], "MNIST", "raw")
                s3, path = pafs.FileSystem.from_uri(f"s3://{{bucket}}/probe")
                with s3.open_output_stream(path + "/from-node-b.txt") as out:
                    out.write(b"hi")
                return {{
                    "node": ray.get_runtime_context().get_node_id(),
                    "run_marker": os.path.exists(os.path.join(run_dir, "marker-run.txt")),
                    "shared_marker": os.path.exists(os.path.join(shared_dir, "marker-shared.txt")),
                    "data_dir": os.environ["TOOLKIT_DATA_DIR"],
                    "mnist": {{f: os.path.getsize(os.path.join(raw, f)) for f in sorted(os.listdir(raw))}},
                    "auth": os.environ.get("RAY_AUTH_MODE"),
                    "tmpdir": tempfile.gettempdir(),
                }}

            ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(b, soft=False)).remote(
                {str(c.run_dir)!r}, {str(c.shared_dir)!r}, {BUCKET!r})
            print(json.dumps({{"resources": ray.cluster_resources(), "alive": len(nodes), "b": b,
                              "probe": ray.get(ref, timeout=120)}}))
        """)
    finally:
        (c.run_dir / "marker-run.txt").unlink()
        (c.shared_dir / "marker-shared.txt").unlink()

    assert seen["alive"] == 2 and seen["resources"]["CPU"] == 2 and seen["resources"].get("node_b") == 1, seen
    assert seen["resources"].get("GPU", 0) == 0, seen
    probe = seen["probe"]
    assert probe["node"] == seen["b"] == c.node_ids()["b"]
    assert probe["run_marker"] is False, "node b sees the head's run folder"
    assert probe["shared_marker"] is True, "node b does not see the shared storage folder"
    assert probe["data_dir"] == str(c.data_dir)
    expected = {f: (c.mnist_raw / f).stat().st_size for f in MNIST_FILES}
    assert probe["mnist"] == expected, "node b lacks its own MNIST copy"
    assert probe["auth"] == "token"
    assert probe["tmpdir"] == str(c.node_b_tmp), "node b's workers do not use its own temp dir"
    assert c.node_b_sees(c.run_dir) == []
    # what node b hides is the fixture's own folders only: the checkout, the venv and the data stay visible
    for path in (REPO / "pyproject.toml", Path(sys.executable), c.mnist_raw / MNIST_FILES[0]):
        seen_by_b = c.node_b_run("test", "-e", str(path))
        assert seen_by_b.returncode == 0, f"node b does not see {path}: {seen_by_b.stderr}"
    assert sorted(c.node_b_sees(c.data_dir)) == sorted(f"MNIST/raw/{f}" for f in expected)
    assert c.raylet_pid("b") and c.raylet_pid("head")

    # the MLflow server and moto answer (node b's write through pyarrow reached moto)
    assert c.mlflow_client().search_experiments() is not None
    assert "probe/from-node-b.txt" in c.s3_keys("probe/")


# ------------------------------------------------------------------ the jobs of issue 8


@pytest.fixture(scope="module")
def pretrain_job(cluster):
    """SimCLR on 2 workers (one per node), shared storage: (rc, logs)."""
    return cluster.submit(["pretrain", *overrides(cluster, "pretrain")], timeout=JOB_TIMEOUT)


def test_pretrain_two_workers_one_per_node(cluster, pretrain_job):
    c = cluster
    rc, logs = pretrain_job
    assert_succeeded(rc, logs, "pretrain")
    assert_on_both_nodes(c, logs, "RayTrainWorker", "pretrain")
    assert list((c.shared_dir / "pretrain").rglob("checkpoint_*")), "no checkpoint in the shared storage path"
    assert_mlflow_complete(c, "mn-pretrain")
    assert_node_b_clean(c)


def test_pseudolabel_iterative_ray_data_on_both_nodes(cluster):
    c = cluster
    rc, logs = c.submit(["pseudolabel", *overrides(c, "pseudolabel", **{
        "pseudolabel.mode": "iterative", "inference.backend": "ray", "inference.actors": 2})],
        timeout=JOB_TIMEOUT)
    assert_succeeded(rc, logs, "pseudolabel (iterative, Ray Data actors)")
    assert_on_both_nodes(c, logs, "PoolPredictor", "Ray Data inference actors")
    runs = assert_mlflow_complete(c, "mn-pseudolabel")
    assert any(k.startswith("round/val_acc") for r in runs for k in r.data.metrics), "no round metrics on the server"
    assert_node_b_clean(c)


def test_pseudolabel_simclr_init(cluster, pretrain_job):
    c = cluster
    assert_succeeded(*pretrain_job, "pretrain (needed for the SimCLR init)")
    pretrain_run = top_run(c, "mn-pretrain").info.run_id
    rc, logs = c.submit(["pseudolabel", *overrides(c, "simclr-pl", **{
        "model.init": f"simclr:{pretrain_run}", "inference.backend": "ray"})], timeout=JOB_TIMEOUT)
    assert_succeeded(rc, logs, "pseudolabel model.init=simclr:<run id>")
    assert_on_both_nodes(c, logs, "RayTrainWorker", "SimCLR-initialised classifier training")
    assert_mlflow_complete(c, "mn-simclr-pl")
    assert_node_b_clean(c)


def _tune_trials(*roots: Path) -> list[dict]:
    """The result grid as Tune stored it: each trial's sampled config and last reported result."""
    trials = []
    for root in roots:
        for params in sorted(root.rglob("params.json")) if root.exists() else []:
            result = params.parent / "result.json"
            lines = [json.loads(ln) for ln in result.read_text().splitlines() if ln.strip()] if result.is_file() else []
            trials.append({"dir": str(params.parent), "config": json.loads(params.read_text()),
                           "last": lines[-1] if lines else {}})
        if trials:
            return trials
    return trials


def test_tune_two_trials_best_yaml_is_best_of_all(cluster, tmp_path):
    c = cluster
    space = tmp_path / "space.yaml"
    space.write_text("pseudolabel.threshold_start: {uniform: [0.9, 0.99]}\n"
                     "classifier.lr: {loguniform: [0.001, 0.01]}\n")
    rc, logs = c.submit(["tune", *overrides(c, "tune", **{
        "tune.space": str(space), "tune.num_samples": 2, "trials.max_concurrent": 2, "trials.cpus": 1,
        "tune.grace_rounds": 2})], timeout=JOB_TIMEOUT)
    assert_succeeded(rc, logs, "tune")
    assert_on_both_nodes(c, logs, "ImplicitFunc", "Tune trials (function trainables)")

    # the result grid (in ray.storage_path, or the run folder) and the trial runs on the server
    trials = _tune_trials(c.shared_dir / "tune", c.run_dir / "tune")
    assert len(trials) == 2, f"expected 2 trials in the result grid, got {[t['dir'] for t in trials]}"
    assert all(math.isfinite(float(t["last"].get("val_acc", "nan"))) for t in trials), \
        f"a trial reported no val_acc: {[t['last'] for t in trials]}"
    best = max(trials, key=lambda t: float(t["last"]["val_acc"]))

    runs = assert_mlflow_complete(c, "mn-tune")
    tune_run = top_run(c, "mn-tune")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]
    assert len(children) == 2, f"expected 2 nested trial runs, got {[r.info.run_name for r in children]}"
    client = c.mlflow_client()
    histories = {r.info.run_id: client.get_metric_history(r.info.run_id, "round/val_acc") for r in children}
    child_val = {k: max(h, key=lambda m: (m.step, m.timestamp)).value for k, h in histories.items() if h}
    assert len(child_val) == 2, "a trial run has no round/val_acc on the server"
    assert max(child_val.values()) == pytest.approx(float(best["last"]["val_acc"]), abs=1e-6)

    found = sorted((c.run_dir / "tune").rglob("best.yaml"))
    assert len(found) == 1, f"expected one best.yaml under {c.run_dir / 'tune'}, got {found}"
    text = found[0].read_text()
    header = re.search(r"val acc ([0-9.]+)", text)
    assert header and float(header.group(1)) == pytest.approx(float(best["last"]["val_acc"]), abs=1e-4), (
        f"best.yaml is not the best trial of the grid ({[t['last'].get('val_acc') for t in trials]}):\n{text}")
    from toolkit.config import load_config

    chosen = load_config(found[0]).flat()
    for key in ("pseudolabel.threshold_start", "classifier.lr"):
        assert chosen[key] == pytest.approx(float(best["config"][key]), rel=1e-6), \
            f"best.yaml {key}={chosen[key]}, best trial ran {best['config'][key]}"
    assert_node_b_clean(c)


def test_default_storage_on_multinode_cluster_stops_before_training(cluster):
    c = cluster
    t0 = time.perf_counter()
    rc, logs = c.submit(["pretrain", *overrides(c, "nostorage", storage=None)], timeout=600)
    seconds = time.perf_counter() - t0
    assert rc == 1, f"expected exit code 1, got {rc}:\n{tail(logs)}"
    lines = [ln for ln in logs.splitlines() if "ray.storage_path" in ln and "error" in ln.lower()]
    assert lines, f"no error line naming ray.storage_path:\n{tail(logs)}"
    assert "Traceback" not in logs, f"a traceback instead of one line:\n{tail(logs)}"
    assert not re.search(r"\[pretrain\] epoch \d+/", logs), "training started before the storage check"
    assert c.job_actors(submission_id(logs), "RayTrainWorker") == [], "Ray Train workers were started"
    assert not list((c.run_dir / "nostorage").rglob("checkpoint_*"))
    assert seconds < 300, f"took {seconds:.0f}s to refuse"


def test_s3_storage_path_pretrain(cluster):
    c = cluster
    rc, logs = c.submit(["pretrain", *overrides(c, "s3", storage=f"s3://{BUCKET}/toolkit")], timeout=JOB_TIMEOUT)
    assert_succeeded(rc, logs, "pretrain with ray.storage_path=s3://")
    keys = c.s3_keys("toolkit/")
    assert any("checkpoint_" in k for k in keys), f"no checkpoint in s3://{BUCKET}/toolkit: {keys[:20]}"
    assert_mlflow_complete(c, "mn-s3")
    assert_node_b_clean(c)


def test_node_loss_mid_pretraining(cluster):
    """Kill node b's raylet after a checkpoint: the job finishes from it, or fails in one line and resumes."""
    c = cluster
    epochs = 6
    args = ["pretrain", *overrides(c, "nodeloss", **{"pretrain.epochs": epochs})]
    job = Job(c, args)
    try:
        # epoch 2 reported: the checkpoint of epoch 1 is committed in storage (a checkpoint folder appears
        # while it uploads, before Ray Train has registered it)
        deadline = time.monotonic() + JOB_TIMEOUT
        while not re.search(rf"\[pretrain\] epoch 2/{epochs}", job.log_text()):
            assert not job.done(), f"job ended before its second epoch:\n{tail(job.wait()[1])}"
            assert time.monotonic() < deadline, "epoch 2 not reached within the job timeout"
            time.sleep(0.5)
        assert list((c.shared_dir / "nodeloss").rglob("checkpoint_*")), "no checkpoint in the shared storage path"
        c.kill_node_b_raylet()
        c.restart_node_b()  # capacity comes back, as an autoscaler would add a node
        rc, logs = job.wait(JOB_TIMEOUT + 60)
    finally:
        if "b" not in c.node_ids():
            c.restart_node_b()
    if rc != 0:
        assert "Traceback" not in logs, f"node loss: failed with a traceback, not one line:\n{tail(logs)}"
        rc, logs = c.submit(args, timeout=JOB_TIMEOUT)
        assert_succeeded(rc, logs, "re-submitted pretrain after node loss")
    assert re.search(r"resum", logs, re.I), f"did not resume from the last checkpoint:\n{tail(logs)}"
    assert len(re.findall(rf"\[pretrain\] epoch 1/{epochs}", logs)) <= 1, \
        f"epoch 1 trained again after the node loss (restarted from scratch):\n{tail(logs)}"
    assert re.search(rf"\[pretrain\] epoch {epochs}/{epochs}", logs), f"did not finish all epochs:\n{tail(logs)}"
    assert_mlflow_complete(c, "mn-nodeloss")
    assert_node_b_clean(c)


def test_two_nodes_give_the_figures_of_one_node(cluster, pretrain_job, data_root, tmp_path):
    """The same small SimCLR run, 2 workers on one machine's embedded Ray, matches the 2-node run.

    Same global batch, same seeds, same per-rank slices: only where the ranks run differs, so
    the losses agree up to float32 summation order in the all-reduce (relative 1e-3 is far below
    the ~0.1 a different effective batch or a lost gradient term would move them).
    """
    rc, logs = pretrain_job
    assert_succeeded(rc, logs, "pretrain")
    with cluster.mlflow_scope():
        (two,) = [r for r in mlflow_runs(cluster, "mn-pretrain") if "mlflow.parentRunId" not in r.data.tags]
        two_loss = {m.step: m.value for m in cluster.mlflow_client().get_metric_history(two.info.run_id, "loss")}
    db = tmp_path / "one.db"
    kv = dict(SMALL, **{"run.name": "one-node", "run.output_dir": str(tmp_path / "runs"), "run.data_root": data_root,
                        "tracking.uri": f"sqlite:///{db}", "tracking.log_models": False})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "MLFLOW_TRACKING"))}
    done = subprocess.run([str(VENV_BIN / "toolkit"), "pretrain", "--config", str(REPO / "launch" / "configs" / "cpu.yaml"),
                           *(f"{k}={v}" for k, v in kv.items())], env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("toolkit")
    (one,) = client.search_runs([exp.experiment_id])
    one_loss = {m.step: m.value for m in client.get_metric_history(one.info.run_id, "loss")}
    assert sorted(one_loss) == sorted(two_loss) == [1, 2]
    for step in one_loss:
        assert one_loss[step] == pytest.approx(two_loss[step], rel=1e-3), (step, one_loss, two_loss)


# ------------------------------------------------------------------ your own images on a cluster (issue 26)


def _write_digits_folder(root: Path, per_class: int) -> int:
    """scikit-learn's digits (real 8x8 scans) as labeled/<digit>/ (``per_class`` each) + unlabeled/; their count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    seen = {c: 0 for c in range(10)}
    for i, (image, label) in enumerate(zip(d.images, d.target)):
        label = int(label)
        part = f"labeled/{label}" if seen[label] < per_class else "unlabeled"
        seen[label] += 1
        (root / part).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype("uint8"), "L").save(root / part / f"{i:04d}.png")
    return len(d.images) - 10 * per_class


def test_a_folder_dataset_reaches_node_b_through_the_object_store(cluster):
    """A user's image folder lives on the head's disk alone; the classifier's Ray Train workers (one per node)
    and the Ray Data actors (both nodes) get its images through the object store, never by a path, and
    the run ends with every unlabeled image labeled."""
    c = cluster
    root = c.run_dir / "own-images"
    n_unlabeled = _write_digits_folder(root, per_class=5)
    assert c.node_b_sees(root) == [], "node b must not see the head's folder for this test to prove anything"
    rc, logs = c.submit(["pseudolabel", *overrides(c, "own-images", **{
        "data.name": "folder", "run.data_root": str(root), "data.image_size": 16, "split.labels_per_class": 5,
        "pseudolabel.mode": "iterative", "inference.backend": "ray", "inference.actors": 2})], timeout=JOB_TIMEOUT)
    assert_succeeded(rc, logs, "pseudolabel on a folder dataset")
    assert_on_both_nodes(c, logs, "RayTrainWorker", "classifier workers on a folder dataset")
    assert_on_both_nodes(c, logs, "PoolPredictor", "Ray Data actors on a folder dataset")
    runs = assert_mlflow_complete(c, "mn-own-images")
    assert any(r.data.tags.get("data.kind") == "real" for r in runs)
    # nothing read a pool label (none exists): no pseudo-label precision was computed
    assert not any(math.isfinite(v) for r in runs for k, v in r.data.metrics.items() if k.startswith("round/diagnostic"))
    assert "pool left" in logs and n_unlabeled > 0
    assert_node_b_clean(c)
