"""The embedded Ray's token: on whatever Ray pyproject allows, private on disk, and what admits a client.

Ray turns token authentication on for a new local cluster only from 2.59; the toolkit relies
on that default (``backends.init_ray`` sets no mode), so pyproject's lower bound must be 2.59.
Ray writes its token file with the umask's mode (0644): ``toolkit.execution.embedded_ray`` creates it
0600 first. The integration test starts the embedded Ray as every command does, in a fresh
home folder, and connects to its GCS three times: without a token and with a wrong one (both
refused), then with the token file (admitted: the refusals are the token's doing).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from toolkit.execution import embedded_ray

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENVS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def test_pyproject_allows_only_rays_that_turn_token_auth_on_for_a_local_cluster():
    (ray_req,) = [Requirement(r) for r in re.findall(r'"(ray\[[^"]*)"', (REPO / "pyproject.toml").read_text())]
    assert not ray_req.specifier.contains("2.58.0"), ray_req  # local clusters without a token
    assert ray_req.specifier.contains("2.60.0"), ray_req


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder of its own, with no token in the environment."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_token_file_is_private_from_its_first_byte(home):
    old = os.umask(0o022)  # the common umask, under which Ray's own file is 0644
    try:
        path = embedded_ray.ensure_private_token()
    finally:
        os.umask(old)
    assert path == home / ".ray" / "auth_token"
    assert _mode(path) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 32 random bytes in hex, as Ray generates
    assert embedded_ray.ensure_private_token() == path and path.read_text() == token  # kept, not replaced


def test_a_token_file_left_readable_by_others_is_made_private_and_kept(home):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("a" * 64)
    path.chmod(0o644)
    embedded_ray.ensure_private_token()
    assert _mode(path) == 0o600 and path.read_text() == "a" * 64


def test_a_token_the_user_gives_is_left_alone(home, monkeypatch):
    theirs = home / "my_token"
    theirs.write_text("b" * 64)
    theirs.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(theirs))
    assert embedded_ray.ensure_private_token() is None
    assert _mode(theirs) == 0o640 and not (home / ".ray").exists()


SERVER = """
import time
from toolkit.execution.backends import init_ray
from toolkit.config import Config
init_ray(Config().execution)
import ray
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(300)
"""

CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", ray.cluster_resources().get("CPU"), flush=True)
"""


@pytest.mark.slow
def test_the_embedded_ray_admits_only_clients_holding_its_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENVS}
    server_home = tmp_path / "server"
    server_home.mkdir()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-c", SERVER], env={**env, "HOME": str(server_home)},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        gcs = ""
        while not gcs:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the embedded Ray did not start"
            gcs = next((ln.split()[1] for ln in log_path.read_text().splitlines() if ln.startswith("GCS ")), "")
            time.sleep(0.5)
        token = server_home / ".ray" / "auth_token"
        assert _mode(token) == 0o600, oct(_mode(token))

        def connect(home: Path, **extra: str) -> subprocess.CompletedProcess:
            home.mkdir(exist_ok=True)
            # a client turns an address 127.0.0.1:port into the machine's network address (where the
            # embedded Ray does not listen) unless, like the embedded Ray, it takes loopback as its own
            extra["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            return subprocess.run([sys.executable, "-c", CLIENT, gcs], env={**env, "HOME": str(home), **extra},
                                  capture_output=True, text=True, timeout=180)

        # an outsider: another home (no ~/.ray/auth_token), no token in the environment
        for what, tried in (("no token", connect(tmp_path / "outsider")),
                            ("a wrong token", connect(tmp_path / "guesser", RAY_AUTH_MODE="token",
                                                      RAY_AUTH_TOKEN="0" * 64))):
            said = tried.stdout + tried.stderr
            assert tried.returncode != 0 and "CONNECTED" not in tried.stdout, (what, said[-2000:])
            assert "Unauthenticated" in said, (what, said[-2000:])  # the GCS said no, not a network error
        # the same client with the server's token file (RAY_AUTH_MODE: an explicit address never turns it on)
        insider = connect(tmp_path / "insider", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        assert insider.returncode == 0 and "CONNECTED" in insider.stdout, (insider.stdout + insider.stderr)[-2000:]
    finally:
        os.killpg(server.pid, 9)  # the server and the Ray it started (one session)
        server.wait()
