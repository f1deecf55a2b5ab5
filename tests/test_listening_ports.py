"""What listens while a command runs: the embedded Ray keeps Ray's token authentication on.

Ray's GCS, raylet and workers listen on the machine's address, not only on 127.0.0.1
(Ray 2.60 registers the machine's own address). What protects them is the session's
token: a client without it is refused. The test starts the embedded Ray exactly as every
command does (``backends.init_ray``), lists the listening sockets of its processes, and
connects to its GCS as an outsider would: from another home folder, without the token.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

SERVER = """
import sys, time
from toolkit.backends import init_ray
from toolkit.config import Config
init_ray(Config())
import ray
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(300)
"""

OUTSIDER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", ray.cluster_resources(), flush=True)
"""


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state owned by ``pids``."""
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, c.pid))
    return out


def test_the_embedded_ray_refuses_a_client_without_its_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        gcs = ""
        while not gcs:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the embedded Ray did not start"
            for line in (tmp_path / "server.log").read_text().splitlines():
                if line.startswith("GCS "):
                    gcs = line.split()[1]
            time.sleep(0.5)
        tree = {server.pid} | {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
        sockets = _listening(tree)
        assert sockets, "no listening socket found for the embedded Ray"
        public = [(a, p) for a, p, _ in sockets if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
        print(f"listening: {len(sockets)} sockets, {len(public)} on a non-loopback address")
        # the GCS is one of them, on the address the outsider below is given
        assert any(f"{a}:{p}" == gcs or (p == int(gcs.rsplit(":", 1)[1])) for a, p, _ in sockets), (gcs, sockets)

        # an outsider: another home (no ~/.ray/auth_token), no token in the environment
        home = tmp_path / "outsider"
        home.mkdir()
        outsider_env = {**env, "HOME": str(home)}
        outsider_env.pop("RAY_AUTH_TOKEN", None)
        outsider_env.pop("RAY_AUTH_TOKEN_PATH", None)
        tried = subprocess.run([sys.executable, "-c", OUTSIDER, gcs], env=outsider_env, capture_output=True,
                               text=True, timeout=180)
        assert tried.returncode != 0 and "CONNECTED" not in tried.stdout, tried.stdout[-2000:]
        said = (tried.stdout + tried.stderr).lower()
        assert "token" in said or "auth" in said, said[-2000:]
    finally:
        os.killpg(server.pid, 9)  # the command and the Ray it started (one session)
        server.wait()
        log.close()
