"""`toolkit <command> [--config FILE.yaml] [--backend local|ray] [key=value ...]`.

Bad input (unknown keys, impossible values, missing or corrupt data, a checkpoint
from another model) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Iterator

from toolkit.config import STAGE_SECTIONS, ConfigError, Execution, Study, check_command_config, help_text, load_config

# command -> its one-line description; the config sections its help lists come from
# config.STAGE_SECTIONS (the study sections that decide its result) plus the execution it runs on
COMMANDS: dict[str, str] = {
    "pretrain": "SimCLR pretraining of the encoder (Ray Train DDP + Accelerate)",
    "probe": "linear / MLP / kNN probes on a frozen encoder, 100 labels and all labels",
    "supervised": "CNN on the labeled images with on-device augmentation",
    "pseudolabel": "one-shot or iterative pseudo-labeling with Ray Data inference",
    "student": "a student trained on the teachers' labels of the whole pool (student.teachers, student.encoder)",
    "pipeline": "pretrain -> probe -> supervised -> one-shot -> iterative -> SimCLR-initialised iterative -> student",
    "tune": "Ray Tune search of the iterative pseudo-labeler's threshold schedule",
    "report": "results table and plots of a pipeline run",
    "predict": "labels and confidences for images (idx3, .npy, image files of any size) from a model file, MLflow run or model URI",
}
_RUNS_ON = {"pretrain": ("ray",), "probe": ("tracking",), "supervised": ("ray",), "pseudolabel": ("ray", "inference"),
            "student": ("ray", "inference"), "tune": ("ray", "trials"), "pipeline": ("ray", "inference", "trials"),
            "report": ("report",), "predict": ("predict",)}


def command_sections(command: str) -> tuple[str, ...]:
    """The config sections ``toolkit COMMAND --help`` lists: the study sections that decide its result,
    then the execution sections of where it runs."""
    return tuple(dict.fromkeys((*STAGE_SECTIONS.get(command, ()), *_RUNS_ON.get(command, ()), "tracking", "run")))


def _dispatch(command: str) -> Callable[[Study, Execution], object]:
    if command == "pretrain":
        from toolkit.stages.pretrain import pretrain
        return pretrain
    if command == "probe":
        from toolkit.stages.probe import probe
        return probe
    if command == "student":
        from toolkit.stages.student import student_command
        return student_command
    if command == "supervised":
        from toolkit.stages.supervised import supervised
        return supervised
    if command == "pseudolabel":
        from toolkit.stages.pseudolabel import pseudolabel
        return pseudolabel
    if command == "pipeline":
        from toolkit.stages.pipeline import pipeline
        return pipeline
    if command == "tune":
        from toolkit.stages.tune import tune
        return tune
    if command == "report":
        from toolkit.stages.report import report
        return report
    if command == "predict":
        from toolkit.stages.predict import predict
        return predict
    raise ConfigError(f"unknown command {command!r}")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toolkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, desc in COMMANDS.items():
        p = sub.add_parser(
            name, help=desc, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="config keys (key=value):" + help_text(command_sections(name)),
        )
        p.add_argument("--config", "-c", help="YAML file of overrides (e.g. launch/configs/cpu.yaml)")
        p.add_argument("--backend", choices=("ray", "local"), help="shortcut for run.backend=...")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt: runs are marked KILLED and checkpoints kept.

    Installed explicitly because a process started in the background inherits SIGINT as
    ignored (POSIX shells do that), and Python then never raises KeyboardInterrupt.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise)


# Loggers that print a database error with its traceback and then raise it: MLflow's sqlite store ("SQLAlchemy
# database error. The following exception is caught"), SQLAlchemy, alembic. The raised error is the command's
# one line; a full disk printed 80-320 lines before it. MLflow's store also announces a fresh sqlite file (INFO).
_STORE_LOGGERS = ("mlflow.store.db.utils", "sqlalchemy", "alembic")


@contextlib.contextmanager
def _quiet_store_loggers() -> Iterator[None]:
    """For the command's duration: the store's loggers print nothing below CRITICAL (WARNING with
    ``TOOLKIT_TRACEBACK=1``, which prints the traceback of the error itself)."""
    import logging

    loggers = [logging.getLogger(name) for name in _STORE_LOGGERS]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if os.environ.get("TOOLKIT_TRACEBACK") else logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def _masked_excepthook(kind: type, value: BaseException, tb) -> None:
    """What Python prints for an exception that leaves ``main``: its traceback, credentials masked."""
    from toolkit.errors import print_traceback

    print_traceback(value.with_traceback(tb))


def main(argv: list[str] | None = None) -> int:
    import logging

    # MLflow announces creating a fresh sqlite store on stderr (INFO): never, also after the command
    # (tests and notebooks call stages in the same process), since an error must stay the only line there
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # MLflow draws a progress bar on stderr for every artifact it downloads (a model, a checkpoint by run id)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with _quiet_store_loggers():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    _interrupt_on_signals()
    parser = build_parser()
    # key=value arguments may come before and after options (`a=1 --backend local b=2`): argparse
    # hands those after an option back as extras; they keep their order, so a later one still wins
    args, extras = parser.parse_known_args(argv)  # --help and usage errors: SystemExit(0 / 2), one line
    stray = [a for a in extras if a.startswith("-")]
    if stray:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        (subs[0].choices.get(args.command) if subs and args.command else parser).error(
            f"unrecognized arguments: {' '.join(stray)}")
    if not args.command:
        parser.print_help()
        return 2
    from toolkit.errors import describe_error
    from toolkit.redaction import redact

    try:
        overrides = list(args.overrides) + list(extras)
        if args.backend:
            overrides.append(f"run.backend={args.backend}")
        cfg = load_config(args.config, overrides)
        sections = command_sections(args.command)
        check_command_config(cfg, sections)  # what the config alone shows impossible for this command
        # split once: what decides the result, and where and how it runs (one absolute output folder
        # for the whole command: inside a Ray job, not its temporary working folder)
        from toolkit.execution.storage import resolve_output_dir

        study = cfg.study
        execution = cfg.execution.replace(**{"run.output_dir": str(resolve_output_dir(cfg.run.output_dir))})
        if "ray" in sections:
            from toolkit.preflight import check_ray_address_reachable

            check_ray_address_reachable(execution)  # seconds, not minutes of ray.init retries
        if execution.run.threads:
            import torch

            torch.set_num_threads(execution.run.threads)  # the driver's own work: probes, inference, evaluation
        # a GPU this process would train on must be here before any folder or MLflow run exists (Ray's
        # workers are checked after connecting; tune's trials train in their actors on Tune's GPUs)
        from toolkit.execution.backends import check_gpu_visible

        check_gpu_visible(execution, classifiers="classifier" in sections and args.command != "tune")
        from toolkit.preflight import check_inputs

        check_inputs(study, execution, args.command)  # data, checkpoints, stores: bad input creates no folder, lock or run
        _dispatch(args.command)(study, execution)
    except KeyboardInterrupt:
        print(f"toolkit {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the known kinds become one line; anything else is a bug (traceback)
        line = describe_error(e)
        if line is None:
            sys.excepthook = _masked_excepthook  # a bug keeps its traceback, with credentials masked
            raise
        print(f"toolkit {args.command}: error: {redact(line)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
