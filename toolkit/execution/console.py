"""The console while Ray runs: toolkit's own lines, without Ray's prefixes and chatter.

Ray forwards every line its workers print (with "(RayTrainWorker pid=...)" prefixes),
and its own loggers print report dumps, checkpoint notices and deprecation warnings.
The toolkit's progress and result lines are what a user reads; Ray's output stays in
its log files (the folder is printed once), and ``run.verbose=true`` shows it all.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# a toolkit line: "[pretrain] ...", "[round 2/4] ...", "[warning] ..." (what Progress and the stages print);
# Ray Train's controller writes "[FailurePolicy] RETRY/RAISE ..." in the same shape: its decision is Ray's
# chatter (the command's own line says what failed), so it stays in Ray's log files
_TOOLKIT_LINE = re.compile(r"^\[(?!FailurePolicy\])[A-Za-z][\w ./-]*\] ")


class QuietRay:
    """A logging filter for Ray's console handlers: warnings and errors only, less two notices that are
    no news here (token authentication is on on purpose; progress bars are off on purpose)."""

    NOISE = ("Token authentication is enabled", "Progress bars disabled")

    def filter(self, record) -> bool:
        import logging

        return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in self.NOISE)


def quiet_loggers(name: str) -> None:
    import logging

    for handler in logging.getLogger(name).handlers:
        # the console handler only: Ray's log files keep everything
        if type(handler).__name__ == "PlainRayHandler" and not any(isinstance(f, QuietRay) for f in handler.filters):
            handler.addFilter(QuietRay())


def show_toolkit_lines(verbose: bool, logs: Path | None) -> None:
    """The console shows toolkit's own lines from Ray's processes, without Ray's prefixes; Ray's chatter
    (report dumps, checkpoint lines, deprecation notices) stays in its log files. ``run.verbose`` shows all.

    Replaces the handler Ray's driver uses to print worker output (a private hook of Ray 2.5x;
    the version is bounded in pyproject.toml): if it moves, Ray's own printing stays in place.
    """
    import logging

    if verbose:
        return
    import ray.data  # noqa: F401 - configures the "ray.data" logger, whose console handler is quietened next

    quiet_loggers("ray.data")
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def toolkit_lines(data: dict) -> None:
        stream = sys.stderr if data.get("is_err") else sys.stdout
        for line in data.get("lines", []):
            if _TOOLKIT_LINE.match(line):
                stream.write(line + "\n")
        stream.flush()

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("toolkit_print_logs", toolkit_lines)
    if logs is not None:
        print(f"[ray] embedded Ray started; its own logs: {logs} (run.verbose=true shows them here)", flush=True)


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process of an embedded Ray.

    Without the dashboard the State API is absent, and Ray Train's placement-group
    cleaner warns about it every second; the cleanup itself still happens.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
