"""MLflow at the edge, made safe: quoted filter values, checked run ids, a fast reachability check, a locked sqlite creation."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from toolkit.config import Config, ConfigError
from toolkit.tracking.runs import RUN_KEY_TAG, check_run_id, filter_value, find_run, mlflow_run
from toolkit.tracking.stores import check_tracking_reachable, prepare_sqlite_store

SECRET = "s3cr3t-pw"


def _cfg(tmp_path, **over) -> Config:
    return Config().replace(**{"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "run.output_dir": str(tmp_path / "runs"),
                               **over})


# --- filter strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, literal", [
    ("plain-key", "'plain-key'"),
    ("it's", '"it\'s"'),
    ('say "hi"', "'say \"hi\"'"),
    ("x' or '1'='1", "\"x' or '1'='1\""),
])
def test_filter_value_quotes_with_the_quote_the_value_lacks(value, literal):
    assert filter_value(value) == literal


@pytest.mark.parametrize("value", ["both ' and \"", "back\\slash'", "line\nbreak", "trailing\\"])
def test_filter_value_refuses_what_cannot_be_quoted(value):
    with pytest.raises(ConfigError, match="cannot be used in an MLflow search"):
        filter_value(value)


@pytest.mark.parametrize("run_id", ["", "x' or '1'='1", "0" * 31, "g" * 32, "A" * 32, "0" * 33, None])
def test_check_run_id_refuses_anything_but_32_hex(run_id):
    with pytest.raises(ConfigError, match="not an MLflow run id"):
        check_run_id(run_id)
    assert check_run_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2


@pytest.mark.slow
def test_find_run_with_quotes_and_injection_in_the_key(tmp_path):
    cfg = _cfg(tmp_path)
    with mlflow_run(cfg.study, cfg.execution, "pretrain", "it's") as quoted:
        pass
    with mlflow_run(cfg.study, cfg.execution, "pretrain", "other") as other:
        pass
    assert find_run(cfg.execution, "it's").info.run_id == quoted.run_id
    assert find_run(cfg.execution, "other").info.run_id == other.run_id
    # an injected condition matches nothing (rather than every run, or a traceback)
    assert find_run(cfg.execution, "x' or '1'='1") is None
    assert find_run(cfg.execution, "x\" or \"1\"=\"1") is None
    with pytest.raises(ConfigError, match="not an MLflow run id"):
        find_run(cfg.execution, "other", parent_run_id="x' or '1'='1")
    runs = __import__("mlflow").tracking.MlflowClient(cfg.tracking.uri).search_runs(
        [quoted.run_id and find_run(cfg.execution, "other").info.experiment_id])
    assert {r.data.tags[RUN_KEY_TAG] for r in runs} == {"it's", "other"}


# --- reachability ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_server_is_one_line_at_once():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_tracking_reachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"tracking.uri='http://127.0.0.1:{port}' is not reachable: ")


def test_silent_server_times_out_in_one_line():
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="no answer within 1 s"):
            check_tracking_reachable(f"http://127.0.0.1:{port}", timeout_s=1)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("status", [200, 401, 404])
def test_any_http_answer_means_reachable(status):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_reachable(f"http://127.0.0.1:{server.server_address[1]}/", timeout_s=3)
    finally:
        server.shutdown()


def test_mlflow_run_checks_reachability_before_creating_anything(tmp_path):
    cfg = _cfg(tmp_path, **{"tracking.uri": f"http://127.0.0.1:{_free_port()}"})
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="is not reachable"):
        with mlflow_run(cfg.study, cfg.execution, "pretrain", "k"):
            pytest.fail("a run was opened on an unreachable server")
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("uri", [
    f"http://alice:{SECRET}@127.0.0.1:5000",
    f"https://{SECRET}@mlflow.example.com",
    f"postgresql://alice:{SECRET}@db/mlflow",
    f"https://mlflow.example.com/?token={SECRET}",
    f"https://mlflow.example.com/?page=1&sig={SECRET}",
    f"sqlite:////tmp/mlflow.db?X-Amz-Signature={SECRET}",
])
def test_uri_with_credentials_is_refused_without_echoing_them(uri, monkeypatch):
    with pytest.raises(ConfigError) as err:
        Config().replace(**{"tracking.uri": uri})
    assert SECRET not in str(err.value) and "is not allowed" in str(err.value)
    # the same URI from the environment is refused where MLflow is first used
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError) as err:
        check_tracking_reachable(uri)
    assert SECRET not in str(err.value) and "$MLFLOW_TRACKING_URI" in str(err.value)


def test_sqlite_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_tracking_reachable(f"sqlite:///{tmp_path}/nope/mlflow.db")


# --- the sqlite creation race --------------------------------------------------------------------

CREATE = textwrap.dedent("""
    import sys
    from toolkit.tracking.stores import prepare_sqlite_store
    from mlflow.tracking import MlflowClient
    print("ready", flush=True)
    sys.stdin.readline()  # both start together once both have imported MLflow
    prepare_sqlite_store(sys.argv[1])
    MlflowClient(sys.argv[1]).search_experiments()
    print("ok", flush=True)
""")


@pytest.mark.slow
def test_two_processes_creating_a_fresh_store_do_not_race(tmp_path):
    """Without the lock, two processes opening a fresh store at once fail in alembic's migration
    (``table _alembic_tmp_latest_metrics already exists``; reproduced on this machine in 3 of 3 tries)."""
    uri = f"sqlite:///{tmp_path}/race.db"
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    prepare_sqlite_store(uri)  # and the store is usable afterwards
    assert (tmp_path / "race.db.lock").exists()


# --- what a run records about its machine --------------------------------------------------------


def test_a_run_names_the_torch_and_the_cpu_kernels_it_ran_on(tmp_path):
    """The same seed gives other figures on another CPU's kernels: the run must say which it had."""
    import torch
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path)
    with mlflow_run(cfg.study, cfg.execution, "pretrain", "machine-tags") as tracker:
        run_id = tracker.run_id
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(run_id).data.tags
    assert tags["toolkit.torch"] == torch.__version__
    capability = torch.backends.cpu.get_cpu_capability()
    assert tags["toolkit.cpu"].endswith(f"({capability})") and len(tags["toolkit.cpu"]) > len(capability) + 3
    assert ("toolkit.gpu" in tags) == torch.cuda.is_available()
    assert "toolkit.classifiers" not in tags  # classifiers on Ray Train: the default


def test_a_run_says_when_its_classifiers_trained_in_process_and_only_then(tmp_path, monkeypatch):
    """run.classifiers_local acts on one machine: the tag follows it there, and a cluster address drops it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def tags_of(key: str, **over) -> dict:
        cfg = _cfg(tmp_path, **over)
        with mlflow_run(cfg.study, cfg.execution, "supervised", key) as tracker:
            run_id = tracker.run_id
        return MlflowClient(tracking_uri=cfg.tracking.uri).get_run(run_id).data.tags

    assert tags_of("one-machine", **{"run.classifiers_local": True})["toolkit.classifiers"] == "in-process"
    assert "toolkit.classifiers" not in tags_of("cluster", **{"run.classifiers_local": True,
                                                             "ray.address": "10.0.0.1:6379"})


def test_a_finished_run_is_reopened_when_only_the_execution_differs(tmp_path):
    """The study is the run's params; where it ran is tags: a re-run of the same study on another
    backend continues its run (its execution tags show the latest), a changed study gets a new one."""
    from mlflow.tracking import MlflowClient

    cfg = Config().replace(**{"run.output_dir": str(tmp_path / "runs"), "tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    with mlflow_run(cfg.study, cfg.execution, "supervised", "key-1") as first:
        pass
    elsewhere = cfg.execution.replace(**{"run.backend": "local", "run.threads": 1})
    with mlflow_run(cfg.study, elsewhere, "supervised", "key-1") as again:
        pass
    assert again.run_id == first.run_id
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(first.run_id)
    assert run.data.tags["execution.run.backend"] == "local" and run.data.tags["execution.run.threads"] == "1"
    assert not any(k.startswith(("run.", "ray.", "tracking.", "inference.", "trials.")) for k in run.data.params)
    assert run.data.params["split.seed"] == "0"
    other_study = cfg.study.replace(**{"classifier.steps": 7})
    with mlflow_run(other_study, elsewhere, "supervised", "key-1") as changed:
        pass
    assert changed.run_id != first.run_id
