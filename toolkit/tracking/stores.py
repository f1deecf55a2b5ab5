"""Which MLflow tracking store a command writes to or reads from, and whether it can be used.

``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file under ``run.output_dir``; a URI
holding a credential is refused before MLflow sees it; a server is asked once, within seconds; a
fresh sqlite store is created under a file lock; a store that is only read is never created.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from toolkit.config import ConfigError, Execution, uri_credentials_problem
from toolkit.execution.storage import resolve_output_dir
from toolkit.locks import lock_exclusive
from toolkit.redaction import redact


def configured_tracking_uri(execution: Execution) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ""; ConfigError (masked) when it holds a credential.

    Every command reads it here (predict and report too), so a secret is refused before MLflow sees it.
    """
    uri = execution.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        _refuse_credentials(uri)
    return uri


def tracking_uri(execution: Execution) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an absolute sqlite file under ``run.output_dir``."""
    uri = configured_tracking_uri(execution)
    if uri:
        return uri
    out = resolve_output_dir(execution.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def readable_tracking_uri(execution: Execution, what: str) -> str:
    """The tracking URI to read ``what`` from (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the sqlite
    file in ``run.output_dir``); ConfigError when that is a sqlite file that does not exist.

    Reading from a missing sqlite store would create it (and the output folder): a bad run id
    would leave an empty store behind, and it cannot hold the run anyway.
    """
    uri = (configured_tracking_uri(execution)
           or f"sqlite:///{resolve_output_dir(execution.run.output_dir) / 'mlflow.db'}")
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if path and path != ":memory:" and not Path(path).is_file():
        raise ConfigError(f"{what}: the tracking store {path!r} does not exist (tracking.uri, else "
                          "$MLFLOW_TRACKING_URI, else <run.output_dir>/mlflow.db)")
    return uri


def prepare_sqlite_store(uri: str, timeout_s: float = 120.0) -> None:
    """Create (or migrate) the sqlite store of ``uri`` under an exclusive lock on ``<db>.lock``.

    Two processes that open a fresh sqlite store at once both run MLflow's alembic migration
    and one of them fails (``table _alembic_tmp_... already exists``), which can leave the
    store broken. Under the lock the first creates the tables and the others find them.
    """
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    db = Path(path)
    label = _uri_label(uri)
    if not db.parent.is_dir():
        raise ConfigError(f"{label} is not usable: the folder {str(db.parent)!r} does not exist")
    lock = db.with_name(db.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if db.is_file():  # an existing store in a folder we may not write: reading it needs no lock
            fd = None
        else:
            raise ConfigError(f"{label} is not usable: cannot create {str(lock)!r}: {e.strerror}") from None
    try:
        if fd is not None and not lock_exclusive(fd, timeout_s):
            raise ConfigError(f"{label} is not usable: another process has been creating the store for "
                              f"{timeout_s:g} s (lock {str(lock)!r})")
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates / checks the tables
        except Exception as e:  # noqa: BLE001 - a store that cannot be opened is one line, whatever the cause
            from toolkit.errors import one_line

            msg = one_line(getattr(e, "message", None) or e) or type(e).__name__
            raise ConfigError(f"{label} cannot be opened: {type(e).__name__}: {msg}") from None
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _uri_label(uri: str) -> str:
    """How an error line names the tracking URI: masked, and where it came from."""
    label = f"tracking.uri={redact(uri)!r}"
    return label + " (from $MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") == uri else label


def _refuse_credentials(uri: str) -> None:
    problem = uri_credentials_problem(uri)
    if problem:
        raise ConfigError(f"{_uri_label(uri)} is not allowed: {problem}")


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the tracking store of ``uri`` cannot be used.

    http(s): one GET of ``<uri>/health`` within ``timeout_s`` (any HTTP answer, even 401 or
    404, means a server is there; no answer means MLflow would retry for minutes).
    sqlite: the store is created under a file lock (``prepare_sqlite_store``). A URI with
    credentials is refused: they would be copied into configs and artifacts.
    """
    label = _uri_label(uri)
    _refuse_credentials(uri)
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            return  # a server answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                reason = f"no answer within {timeout_s:g} s"
            text = str(getattr(reason, "strerror", None) or reason).strip().splitlines()
            raise ConfigError(f"{label} is not reachable: {text[0] if text else type(e).__name__}") from None
    elif scheme == "sqlite":
        prepare_sqlite_store(uri)


