"""The cluster file and the job submitter, checked offline (no AWS, no cluster).

``ray_cluster.yaml`` goes through Ray's own ``prepare_config`` (merge with the
AWS defaults, fill per-type worker bounds) and ``validate_config`` (jsonschema
against ``ray/autoscaler/ray-schema.json`` plus Ray's consistency checks), as
Ray's ``python/ray/tests/test_autoscaler_yaml.py`` does. Neither touches the
network: the AWS-specific bootstrap (IAM, subnets, AMI) that does is left to
``ray up``. ``launch/submit.py`` is checked through its pure ``build_job_spec``
and its CLI in ``--dry-run`` mode.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from launch import submit
from launch.submit import SubmitError, build_job_spec

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "ray_cluster.yaml"


# --------------------------------------------------------------------------
# (a) ray_cluster.yaml
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_cluster() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


@pytest.fixture(scope="module")
def cluster(raw_cluster) -> dict:
    """The config as `ray up` sees it after Ray's own preparation and validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw_cluster))
    validate_config(prepared)
    return prepared


def _head_and_workers(cfg: dict) -> tuple[dict, dict]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    return head, workers


def test_cluster_file_passes_rays_schema(cluster, raw_cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"]
    # The file itself must already be complete and strict, not only after
    # Ray merged in its defaults: validate the raw dict against the schema too.
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw_cluster, schema)


def test_validation_is_strict(raw_cluster):
    """A misspelt key is rejected, so the schema test above can fail."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw_cluster)
    bad["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_head_is_cpu_only_and_workers_have_gpus(cluster, raw_cluster):
    head, workers = _head_and_workers(raw_cluster)  # resources as written, not filled in
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type declares GPU >= 1"
    for name, node in gpu_types.items():
        assert node["resources"].get("CPU", 0) >= 1, name
        assert node["node_config"].get("InstanceType"), name

    # Autoscaling bounds as Ray resolves them.
    _, prepared_workers = _head_and_workers(cluster)
    for name, node in prepared_workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cluster["max_workers"], name
    assert cluster["idle_timeout_minutes"] > 0


def test_dashboard_binds_to_loopback(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["worker_start_ray_commands"])
    assert "0.0.0.0" not in CLUSTER_FILE.read_text()


def test_setup_installs_this_package_on_every_node(cluster, raw_cluster):
    # The repo is synced to ~/toolkit from the directory `ray up` runs in.
    # the code, and the one Ray auth token every node shares (never a file of the repository)
    assert raw_cluster["file_mounts"] == {"~/toolkit": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert any("RAY_AUTH_MODE=token" in c for c in raw_cluster["setup_commands"])
    assert "**/.git" in raw_cluster["rsync_exclude"]
    assert not raw_cluster.get("docker")
    # prepare_config merges setup_commands into both head and worker setup.
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = "\n".join(cluster[key])
        assert "pip install -e ~/toolkit" in cmds, key
    # The autoscaler on the head needs boto3 to launch EC2 workers.
    assert any("boto3" in c for c in cluster["head_setup_commands"])


def test_cluster_ray_matches_local_ray(raw_cluster):
    """`ray up` and the Jobs client run the local Ray; the nodes must run the same one."""
    import ray

    pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", "\n".join(raw_cluster["setup_commands"]))
    assert pins, "setup_commands do not pin the Ray version"
    assert set(pins) == {ray.__version__}, (
        f"ray_cluster.yaml pins Ray {pins}, this machine runs {ray.__version__}: update the pin")


# --------------------------------------------------------------------------
# (b) launch/submit.py
# --------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path) -> Path:
    """A stand-in checkout with a gpu profile, local state and a .git folder."""
    (tmp_path / "launch" / "configs").mkdir(parents=True)
    (tmp_path / "launch" / "configs" / "gpu.yaml").write_text(
        "ray:\n  use_gpu: true\n  num_workers: 2\n")
    (tmp_path / "toolkit").mkdir()
    (tmp_path / "toolkit" / "__init__.py").write_text("")
    (tmp_path / "toolkit" / "data.py").write_text("")
    for junk in (".git/HEAD", "runs/x/ckpt.bin", "outputs/a.txt", "data/MNIST/raw/t10k",
                 ".venv/bin/python", "venv/bin/python", "mlflow.db"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("x")
    return tmp_path


ALL_ENV = {
    "TOOLKIT_DATA_DIR": "/home/ubuntu/data",
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    "AWS_SECRET_ACCESS_KEY": "do-not-ship",
    "HF_TOKEN": "do-not-ship",
    "HOME": "/home/me",
    "PATH": "/usr/bin",
}


def test_job_spec_entrypoint(repo):
    spec = build_job_spec("gpu", ["pretrain", "ray.num_workers=4"], {}, working_dir=repo)
    assert "toolkit pretrain --config launch/configs/gpu.yaml ray.num_workers=4" in spec["entrypoint"]
    assert shlex.split(spec["entrypoint"]) == [
        "toolkit", "pretrain", "--config", "launch/configs/gpu.yaml", "ray.num_workers=4"]
    # Values with spaces survive the shell the job runs the entrypoint in.
    spec = build_job_spec("gpu", ["report", "tracking.experiment=my study"], {}, working_dir=repo)
    assert shlex.split(spec["entrypoint"])[-1] == "tracking.experiment=my study"


def test_job_spec_working_dir_excludes_local_state(repo):
    """Pack the working dir with Ray's own zipper and our excludes: code in, state out."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _zip_files

    env = build_job_spec("gpu", ["pretrain"], {}, working_dir=repo)["runtime_env"]
    assert Path(env["working_dir"]) == repo.resolve()
    assert ".git" in env["excludes"]

    out = repo.parent / "pkg.zip"
    _zip_files(env["working_dir"], ray_constants.get_runtime_env_default_excludes() + env["excludes"],
               str(out), include_gitignore=True)
    files = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    assert files == {"launch/configs/gpu.yaml", "toolkit/__init__.py", "toolkit/data.py"}


def test_job_spec_passes_only_whitelisted_env(repo):
    env_vars = build_job_spec("gpu", ["pretrain"], ALL_ENV, working_dir=repo)["runtime_env"]["env_vars"]
    assert env_vars == {"TOOLKIT_DATA_DIR": "/home/ubuntu/data",
                        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    # Unset or empty: nothing is forwarded.
    assert build_job_spec("gpu", ["pretrain"], {"TOOLKIT_DATA_DIR": "", "HOME": "/x"},
                          working_dir=repo)["runtime_env"]["env_vars"] == {}


def test_job_spec_refuses_credentials_in_tracking_uri(repo):
    with pytest.raises(SubmitError, match="credentials"):
        build_job_spec("gpu", ["pretrain"], {"MLFLOW_TRACKING_URI": "https://me:s3cret@mlflow.example.com"},
                       working_dir=repo)


@pytest.mark.parametrize("args, message", [
    (["pretrian"], "unknown toolkit command"),
    ([], "no toolkit command"),
    (["pretrain", "epochs"], "expected key=value"),
    (["pretrain", "--config", "x.yaml"], "--config comes from --profile"),
])
def test_job_spec_rejects_bad_commands(repo, args, message):
    with pytest.raises(SubmitError, match=message):
        build_job_spec("gpu", args, {}, working_dir=repo)


def test_commands_match_the_toolkit_cli():
    cli = pytest.importorskip("toolkit.cli")
    assert submit.COMMANDS == tuple(cli.COMMANDS)


def test_job_spec_checks_keys_locally(repo):
    """A misspelt key fails before anything is uploaded (via toolkit.config)."""
    pytest.importorskip("toolkit.config")
    with pytest.raises(SubmitError, match="ray.num_worker"):
        build_job_spec("gpu", ["pretrain", "ray.num_worker=4"], {}, working_dir=repo)


def test_unknown_profile_exits_2(repo, capsys):
    with pytest.raises(SystemExit) as exc:
        submit.main(["--profile", "nope", "--dry-run", "--working-dir", str(repo), "--", "pretrain"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown profile 'nope'" in err and "gpu" in err
    # Not a path escape either.
    with pytest.raises(SystemExit) as exc:
        submit.main(["--profile", "../configs/gpu", "--dry-run", "--working-dir", str(repo), "--", "pretrain"])
    assert exc.value.code == 2


def test_unknown_profile_exits_2_with_repo_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        submit.main(["--profile", "no-such-profile", "--dry-run", "--", "pretrain"])
    assert exc.value.code == 2
    assert "unknown profile" in capsys.readouterr().err


def test_dry_run_prints_the_job(repo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    monkeypatch.delenv("TOOLKIT_DATA_DIR", raising=False)
    code = submit.main(["--address", "http://127.0.0.1:8265", "--profile", "gpu", "--dry-run",
                        "--working-dir", str(repo), "--", "pretrain", "ray.num_workers=4"])
    assert code == 0
    out = capsys.readouterr().out
    spec = json.loads(out)
    assert spec["entrypoint"] == "toolkit pretrain --config launch/configs/gpu.yaml ray.num_workers=4"
    assert spec["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert "do-not-ship" not in out


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "launch" / "configs").glob("*.yaml")))
def test_repo_profiles_build(profile):
    """Every committed profile turns into a job with the repo defaults."""
    spec = build_job_spec(profile, ["pretrain", "ray.num_workers=4"], {})
    assert spec["entrypoint"] == f"toolkit pretrain --config launch/configs/{profile}.yaml ray.num_workers=4"
    assert Path(spec["runtime_env"]["working_dir"]) == REPO


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_follow_tails_logs_and_exits_with_the_jobs_status(repo, capsys, monkeypatch, final, code):
    """Submission and --follow against a stand-in for Ray's JobSubmissionClient."""
    import ray.job_submission
    from ray.job_submission import JobStatus

    calls = {}

    class FakeClient:
        def __init__(self, address):
            calls["address"] = address
            self.polls = 0

        def submit_job(self, **kwargs):
            calls["spec"] = kwargs
            return "raysubmit_test"

        async def tail_job_logs(self, job_id):
            # The stream may close before the job is terminal (dropped tunnel).
            for line in ("epoch 1\n", "epoch 2\n"):
                yield line

        def get_job_status(self, job_id):
            self.polls += 1
            return JobStatus.RUNNING if self.polls < 3 else JobStatus(final)

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    monkeypatch.delenv("TOOLKIT_DATA_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    rc = submit.main(["--address", "http://127.0.0.1:8265", "--profile", "gpu", "--follow",
                      "--working-dir", str(repo), "--", "pretrain", "ray.num_workers=4"])
    assert rc == code
    assert calls["address"] == "http://127.0.0.1:8265"
    assert calls["spec"] == build_job_spec("gpu", ["pretrain", "ray.num_workers=4"], {}, working_dir=repo)
    captured = capsys.readouterr()
    assert "epoch 1\nepoch 2\n" in captured.out
    assert f"raysubmit_test {final}" in captured.err
