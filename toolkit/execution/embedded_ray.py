"""What the embedded Ray (started by this process, no ``ray.address``) is closed by: a token, and loopback.

- token authentication: Ray turns it on for a new local cluster (``ray.init()`` without an
  address) from 2.59 on, the lower bound in pyproject.toml, unless ``RAY_AUTH_MODE`` says
  otherwise (``disabled`` is the user's choice, and README's advice against);
- the token file private: Ray writes ``~/.ray/auth_token`` with the umask's mode (0644:
  readable by every local user), so it is created here first, mode 0600;
- every port on 127.0.0.1. Ray binds its servers to the node's address, by default the
  machine's network address (GCS, raylet and workers on every interface), and the Prometheus
  metrics of the autoscaler monitor, the dashboard process and the dashboard agent to
  0.0.0.0 without a token. An embedded Ray never gets a second node, so its node address can
  be loopback: Ray does exactly that on macOS and Windows (``ENABLE_RAY_CLUSTER`` false).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    """Where Ray looks for its token when neither ``$RAY_AUTH_TOKEN`` nor ``$RAY_AUTH_TOKEN_PATH`` says."""
    return Path.home() / ".ray" / "auth_token"


def ensure_private_token() -> Path | None:
    """The default token file, created 0600 when missing (as Ray would: 32 random bytes in hex) or made 0600.

    None when the token comes from ``$RAY_AUTH_TOKEN`` / ``$RAY_AUTH_TOKEN_PATH`` (the user's own).
    """
    if os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV):
        return None
    path = default_token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the first byte
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)  # a token an older run (or Ray itself) left readable by others
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Within: a new local Ray takes 127.0.0.1 as its node address (and so binds every port there).

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported (maybe before this
    module ran), into ``ray_constants.ENABLE_RAY_CLUSTER``; its node-address lookup reads the
    constant at each call: set it for the ``ray.init`` that starts the node, then put it back.
    (Private to Ray; the version is bounded in pyproject.toml, and tests/test_listening_ports.py
    fails if a Ray stops honouring it.)
    """
    from ray._private import ray_constants

    kept = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = kept


@contextlib.contextmanager
def closed() -> Iterator[None]:
    """Around the ``ray.init`` that starts the embedded Ray: its token private, every port on loopback."""
    if os.environ.get(AUTH_MODE_ENV, "token").lower() == "token":  # unset: Ray >= 2.59 turns token auth on
        ensure_private_token()
    with loopback_node():
        yield
