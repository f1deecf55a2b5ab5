"""Exceptions that can reach the CLI, as the one line ``toolkit CMD: error: ...`` prints.

Each translation keeps the cause (its type where it is not a toolkit error, its first
line, the file or errno it names); the classes are recognised by the modules they come
from, so nothing here imports Ray or MLflow. ``TOOLKIT_TRACEBACK=1`` prints the
traceback as well (for bug reports).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import PurePath

from toolkit.redaction import redact

_MAX_LINE = 600

# errno -> what the user can do about it
_OS_HINTS = {
    errno.EROFS: "the folder is read-only: choose a writable run.output_dir",
    errno.EACCES: "permission denied: choose a writable run.output_dir (or fix the file's permissions)",
    errno.EPERM: "operation not permitted: choose a writable run.output_dir",
    errno.ENOSPC: "the disk is full: free space and re-run the same command to resume",
    errno.EDQUOT: "the disk quota is exceeded: free space and re-run the same command to resume",
}


def one_line(text: object) -> str:
    """The first non-empty line of ``text``, credentials masked, at most ~600 characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = redact(lines[0] if lines else "")
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


def _from(e: BaseException, package: str) -> bool:
    """Whether any class of ``e`` comes from ``package`` (``ray``, ``mlflow``, ``toolkit``)."""
    return any(c.__module__ == package or c.__module__.startswith(package + ".") for c in type(e).__mro__)


def _is_toolkit_error(e: BaseException) -> bool:
    return _from(e, "toolkit") and any(c.__name__ in ("ConfigError", "DataError", "CheckpointError")
                                       for c in type(e).__mro__)


# what a rank's collective (gloo, NCCL) says when another rank's process went away: an echo, not a cause
_PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                    "remote process exited", "ncclremoteerror", "communicator was aborted")


def _peer_lost(e: BaseException) -> bool:
    leaf = innermost_cause(e)
    text = str(leaf).lower()
    return type(leaf).__name__ == "DistNetworkError" or any(w in text for w in _PEER_LOST_WORDS)


def root_failure(failures: dict) -> BaseException:
    """Which of Ray Train's per-rank failures to report: the lowest rank's that is not a lost peer's echo.

    When a worker dies, the ranks waiting on it in a collective fail too ("Connection closed by
    peer"), and the lowest rank is often one of those: the dead worker's own failure says why.
    """
    ranked = [failures[rank] for rank in sorted(failures)]
    return next((f for f in ranked if not _peer_lost(f)), ranked[0])


def _describe_process_death(e: BaseException) -> str | None:
    """A worker whose process died (Ray's ``RayActorError``): how it ended, which Ray says after its first line."""
    if not (_from(e, "ray") and any(c.__name__ == "RayActorError" for c in type(e).__mro__)):
        return None
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    how = next((ln for ln in lines if "exit" in ln.lower()), lines[0] if lines else "")
    how, _, causes = how.partition(" Some common causes")  # Ray's list: OOM killer, `ray stop --force`, a crash
    hint = " (the OOM killer, a signal or a crash: see Ray's logs)" if causes else ""
    return f"{type(e).__name__}: {one_line(how)}{hint}"


def innermost_cause(e: BaseException) -> BaseException:
    """Follow Ray's wrappers (worker failures, controller failures, task errors) and ``raise ... from`` to the root."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = None
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            nxt = root_failure(failures)
        for attr in ("controller_failure", "cause", "health_check_failure"):
            if nxt is None and isinstance(getattr(e, attr, None), BaseException):
                nxt = getattr(e, attr)
        if nxt is None and e.__cause__ is not None:
            nxt = e.__cause__
        if nxt is None:
            break
        e = nxt
    return e


def _path_in_traceback(e: BaseException) -> str | None:
    """The file a decoding error came from: the innermost frame that holds a path (``Path.read_text``'s ``self``)."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        loc = frame.f_locals
        for name in ("self", "path", "p", "file", "filename"):
            if isinstance(loc.get(name), PurePath):
                return str(loc[name])
    return None


def _describe_os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno) if isinstance(e.errno, int) else None
    what = e.strerror or one_line(e) or type(e).__name__
    text = f"{name}: {what}" if name else f"{type(e).__name__}: {what}"
    files = [str(f) for f in (e.filename, e.filename2) if f]
    if files:
        text += ": " + " -> ".join(files)
    hint = _OS_HINTS.get(e.errno) if isinstance(e.errno, int) else None
    return f"{text} ({hint})" if hint else text


def _describe_leaf(e: BaseException) -> str:
    """A root cause as one line: a toolkit error as its message, anything else with its type."""
    if _is_toolkit_error(e):
        return one_line(e)
    if isinstance(e, UnicodeDecodeError):
        path = _path_in_traceback(e)
        where = f"file {path!r}" if path else "a file"
        return f"{where} is not UTF-8 text: {one_line(e)}"
    if isinstance(e, OSError):
        return _describe_os_error(e)
    if _from(e, "mlflow"):
        return f"MLflow: {one_line(getattr(e, 'message', None) or e)}"
    text = one_line(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how a full disk reads where no errno survives: sqlite (through SQLAlchemy and MLflow), the OS's own words
_DISK_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded")


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and every exception behind it: causes, contexts (an error raised while handling another),
    Ray's wrappers and SQLAlchemy's wrapped DB-API error (``orig``)."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        todo += [x.__cause__, x.__context__, innermost_cause(x)]
        orig = getattr(x, "orig", None)
        todo += [orig] if isinstance(orig, BaseException) else []
    return out


def _written_file_in_traceback(errors: list[BaseException]) -> str | None:
    """The file a write was failing on, from the innermost frame that holds it: ``shutil``'s ``dst``, MLflow's
    artifact ``destination_file_path``, a ``Path``'s ``self`` (``write_text``), an MLflow sqlite store's ``db_uri``."""
    for x in errors:
        frames = []
        tb = x.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_locals)
            tb = tb.tb_next
        for loc in reversed(frames):
            for name in ("dst", "filename", "destination_file_path", "self"):
                value = loc.get(name)
                if isinstance(value, (str, PurePath)) and os.path.isabs(value):
                    return str(value)
            uri = getattr(loc.get("self"), "db_uri", None)
            if isinstance(uri, str) and uri.startswith("sqlite:///"):
                return uri[len("sqlite:///"):].split("?", 1)[0]
    return None


def _mount_point(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.ismount(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def describe_disk_full(e: BaseException) -> str | None:
    """One line for a full disk (or quota) anywhere behind ``e``, naming the folder and the file system
    it is on; None when no full disk is behind it.

    A full disk rarely arrives as itself: sqlite's "database or disk is full" comes wrapped in
    SQLAlchemy's and MLflow's errors, often raised while marking the run FAILED after the real
    failure (a checkpoint that could not be written), whose message then names neither.
    """
    chain = _chain(e)
    full = [x for x in chain if (isinstance(x, OSError) and x.errno in _DISK_FULL_ERRNOS)
            or any(w in str(x).lower() for w in _DISK_FULL_WORDS)]
    if not full:
        return None
    quota = any(isinstance(x, OSError) and x.errno == errno.EDQUOT or "quota" in str(x).lower() for x in full)
    hint = "the disk quota is exceeded" if quota else "the disk is full"
    with_errno = [x for x in full if isinstance(x, OSError) and x.errno in _DISK_FULL_ERRNOS]
    worded = [x for x in full if x not in with_errno]
    for x in with_errno:  # the OS's words with the file they were said of (a copy's: the destination)
        path = str(x.filename2 or x.filename) if x.filename else _written_file_in_traceback([x])
        if path:
            return _disk_full_line(f"{errno.errorcode[x.errno]}: {x.strerror or os.strerror(x.errno)}", path, hint)
    if worded:  # sqlite's own words rather than SQLAlchemy's or MLflow's wrapping of them; the file from the store
        said = [one_line(x) for x in worded]
        head = min([t for t in said if any(w in t.lower() for w in _DISK_FULL_WORDS)] or said, key=len)
        return _disk_full_line(head, _written_file_in_traceback(worded), hint)
    x = with_errno[0]
    return _disk_full_line(f"{errno.errorcode[x.errno]}: {x.strerror or one_line(x)}", None, hint)


def _disk_full_line(head: str, path: str | None, hint: str) -> str:
    if path is None:  # e.g. Ray storage written by pyarrow, a tracking server's disk: their own words
        return f"{head} ({hint}: free space and re-run the same command to resume)"
    path = os.path.abspath(path)
    return (f"{head}: {path} ({hint}: free space on the file system at {_mount_point(os.path.dirname(path))} and "
            "re-run the same command to resume)")


def print_traceback(e: BaseException) -> None:
    """``e``'s traceback on stderr, credentials masked (messages and source lines may quote a URI)."""
    print(redact("".join(traceback.format_exception(e))), end="", file=sys.stderr, flush=True)


def describe_error(e: BaseException) -> str | None:
    """The CLI's one line for an exception that can reach it, or None for an unexpected one (a bug: traceback)."""
    if os.environ.get("TOOLKIT_TRACEBACK"):
        print_traceback(e)
    full = describe_disk_full(e)  # first: it hides behind whatever error came last (MLflow's, Ray's, torch's)
    if full:
        return full
    if _from(e, "ray"):  # first: a worker's ConfigError comes back as a RayTaskError subclassing it
        inner = innermost_cause(e)
        if inner is e:
            # a Ray error of its own (actor died, object lost, timeout): its own first informative line
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().endswith(":")]
            return f"Ray: {type(e).__name__}: {one_line(lines[0] if lines else '')}".rstrip(": ")
        what = "a Ray Train worker failed" if getattr(e, "worker_failures", None) else f"Ray ({type(e).__name__})"
        return f"{what}: {_describe_process_death(inner) or _describe_leaf(inner)}"
    if _is_toolkit_error(e):
        return one_line(" ".join(str(e).split()))
    if _from(e, "mlflow"):
        return _describe_leaf(e)
    if isinstance(e, (UnicodeDecodeError, OSError)):
        return _describe_leaf(e)
    if isinstance(e, FloatingPointError):
        return one_line(e) or "FloatingPointError"
    return None
