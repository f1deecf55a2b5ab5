"""Exceptions that can reach the CLI, as the one line ``toolkit CMD: error: ...`` prints.

Each translation keeps the cause (its type where it is not a toolkit error, its first
line, the file or errno it names); the classes are recognised by the modules they come
from, so nothing here imports Ray or MLflow. ``TOOLKIT_TRACEBACK=1`` prints the
traceback as well (for bug reports).
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from pathlib import PurePath

_CREDENTIALS = re.compile(r"(://)[^/@\s]*@")
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
    """The first non-empty line of ``text``, credentials in URIs masked, at most ~600 characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    line = _CREDENTIALS.sub(r"\1***@", line)
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


def _from(e: BaseException, package: str) -> bool:
    """Whether any class of ``e`` comes from ``package`` (``ray``, ``mlflow``, ``toolkit``)."""
    return any(c.__module__ == package or c.__module__.startswith(package + ".") for c in type(e).__mro__)


def _is_toolkit_error(e: BaseException) -> bool:
    return _from(e, "toolkit") and any(c.__name__ in ("ConfigError", "DataError", "CheckpointError")
                                       for c in type(e).__mro__)


def innermost_cause(e: BaseException) -> BaseException:
    """Follow Ray's wrappers (worker failures, controller failures, task errors) and ``raise ... from`` to the root."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = None
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            nxt = failures[sorted(failures)[0]]
        for attr in ("controller_failure", "cause"):
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


def describe_error(e: BaseException) -> str | None:
    """The CLI's one line for an exception that can reach it, or None for an unexpected one (a bug: traceback)."""
    if os.environ.get("TOOLKIT_TRACEBACK"):
        traceback.print_exception(e, file=sys.stderr)
    if _from(e, "ray"):  # first: a worker's ConfigError comes back as a RayTaskError subclassing it
        inner = innermost_cause(e)
        if inner is e:
            # a Ray error of its own (actor died, object lost, timeout): its own first informative line
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().endswith(":")]
            return f"Ray: {type(e).__name__}: {one_line(lines[0] if lines else '')}".rstrip(": ")
        what = "a Ray Train worker failed" if getattr(e, "worker_failures", None) else f"Ray ({type(e).__name__})"
        return f"{what}: {_describe_leaf(inner)}"
    if _is_toolkit_error(e):
        return one_line(" ".join(str(e).split()))
    if _from(e, "mlflow"):
        return _describe_leaf(e)
    if isinstance(e, (UnicodeDecodeError, OSError)):
        return _describe_leaf(e)
    if isinstance(e, FloatingPointError):
        return one_line(e) or "FloatingPointError"
    return None
