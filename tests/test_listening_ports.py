"""What listens while a command runs: the embedded Ray listens on 127.0.0.1 only.

Ray binds its GCS, raylet, object manager, workers and agents to the node's address, and the
Prometheus metrics of its autoscaler monitor, dashboard process and dashboard agent to
0.0.0.0 (no token on those). The embedded Ray takes 127.0.0.1 as its node address
(``toolkit.execution.embedded_ray``), so nothing of it is reachable from another machine; what protects
it from other local users is the token (tests/test_ray_auth.py). The test starts the embedded
Ray exactly as every command does (``backends.init_ray``) and lists the listening sockets of
its processes.
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
from toolkit.execution.backends import init_ray
from toolkit.config import Config
init_ray(Config().execution)
import ray
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(300)
"""

# the processes that serve Prometheus metrics without a token (Ray's default metrics export)
METRICS_SERVERS = ("monitor.py", "dashboard.py", "DashboardAgent")


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process command line) of every TCP socket in LISTEN state owned by ``pids``."""
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                who = " ".join(" ".join(psutil.Process(c.pid).cmdline()).split())[:160]
            except psutil.Error:
                who = f"pid {c.pid}"
            out.append((c.laddr.ip, c.laddr.port, who))
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's gRPC servers show it
    return (mapped or ip).is_loopback


def test_the_embedded_ray_listens_on_loopback_only(tmp_path):
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
        # the monitor and the dashboard open their metrics port a few seconds after ray.init returns
        # (not at all when another Ray on this machine holds its fixed port: then wait out the 60 s)
        deadline = time.monotonic() + 60
        while True:
            tree = {server.pid} | {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
            sockets = _listening(tree)
            serving = {name for name in METRICS_SERVERS for *_, who in sockets if name in who}
            if serving == set(METRICS_SERVERS) or time.monotonic() > deadline:
                break
            time.sleep(1)
        print(f"listening: {len(sockets)} sockets; metrics servers seen: {sorted(serving)}")
        assert any(p == int(gcs.rsplit(":", 1)[1]) for _, p, _ in sockets), (gcs, sockets)
        assert "DashboardAgent" in serving, sockets  # the agent is up: its ports are in the list
        public = [(a, p, who) for a, p, who in sockets if not _is_loopback(a)]
        assert not public, "reachable from other machines:\n" + "\n".join(f"{a}:{p}  {who}" for a, p, who in public)
        assert _is_loopback(gcs.rsplit(":", 1)[0].strip("[]")), gcs
    finally:
        os.killpg(server.pid, 9)  # the command and the Ray it started (one session)
        server.wait()
        log.close()
