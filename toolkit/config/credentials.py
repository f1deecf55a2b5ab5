"""Keeping secrets out of URIs: mask them for printing, and say why a URI that holds one is refused.

A tracking URI ends up in config.yaml, checkpoints and MLflow params, so a password in it
would be copied everywhere; ``TrackingConfig.validate`` refuses it with the reason below.
"""

from __future__ import annotations

import re

_SECRET_QUERY_WORDS = ("password", "passwd", "secret", "token", "key", "auth", "credential", "signature")


def redact_uri(uri: str) -> str:
    """``uri`` with any user:password@ part and query string masked (safe to print or log)."""
    out = re.sub(r"(://)[^/@\s]*@", r"\1***@", uri)
    return re.sub(r"\?.*$", "?***", out) if "?" in out else out


def uri_credentials_problem(uri: str) -> str | None:
    """Why ``uri`` must not be used (it carries a password, a user or a token), or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        password, user = parts.password, parts.username
    except ValueError:
        return None
    http = parts.scheme.lower() in ("http", "https")
    query = parts.query.lower()
    if password is None and not (http and user) and not any(w in query for w in _SECRET_QUERY_WORDS):
        return None
    if http:
        return ("it holds credentials, which would end up in config.yaml, checkpoints and MLflow params; "
                "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    return ("it holds a password, which would end up in config.yaml, checkpoints and MLflow params; keep it out "
            "of the URI (e.g. ~/.pgpass for PostgreSQL) or use an MLflow server with MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD")

