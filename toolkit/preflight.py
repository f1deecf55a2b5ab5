"""Checks the CLI makes before a command starts work: cheap, with short timeouts, one ConfigError line each.

Without them an unreachable Ray cluster makes ``ray.init`` retry for minutes.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from .config import Config, ConfigError

RAY_CONNECT_TIMEOUT_S = 3.0


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` or ``ray://host:port`` -> (host, port); None for ``auto``, ``local`` and the like."""
    if address in ("auto", "local") or not address:
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"ray.address={address!r} is not allowed: expected host:port, ray://host:port or 'auto'") from None
    if not parts.hostname or port is None:
        raise ConfigError(f"ray.address={address!r} is not allowed: expected host:port, ray://host:port or 'auto'")
    return parts.hostname, port


def check_ray_address_reachable(cfg: Config, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """``ray.address`` (else ``$RAY_ADDRESS``) accepts a TCP connection within ``timeout_s``, or ConfigError."""
    key, address = ("ray.address", cfg.ray.address) if cfg.ray.address else ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS", ""))
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, TimeoutError) or isinstance(e, socket.timeout):
            reason = f"no answer within {timeout_s:g} s"
        raise ConfigError(f"{key}={address!r} is not reachable: {reason} (is the Ray head running there?)") from None
