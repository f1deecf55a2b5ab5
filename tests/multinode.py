"""A 2-node Ray cluster on one machine whose second node has its own filesystem view.

``MultiNodeCluster`` stands up, on 127.0.0.1 and free ports picked at runtime:

* the head node: ``ray start --head --block`` in its own mount namespace, 1 CPU, no GPU,
  dashboard / Jobs API on 127.0.0.1, its own ``--temp-dir`` (``<root>/ray``);
* node b: ``ray start --address=... --block`` in a private mount namespace in which empty
  tmpfs are mounted over exactly the fixture's own folders (``node_b_hidden_paths``): the run
  folder (``<root>/work``), the MLflow server's store (``<root>/mlflow``), the head's Ray temp
  dir (``<root>/ray``), the data folder (``<root>/data``, into which node b copies its own
  MNIST, at the path the head uses, from the head's copy) and node b's own temp dir
  (``<root>/tmp-b``, its ``$TMPDIR``): like a second machine, it sees none of the head's files
  there. The checkout, the interpreter's environment and the data folder the fixture was given
  stay visible wherever they live (``/tmp``, ``/home``, ``/work``): a hidden path over one of
  them is refused. 1 CPU and the custom resource ``node_b``;
* ``<root>/shared``: visible to both nodes (the role of an NFS mount), for ``ray.storage_path``;
* a real ``mlflow server`` (sqlite backend, proxied artifacts) on 127.0.0.1;
* a ``moto_server`` (S3) on 127.0.0.1 with one bucket, reached by pyarrow inside Ray
  through ``AWS_ENDPOINT_URL`` in the nodes' environment.

Ray's token authentication stays on: the cluster gets its own random token
(``<root>/auth_token``, mode 0600) and every process that talks to it (both nodes,
``ray job``, ``launch/submit.py``, helper drivers) runs with ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` pointing at that file. ``~/.ray/auth_token`` is never touched.

The head's mount namespace holds no extra mounts (it is there so that a per-node
``/etc/hosts`` can be bind-mounted, e.g. to make the MLflow host resolve differently per node).
Both nodes see ``<root>`` itself, hence the token file and ``<root>/shared``.

Tear-down (``stop``; also run at interpreter exit, and every child carries a parent-death
signal so that even a SIGKILLed pytest takes the cluster down; the children run in their
own sessions, so Ctrl-C reaches pytest alone, whose fixture tear-down then runs): SIGTERM to
node b's ``ray start --block`` (Ray drains the node for up to 30 s, then stops its
processes), then the head's (drain capped at 10 s: a head hardly ever goes idle), each
SIGKILLed if still there 15 s after its drain; then the MLflow server's and moto's process
groups (SIGTERM, up to 30 s, SIGKILL); finally any process still naming this cluster's
private root in its command line (only this fixture's processes do) is killed by pid.
``ray stop`` is never called and nothing is killed by name.

The root is a fresh ``/var/tmp/tkmn-*`` (short and independent of ``$TMPDIR``: Ray's socket
paths must stay under 108 characters).
Set ``TOOLKIT_MULTINODE_KEEP=1`` to keep the root (logs under ``<root>/logs``) after tear-down.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BUCKET = "toolkit-test"
NODE_DRAIN_S = 30   # Ray's default SIGTERM drain of a node (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)
HEAD_DRAIN_S = 10
HELPER_NAMESPACE = "toolkit-multinode-test"
HEAD_BLOCKER = "toolkit-test-head-cpu-blocker"
# environment of the caller that must not leak into the cluster or the clients
_SCRUB = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
          "TOOLKIT_DATA_DIR", "TOOLKIT_OUTPUT_ROOT", "MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
          "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


class ClusterError(RuntimeError):
    """The cluster could not be started (the message says which part and where its log is)."""


def node_b_hidden_paths(root: str | os.PathLike, keep_visible: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """The folders node b gets an empty tmpfs over: the Ray temp dir, run folder, MLflow store, data folder and
    node b's temp dir, all under the fixture's own ``root``, and nothing else.

    Hiding a broader folder (``/tmp`` once) also hides a checkout, virtual environment or data folder that
    happens to live there, and node b cannot start; so a hidden path that is, or holds, one of
    ``keep_visible`` (as given or symlinks resolved) is refused.
    """
    root = Path(root).resolve()
    hidden = tuple(root / name for name in ("ray", "work", "mlflow", "data", "tmp-b"))
    for keep in keep_visible:
        for k in {Path(os.path.abspath(keep)), Path(keep).resolve()}:
            over = [h for h in hidden if h == k or h in k.parents]
            if over:
                raise ClusterError(f"node b would not see {k}: it lies in {over[0]}, which node b hides")
    return hidden


# ------------------------------------------------------------------ processes


def _set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """In the child before exec: ``sig`` when the parent (pytest) dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _kill_with_parent() -> None:
    """Helper drivers and CLI calls: SIGKILL with pytest (a driver stuck reconnecting ignores SIGTERM)."""
    _set_pdeathsig(signal.SIGKILL)


def _spawn(args: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """A long-lived child in its own session (Ctrl-C of pytest reaches only pytest; tear-down stops it)."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, start_new_session=True, preexec_fn=_set_pdeathsig)


def _alive(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _terminate(proc: subprocess.Popen | None, grace: float = 30.0, group: bool = False) -> None:
    """SIGTERM (the process, or its process group), wait up to ``grace`` s, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
            else:
                os.kill(proc.pid, sig)

    send(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    if group:  # stragglers of the group (e.g. uvicorn under mlflow server)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def _descendants(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in _children(p):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (this cluster's private root)."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me and any(text in a for a in _cmdline(int(d))):
            out.append(int(d))
    return out


# ------------------------------------------------------------------ ports


class _Ports:
    """Free ports on this machine, never the same one twice."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))  # GCS and raylets listen on every interface
                return True
            except OSError:
                return False

    def one(self) -> int:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("0.0.0.0", 0))
                port = s.getsockname()[1]
            if port not in self.taken and 20000 <= port <= 65000:
                self.taken.add(port)
                return port
        raise ClusterError("no free port found")

    def range(self, n: int) -> tuple[int, int]:
        """``n`` consecutive free ports (Ray workers' --min/--max-worker-port)."""
        for _ in range(200):
            lo = random.randint(20000, 60000 - n)
            ports = range(lo, lo + n)
            if not self.taken.intersection(ports) and all(self._bindable(p) for p in ports):
                self.taken.update(ports)
                return lo, lo + n - 1
        raise ClusterError(f"no {n} consecutive free ports found")


# ------------------------------------------------------------------ the cluster


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _http(url: str, token: str | None = None, timeout: float = 5.0, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class MultiNodeCluster:
    """See the module docstring. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, mnist_raw: str | os.PathLike, root: str | os.PathLike | None = None,
                 object_store_mb: int = 256, start_timeout: float = 90.0) -> None:
        self.mnist_raw = Path(mnist_raw).resolve()
        missing = [f for f in MNIST_FILES if not (self.mnist_raw / f).is_file()]
        if missing:
            raise ClusterError(f"MNIST files missing in {self.mnist_raw}: {', '.join(missing)}")
        # short and whatever $TMPDIR is: Ray's socket paths must stay < 108 chars
        self.root = Path(root or tempfile.mkdtemp(prefix="tkmn-", dir="/var/tmp")).resolve()
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.start_timeout = start_timeout
        # what node b must see wherever it lives: the checkout, the interpreter's environment, the data
        self.keep_visible = (REPO, Path(sys.prefix), Path(sys.base_prefix), VENV_BIN, self.mnist_raw)
        self.hidden_on_node_b = node_b_hidden_paths(self.root, self.keep_visible)
        # run_dir: run.output_dir of the jobs (the head's disk); mlflow_dir: the MLflow server's store;
        # data_dir: TOOLKIT_DATA_DIR on both nodes (each its own copy); node_b_tmp: node b's $TMPDIR
        self.ray_tmp, self.run_dir, self.mlflow_dir, self.data_dir, self.node_b_tmp = self.hidden_on_node_b
        self.node_b_source = self.root / "node-b-source"  # node b's view of the head's MNIST while it copies
        self.shared_dir = self.root / "shared"   # visible to both nodes: ray.storage_path
        self.logs_dir = self.root / "logs"
        self.token_path = self.root / "auth_token"
        self.token = ""
        self.ports: dict[str, Any] = {}
        self.head: subprocess.Popen | None = None
        self.node_b: subprocess.Popen | None = None
        self.mlflow: subprocess.Popen | None = None
        self.moto: subprocess.Popen | None = None
        self._jobs = 0
        self._stopped = False
        self.timings: dict[str, float] = {}

    # ---- addresses
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['moto']}"

    @property
    def artifacts_dir(self) -> Path:
        return self.mlflow_dir / "artifacts"

    # ---- environments
    def aws_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment of a process on the user's side (``ray job``, ``launch/submit.py``, helper drivers)."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra or {})
        return env

    def node_env(self) -> dict[str, str]:
        """Environment of both ``ray start`` processes (what a cluster's setup would export)."""
        env = self.client_env()
        env.update(self.aws_env())
        env.update({
            "TOOLKIT_DATA_DIR": str(self.data_dir),
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_DEDUP_LOGS": "0",
        })
        return env

    # ---- start
    def start(self) -> "MultiNodeCluster":
        t0 = time.perf_counter()
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings["setup_s"] = time.perf_counter() - t0
        return self

    def _start(self) -> None:
        for d in (*self.hidden_on_node_b, self.artifacts_dir, self.shared_dir, self.logs_dir, self.node_b_source,
                  self.data_dir / "MNIST" / "raw"):
            d.mkdir(parents=True, exist_ok=True)
        for f in MNIST_FILES:  # the head's own copy, at the path node b uses for its copy
            shutil.copyfile(self.mnist_raw / f, self.data_dir / "MNIST" / "raw" / f)
        self.token = secrets.token_hex(32)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

        ports = _Ports()
        self.ports = {
            "gcs": ports.one(), "dashboard": ports.one(), "client": ports.one(),
            "agent_head": ports.one(), "agent_b": ports.one(),
            "workers_head": ports.range(64), "workers_b": ports.range(64),
            "mlflow": ports.one(), "moto": ports.one(),
        }
        (self.root / "ports.json").write_text(json.dumps(self.ports))

        # the servers first (they start in parallel with the head)
        self.moto = _spawn([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports["moto"])],
                           self.logs_dir / "moto.log", self.client_env())
        self.mlflow = _spawn([
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "1",
        ], self.logs_dir / "mlflow.log", self.client_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            cwd=self.mlflow_dir)  # no job runner: faster start, no huey folder left in /dev/shm
        t0 = time.perf_counter()
        self.head = self._start_head()
        # node b may join once the head's raylet has registered with the GCS (node b asks the GCS for the head's
        # node info); the head's dashboard and agents come up meanwhile
        self._wait(self._head_raylet_registered, "head node", self.head, "head.log")
        self.timings["head_registered_s"] = time.perf_counter() - t0
        self.node_b = self._start_node_b()
        self._wait(lambda: len(self.alive_nodes()) == 2, "node b joining", self.node_b, "node_b.log")
        self.timings["two_nodes_s"] = time.perf_counter() - t0
        self._wait(lambda: _http(f"{self.mlflow_uri}/health")[0] == 200, "mlflow server", self.mlflow, "mlflow.log")
        self._wait(self._make_bucket, "moto_server", self.moto, "moto.log")
        self.timings["servers_s"] = time.perf_counter() - t0

    def _head_raylet_registered(self) -> bool:
        if not _port_open(self.ports["gcs"]):
            return False
        if "Ray runtime started" in self.log_tail("head.log", 200):
            return True
        out = self.ray_tmp / "session_latest" / "logs" / "raylet.out"
        return out.is_file() and "Raylet of id" in out.read_text(errors="replace")

    def _ray_start_common(self) -> list[str]:
        return ["--num-gpus=0", f"--temp-dir={self.ray_tmp}", f"--object-store-memory={self.object_store_bytes}",
                "--disable-usage-stats", "--block"]

    def _start_head(self) -> subprocess.Popen:
        # the head's SIGTERM drain waits for its raylet to go idle, which a head (dashboard, job supervisors)
        # rarely does: 10 s is plenty for its workers to finish, then it shuts down its processes itself
        lo, hi = self.ports["workers_head"]
        ray_args = [
            str(VENV_BIN / "ray"), "start", "--head", f"--port={self.ports['gcs']}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.ports['dashboard']}",
            f"--ray-client-server-port={self.ports['client']}",
            f"--min-worker-port={lo}", f"--max-worker-port={hi}",
            f"--dashboard-agent-listen-port={self.ports['agent_head']}",
            "--num-cpus=1", *self._ray_start_common(),
        ]
        env = {**self.node_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(HEAD_DRAIN_S)}
        return _spawn(["unshare", "--mount", "--propagation", "private", "--", *ray_args],
                      self.logs_dir / "head.log", env, cwd=self.root)

    def _start_node_b(self) -> subprocess.Popen:
        lo, hi = self.ports["workers_b"]
        ray_args = [
            str(VENV_BIN / "ray"), "start", f"--address={self.gcs_address}",
            "--num-cpus=1", '--resources={"node_b": 1}',
            f"--min-worker-port={lo}", f"--max-worker-port={hi}",
            f"--dashboard-agent-listen-port={self.ports['agent_b']}",
            *self._ray_start_common(),
        ]
        raw, source = shlex.quote(str(self.data_dir / "MNIST" / "raw")), shlex.quote(str(self.node_b_source))
        # node b's own MNIST copy comes from the head's (the fixture's data folder, never the checkout's): bound
        # before anything is hidden, so that it stays readable once data/ is, then unbound
        script = f"set -e\nmount --bind {raw} {source}\n"
        for d in self.hidden_on_node_b:
            script += f"mount -t tmpfs -o size=4g,mode=1777 tmpfs {shlex.quote(str(d))}\n"
        script += f"mkdir -p {raw}\n"
        script += "".join(f"cp {source}/{f} {raw}/\n" for f in MNIST_FILES)
        script += f"umount {source}\ncd {shlex.quote(str(self.root))}\nexec {shlex.join(ray_args)}\n"
        env = {**self.node_env(), "TMPDIR": str(self.node_b_tmp)}  # its own temp dir, as on another machine
        return _spawn(["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script],
                      self.logs_dir / "node_b.log", env, cwd=self.root)

    def _wait(self, ready, what: str, proc: subprocess.Popen | None, log: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{what}: process exited with {proc.returncode}; see {self.logs_dir / log}:\n"
                                   + self.log_tail(log))
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise ClusterError(f"{what}: not ready after {self.start_timeout:.0f}s; see {self.logs_dir / log}:\n"
                           + self.log_tail(log))

    def _make_bucket(self) -> bool:
        return self.s3_client().create_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200

    def log_tail(self, name: str, n: int = 30) -> str:
        p = self.logs_dir / name
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.is_file() else ""

    # ---- stop
    def stop(self) -> None:
        """Idempotent tear-down (see the module docstring)."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.perf_counter()
        try:
            t = time.perf_counter()
            _terminate(self.node_b, grace=NODE_DRAIN_S + 15)  # drains (<= 30 s), then stops its processes
            self.timings["node_b_down_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _terminate(self.head, grace=HEAD_DRAIN_S + 15)
            self.timings["head_down_s"] = time.perf_counter() - t
            _terminate(self.mlflow, group=True)
            _terminate(self.moto, group=True)
            # last resort, by pid: processes that still name this cluster's private root
            if self.root.name.startswith("tkmn-"):
                stray = _pids_naming(str(self.root))
                for pid in stray:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                if stray:
                    self.timings["stray_killed"] = len(stray)
        finally:
            self.timings["teardown_s"] = time.perf_counter() - t0
            if os.environ.get("TOOLKIT_MULTINODE_KEEP") != "1":
                shutil.rmtree(self.root, ignore_errors=True)
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)

    def __enter__(self) -> "MultiNodeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- cluster state (cheap: dashboard REST, no Ray import)
    def alive_nodes(self) -> list[dict]:
        status, body = _http(f"{self.dashboard_url}/nodes?view=summary", self.token)
        if status != 200:
            return []
        summary = json.loads(body)["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def node_ids(self) -> dict[str, str]:
        """``{"head": node id, "b": node id}`` of the alive nodes."""
        out = {}
        for n in self.alive_nodes():
            r = n["raylet"]
            out["head" if r.get("isHeadNode") else "b"] = r["nodeId"]
        return out

    def wait_nodes(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) != n:
            if time.monotonic() > deadline:
                raise ClusterError(f"expected {n} alive nodes, have {len(self.alive_nodes())}")
            time.sleep(0.5)

    # ---- node b
    def raylet_pid(self, node: str = "b") -> int | None:
        proc = self.node_b if node == "b" else self.head
        if not _alive(proc):
            return None
        for pid in _descendants(proc.pid):
            args = _cmdline(pid)
            if args and Path(args[0]).name == "raylet":
                return pid
        return None

    def node_b_pid(self) -> int:
        """A process inside node b's mount namespace (its ``ray start``, else its raylet)."""
        if _alive(self.node_b):
            return self.node_b.pid
        raise ClusterError("node b is not running")

    def node_b_run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command inside node b's mount namespace."""
        return subprocess.run(["nsenter", "-t", str(self.node_b_pid()), "-m", "--", *args],
                              capture_output=True, text=True, timeout=timeout)

    def node_b_sees(self, path: str | os.PathLike) -> list[str]:
        """Files (and symlinks) under ``path`` as node b sees them, relative and sorted ([] when absent)."""
        path = str(path)
        r = self.node_b_run("find", path, "-mindepth", "1", "(", "-type", "f", "-o", "-type", "l", ")", "-printf", "%P\\n")
        if r.returncode != 0 and "No such file" in r.stderr:
            return []
        if r.returncode != 0:
            raise ClusterError(f"nsenter find {path} failed: {r.stderr.strip()}")
        return sorted(line for line in r.stdout.splitlines() if line)

    def kill_node_b_raylet(self, wait_dead: float = 120.0) -> str:
        """SIGKILL node b's raylet (a node loss); wait until its ``ray start --block`` exits and the GCS
        marks the node dead. Returns the dead node's id."""
        node = self.node_ids().get("b")
        pid = self.raylet_pid("b")
        if pid is None or node is None:
            raise ClusterError("node b has no raylet")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_dead
        if self.node_b is not None:
            try:
                self.node_b.wait(wait_dead)  # `ray start --block` notices and stops the node's other processes
            except subprocess.TimeoutExpired:
                _terminate(self.node_b)
        while node in {n["raylet"]["nodeId"] for n in self.alive_nodes()}:
            if time.monotonic() > deadline:
                raise ClusterError(f"the GCS still reports node b ({node}) alive {wait_dead:.0f}s after its raylet died")
            time.sleep(1.0)
        return node

    def restart_node_b(self, timeout: float = 120.0) -> str:
        """Start node b again (fresh tmpfs, fresh MNIST copy); wait until a new node b is alive. Returns its id."""
        old = self.node_ids().get("b") if _alive(self.node_b) else None
        _terminate(self.node_b)
        self.node_b = self._start_node_b()
        deadline = time.monotonic() + timeout
        while True:
            if self.node_b.poll() is not None:
                raise ClusterError("node b exited while restarting:\n" + self.log_tail("node_b.log"))
            alive = self.alive_nodes()
            new = [n["raylet"]["nodeId"] for n in alive if not n["raylet"].get("isHeadNode") and n["raylet"]["nodeId"] != old]
            if new and len(alive) == 2:
                return new[0]
            if time.monotonic() > deadline:
                raise ClusterError("node b did not come back:\n" + self.log_tail("node_b.log"))
            time.sleep(0.5)

    # ---- drivers and jobs
    def ray_python(self, body: str, timeout: float = 180) -> Any:
        """Run ``body`` in a fresh Python connected to the cluster as a driver; return what it prints last (JSON).

        A subprocess, so that pytest's own process never holds a Ray connection (other test modules
        start their own local Ray) and the token settings stay out of its environment.
        """
        code = ("import json, os, ray\n"
                f"ray.init(address={self.gcs_address!r}, namespace={HELPER_NAMESPACE!r}, log_to_driver=False)\n"
                "try:\n" + textwrap.indent(textwrap.dedent(body), "    ") + "\nfinally:\n    ray.shutdown()\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env=self.client_env(), cwd=self.root, preexec_fn=_kill_with_parent)
        if r.returncode != 0:
            raise ClusterError(f"ray_python failed ({r.returncode}):\n{r.stderr[-3000:]}")
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None

    def job_log_path(self, command: str = "job") -> Path:
        """A fresh file for the output of the next ``submit``."""
        self._jobs += 1
        return self.logs_dir / f"job{self._jobs:02d}-{command}.log"

    def submit(self, command_args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 900,
               profile: str = "cpu", log: Path | None = None) -> tuple[int, str]:
        """``python launch/submit.py --address <dashboard> --profile <p> --follow -- <command> key=value...``.

        Returns (exit code, stdout+stderr). The caller's ``TOOLKIT_DATA_DIR`` is not forwarded (the
        nodes export their own, as launch/README says); ``env`` adds variables to submit.py's
        environment (e.g. ``MLFLOW_TRACKING_URI``, which submit.py forwards). On timeout the job is
        stopped and the exit code is 124. ``log``: where the output goes as it comes (default: a fresh
        ``<root>/logs/jobNN-<command>.log``).
        """
        log = log or self.job_log_path(command_args[0] if command_args else "none")
        args = [sys.executable, str(REPO / "launch" / "submit.py"), "--address", self.dashboard_url,
                "--profile", profile, "--follow", "--", *command_args]
        with open(log, "wb") as out:
            out.write(("$ " + shlex.join(args) + "\n").encode())
            out.flush()
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.client_env(env), cwd=REPO, start_new_session=True,
                                    preexec_fn=_set_pdeathsig)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._stop_job(proc, log)
                rc = 124
            except BaseException:  # Ctrl-C: stop following and stop the job too
                self._stop_job(proc, log)
                raise
        return rc, log.read_text(errors="replace")

    def _stop_job(self, proc: subprocess.Popen, log: Path) -> None:
        _terminate(proc, grace=5, group=True)
        job = re.search(r"submitted (\S+):", log.read_text(errors="replace"))
        if job:
            with contextlib.suppress(Exception):
                self.ray_cli("job", "stop", job.group(1), "--address", self.dashboard_url, timeout=60)

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``ray <args>`` with this cluster's token (e.g. ``ray job list --address <dashboard>``)."""
        return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.client_env(), preexec_fn=_kill_with_parent)

    def job_ids(self) -> list[str]:
        return [j["submission_id"] for j in self.ray_python(
            "from ray.job_submission import JobSubmissionClient\n"
            f"c = JobSubmissionClient({self.dashboard_url!r})\n"
            "print(json.dumps([{'submission_id': j.submission_id} for j in c.list_jobs()]))")]

    def job_actors(self, submission_id: str, class_contains: str = "") -> list[dict]:
        """Actors (alive and dead) created by the job ``submission_id``: class name, node id, state."""
        return self.ray_python(
            "from ray.job_submission import JobSubmissionClient\n"
            "from ray.util.state import list_actors\n"
            f"info = JobSubmissionClient({self.dashboard_url!r}).get_job_info({submission_id!r})\n"
            f"rows = list_actors(address={self.dashboard_url!r}, filters=[('job_id', '=', info.job_id)], limit=10000, "
            "detail=True, raise_on_missing_output=False)\n"
            "print(json.dumps([{'class_name': a.class_name, 'node_id': a.node_id, 'state': a.state, "
            "'job_id': a.job_id, 'name': a.name} for a in rows "
            f"if {class_contains!r} in (a.class_name or '')]))")

    def actors(self, class_contains: str = "") -> list[dict]:
        """Actors the cluster has known (alive and dead): class name, node id, state, job id."""
        return self.ray_python(
            "from ray.util.state import list_actors\n"
            f"rows = list_actors(address={self.dashboard_url!r}, limit=10000, detail=True, raise_on_missing_output=False)\n"
            "print(json.dumps([{'class_name': a.class_name, 'node_id': a.node_id, 'state': a.state, "
            "'job_id': a.job_id, 'name': a.name} for a in rows "
            f"if {class_contains!r} in (a.class_name or '')]))")

    @contextlib.contextmanager
    def head_cpu_occupied(self) -> Iterator[None]:
        """A detached 1-CPU actor pinned to the head: work needing a CPU must go to node b."""
        head = self.node_ids()["head"]
        self.ray_python(f"""
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            @ray.remote(num_cpus=1)
            class Blocker:
                def ready(self):
                    return ray.get_runtime_context().get_node_id()

            a = Blocker.options(name={HEAD_BLOCKER!r}, lifetime="detached", get_if_exists=True,
                                scheduling_strategy=NodeAffinitySchedulingStrategy({head!r}, soft=False)).remote()
            print(json.dumps(ray.get(a.ready.remote(), timeout=60)))
        """)
        try:
            yield
        finally:
            self.ray_python(f"""
                try:
                    ray.kill(ray.get_actor({HEAD_BLOCKER!r}))
                except ValueError:
                    pass
                print("null")
            """)

    def run_on_node_b(self, fn_body: str, timeout: float = 120) -> Any:
        """Run ``fn_body`` (the body of a function returning something JSON-able) as a task on node b."""
        b = self.node_ids()["b"]
        return self.ray_python(f"""
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            @ray.remote(num_cpus=0.1)
            def probe():
{textwrap.indent(textwrap.dedent(fn_body), " " * 16)}

            ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy({b!r}, soft=False)).remote()
            print(json.dumps(ray.get(ref, timeout={timeout})))
        """, timeout=timeout + 60)

    # ---- servers
    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def s3_keys(self, prefix: str = "") -> list[str]:
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def mlflow_client(self):
        """A client of the cluster's server. Wrap calls that may follow a logged model (``list_artifacts``)
        in ``mlflow_scope()``: MLflow resolves ``models:/`` with the *default* tracking URI, which is
        otherwise ``sqlite:///mlflow.db`` in the current folder."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri)

    @contextlib.contextmanager
    def mlflow_scope(self) -> Iterator[None]:
        """This process's default MLflow tracking URI is the cluster's server, for the duration."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(self.mlflow_uri):
            yield
