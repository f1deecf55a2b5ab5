"""One redaction (``toolkit.redaction``) for every carrier: MLflow params and tags, config.yaml, a
checkpoint's stored config, the one error line of each command, the traceback, launch/submit.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from toolkit import cli
from toolkit.engine import checkpoints
from toolkit.config import Config, config_from_dict, uri_credentials_problem
from toolkit.redaction import holds_secret, is_secret_name, redact, redact_tree

SECRET = "s3cr3t-Vq7"
# a storage path with keys in it (pyarrow's s3://KEY:SECRET@bucket form) and a presigned-URL signature
STORAGE = f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs?X-Amz-Signature={SECRET}"
MASKED_STORAGE = "s3://***@bucket/runs?X-Amz-Signature=***"
REPO = Path(__file__).resolve().parents[1]


# --- the function -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, masked", [
    (f"s3://KEY:{SECRET}@bucket/p", "s3://***@bucket/p"),
    (f"s3://KEY:{SECRET}/with@slash@bucket/p", "s3://***@bucket/p"),  # an unencoded "/" or "@" in the secret
    (f"https://host/x?token={SECRET}&page=2", "https://host/x?token=***&page=2"),
    (f"https://acct.blob.core.windows.net/c?sv=2024&sig={SECRET}&se=1", "https://acct.blob.core.windows.net/c?sv=2024&sig=***&se=1"),
    (f"https://b.s3.amazonaws.com/k?X-Amz-Credential={SECRET}%2F2024&X-Amz-Signature={SECRET}",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    (f"http://h/?access_token={SECRET};password={SECRET}#frag", "http://h/?access_token=***;password=***#frag"),
    (f"uri='http://h/?api_key={SECRET}' is refused", "uri='http://h/?api_key=***' is refused"),
    (f"carries credentials (http://h/?token={SECRET}); refusing", "carries credentials (http://h/?token=***); refusing"),
    (f"two: s3://a:{SECRET}@b and http://u:{SECRET}@h", "two: s3://***@b and http://***@h"),
])
def test_redact_masks_user_parts_and_secret_query_values(text, masked):
    assert redact(text) == masked
    assert redact(masked) == masked and not holds_secret(masked)  # idempotent: masking twice changes nothing


@pytest.mark.parametrize("text", [
    "s3://bucket/runs", "/data/runs@2024", "models:/toolkit-mnist-classifier@best", "runs:/0123/model",
    "file:///a/b.db?mode=ro", "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning",
])
def test_redact_leaves_what_holds_no_secret(text):
    assert redact(text) == text and not holds_secret(text)


def test_one_list_decides_names_query_parameters_and_refused_uris():
    assert all(is_secret_name(n) for n in ("api_key", "DB_PASSWORD", "X-Amz-Security-Token", "sig"))
    assert not is_secret_name("ray.storage_path") and not is_secret_name("tracking.uri")
    # the tracking URI refusal reads the same list: a signature in the query is refused too
    assert uri_credentials_problem(f"https://mlflow.example.com/?sig={SECRET}")
    assert uri_credentials_problem("https://mlflow.example.com/?page=2") is None
    assert uri_credentials_problem("postgresql://alice@db/mlflow") is None  # a user alone: ~/.pgpass holds the password


def test_redact_tree_masks_strings_and_keeps_everything_else():
    weights = torch.ones(3)
    tree = {"config": {"ray": {"storage_path": STORAGE}}, "state_dict": {"w": weights}, "pool": [1, 2], "t": ("a", 1)}
    out = redact_tree(tree)
    assert out["config"]["ray"]["storage_path"] == MASKED_STORAGE
    assert out["state_dict"]["w"] is weights and out["pool"] == [1, 2] and out["t"] == ("a", 1)
    assert tree["config"]["ray"]["storage_path"] == STORAGE  # a copy: the caller's payload keeps the real value


# --- stored and logged ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store for this module's runs (creating one costs seconds)."""
    return tmp_path_factory.mktemp("store")


def _secret_cfg(store: Path, tmp_path: Path, **over) -> Config:
    return Config().replace(**{"tracking.uri": f"sqlite:///{store}/mlflow.db", "run.output_dir": str(tmp_path / "runs"),
                               "ray.storage_path": STORAGE, **over})


def test_mlflow_params_tags_and_dicts_of_a_real_run_are_masked(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from toolkit.tracking.runs import mlflow_run

    cfg = _secret_cfg(store, tmp_path, **{"student.encoder": f"s3://k:{SECRET}@b/enc.pt"})
    with mlflow_run(cfg.study, cfg.execution, "pretrain", "masked",
                    extra_tags={"toolkit.source": f"https://h/x?token={SECRET}"}) as tracker:
        tracker.log_params({"api_key": "plain-looking-value", "student.encoder_file": f"s3://k:{SECRET}@b/enc.pt",
                            "student.teacher_files": f"https://h/t.pt?sig={SECRET}"})
        tracker.log_dict({"where": STORAGE}, "where.json")
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    data = client.get_run(run_id).data
    # the execution is the run's tags (execution.<key>), the study its params: both masked, still readable
    assert data.tags["execution.ray.storage_path"] == MASKED_STORAGE and "ray.storage_path" not in data.params
    assert data.params["student.encoder"] == "s3://***@b/enc.pt"
    assert data.params["api_key"] == "***" and data.params["student.encoder_file"] == "s3://***@b/enc.pt"
    assert data.params["student.teacher_files"] == "https://h/t.pt?sig=***"
    assert data.tags["toolkit.source"] == "https://h/x?token=***"
    logged = json.loads(Path(client.download_artifacts(run_id, "where.json", str(tmp_path))).read_text())
    assert logged == {"where": MASKED_STORAGE}
    assert SECRET.encode() not in (store / "mlflow.db").read_bytes()


def test_config_yaml_in_the_run_folder_is_masked_and_still_a_config(store, tmp_path):
    from toolkit.datasets.mnist import make_split
    from toolkit.stages.skeleton import StageRun, log_config_and_split
    from toolkit.tracking.runs import mlflow_run

    cfg = _secret_cfg(store, tmp_path)
    folder = tmp_path / "runs" / "stages" / "k"
    folder.mkdir(parents=True)
    split = make_split(torch.arange(10).repeat(30), 2, 20, 0)
    with mlflow_run(cfg.study, cfg.execution, "supervised", "config-yaml") as tracker:
        # the data are not read by log_config_and_split: the run's folder and split are what it writes
        log_config_and_split(tracker, StageRun(cfg.study, cfg.execution, "k", folder, tracker, None, split))
    text = (folder / "config.yaml").read_text()
    assert SECRET not in text and MASKED_STORAGE in text
    assert config_from_dict(yaml.safe_load(text)).ray.storage_path == MASKED_STORAGE  # still a loadable config
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(cfg.tracking.uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert SECRET not in Path(logged).read_text()


def test_a_checkpoints_stored_config_is_masked_and_gives_the_model_back(tmp_path):
    """A model file stores the study (never the execution: no ``ray.storage_path`` in it), read back for the
    model's architecture only (``model_config_of``); a study string with a credential (``student.encoder``)
    is stored masked, and a resumed command takes its inputs from its own config, so the masked copy loses nothing."""
    encoder = f"s3://k:{SECRET}@b/enc.pt"
    cfg = _secret_cfg(tmp_path, tmp_path, **{"model.width": 8, "student.encoder": encoder})
    payload = checkpoints.model_payload("classifier", cfg.study.to_dict(), {"w": torch.ones(2)}, step=3)
    path = checkpoints.save(tmp_path / "model.pt", payload)
    assert payload["config"]["student"]["encoder"] == encoder  # the caller's payload is untouched
    assert "ray" not in payload["config"] and "run" not in payload["config"]  # the study only
    raw = path.read_bytes()
    assert SECRET.encode() not in raw
    back = checkpoints.load(path)
    assert back["config"]["student"]["encoder"] == "s3://***@b/enc.pt"
    assert checkpoints.model_config_of(back) == cfg.model and torch.equal(back["state_dict"]["w"], torch.ones(2))
    # a pseudo-labeling round state (its own config under another key) goes through the same writer
    state = checkpoints.save(tmp_path / "state.pt",
                             {"kind": "state", "state_dict": {}, "model_config": cfg.study.to_dict()})
    assert SECRET.encode() not in state.read_bytes()


# --- what the commands print ------------------------------------------------------------------


@pytest.mark.parametrize("command, args", [
    ("pretrain", ["--backend", "local"]),
    ("report", []),
    ("predict", ["predict.model=0123456789abcdef0123456789abcdef", "predict.input={npy}"]),
])
@pytest.mark.parametrize("uri", [
    f"sqlite:///{{tmp}}/mlflow.db?token={SECRET}",
    f"http://alice:{SECRET}@127.0.0.1:9/",
])
def test_a_secret_in_mlflow_tracking_uri_is_refused_in_one_masked_line(command, args, uri, tmp_path, data_root, capsys,
                                                                       monkeypatch):
    """``predict`` and ``report`` used to print the raw URI in their error (or retry an unreachable server for minutes)."""
    npy = tmp_path / "x.npy"
    __import__("numpy").save(npy, __import__("numpy").zeros((2, 28, 28), "uint8"))
    (tmp_path / "mlflow.db").touch()  # a store that is there: without the refusal, MLflow would open it and quote the URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    monkeypatch.setenv("TOOLKIT_DATA_DIR", data_root)
    capsys.readouterr()
    rc = cli.main([command, *[a.format(npy=npy) for a in args], f"run.output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert SECRET not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"toolkit {command}: error: tracking.uri=") and "(from $MLFLOW_TRACKING_URI) is not allowed" in err
    assert (tmp_path / "mlflow.db").stat().st_size == 0 and not (tmp_path / "runs").exists()  # nothing opened or made


def test_the_toolkit_traceback_is_masked(tmp_path, capsys, monkeypatch):
    def command(study, execution):
        raise OSError(f"cannot reach https://bob:{SECRET}@host/api?sig={SECRET}")

    monkeypatch.setattr(cli, "_dispatch", lambda name: command)
    monkeypatch.setenv("TOOLKIT_TRACEBACK", "1")
    rc = cli.main(["pretrain", "--backend", "local", f"run.output_dir={tmp_path}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and "https://***@host/api?sig=***" in err, err
    assert SECRET not in err


BUG = textwrap.dedent("""
    import sys
    from toolkit import cli

    def command(study, execution):
        raise RuntimeError("a bug near " + sys.argv[1])

    cli._dispatch = lambda name: command
    sys.exit(cli.main(["pretrain", "--backend", "local", "run.output_dir=" + sys.argv[2], "tracking.enabled=false"]))
""")


def test_a_bugs_traceback_leaving_the_cli_is_masked(tmp_path, data_root):
    """An unexpected exception keeps its traceback (exit 1), printed by Python after ``main``: masked too."""
    out = subprocess.run([sys.executable, "-c", BUG, STORAGE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TOOLKIT_DATA_DIR": data_root})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback (most recent call last)" in out.stderr and f"RuntimeError: a bug near {MASKED_STORAGE}" in out.stderr
    assert SECRET not in out.stderr + out.stdout


# --- launch/submit.py -------------------------------------------------------------------------


def _submit(argv: list[str], capsys) -> tuple[int, str]:
    from launch import submit

    try:
        rc = submit.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("env, override", [
    ({"MLFLOW_TRACKING_URI": f"https://mlflow.example.com/?token={SECRET}"}, []),
    ({"TOOLKIT_OUTPUT_ROOT": f"s3://k:{SECRET}@bucket/out"}, []),
    ({}, [f"ray.storage_path={STORAGE}"]),
])
def test_submit_refuses_credentials_for_the_job_and_prints_them_masked(env, override, capsys, monkeypatch):
    """The job's runtime_env and entrypoint are stored by the cluster and shown in its dashboard."""
    for k in ("MLFLOW_TRACKING_URI", "TOOLKIT_OUTPUT_ROOT", "TOOLKIT_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, printed = _submit(["--profile", "cpu", "--dry-run", "--", "pretrain", *override], capsys)
    assert rc == 2 and "carries credentials" in printed and "***" in printed, printed
    assert SECRET not in printed


def test_submit_masks_the_address_in_its_error(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, printed = _submit(["--address", f"http://admin:{SECRET}@127.0.0.1:9", "--profile", "cpu", "--", "pretrain"],
                          capsys)
    assert rc == 1 and "cannot submit to http://***@127.0.0.1:9" in printed, printed
    assert SECRET not in printed
