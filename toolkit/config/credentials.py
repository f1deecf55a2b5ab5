"""Why a tracking URI that holds a credential is refused (what is a credential: ``toolkit.redaction``).

What toolkit stores and shows is masked, but a tracking URI is what every process connects
with, so it travels unmasked to each Ray worker and controller: one holding a password or a
token is refused instead, with the reason below (credentials go in MLflow's own variables).
"""

from __future__ import annotations

from toolkit.redaction import holds_secret


def uri_credentials_problem(uri: str) -> str | None:
    """Why ``uri`` must not be used (it carries a password, a user or a token), or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        password, user = parts.password, parts.username
    except ValueError:
        return None
    http = parts.scheme.lower() in ("http", "https")
    # a user alone is no secret where a password file (~/.pgpass) holds the password; over HTTP it is basic auth
    if password is None and not (http and user) and not holds_secret("?" + parts.query):
        return None
    if http:
        return ("it holds credentials, which would travel with every Ray job and worker config; "
                "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    return ("it holds a password or a token, which would travel with every Ray job and worker config; keep it out "
            "of the URI (e.g. ~/.pgpass for PostgreSQL) or use an MLflow server with MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD")
