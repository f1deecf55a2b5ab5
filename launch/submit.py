"""Submit a ``toolkit`` command to a Ray cluster as a Ray job.

    python launch/submit.py --address http://127.0.0.1:8265 --profile gpu -- pretrain ray.num_workers=4

runs ``toolkit pretrain --config launch/configs/gpu.yaml ray.num_workers=4`` on
the cluster's head node, with this repository uploaded as the job's working
directory (so the cluster runs the code you have, not the code it was set up
with). The address is the Ray dashboard / Jobs API, e.g. the 127.0.0.1:8265
tunnel that ``ray dashboard ray_cluster.yaml`` opens.

Only ``TOOLKIT_DATA_DIR``, ``TOOLKIT_OUTPUT_ROOT`` and ``MLFLOW_TRACKING_URI`` travel
from your shell to the job, and only when set: a runtime_env is stored by the cluster and shown
in its dashboard, so nothing else from the local environment goes there. For the same reason
a variable or a ``key=value`` that carries a credential (``s3://KEY:SECRET@bucket``,
``?token=...``; ``toolkit.redaction`` decides) is refused, and what this script prints is masked.

``build_job_spec`` is the pure part (profile + arguments + environment ->
``submit_job`` keyword arguments); ``main`` adds the CLI, ``--dry-run`` and
``--follow``. Ray is imported only to submit, so ``--dry-run`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# The toolkit CLI's commands (toolkit.cli.COMMANDS; a test keeps the two in
# step), checked here so a typo fails before the code is uploaded.
COMMANDS = ("pretrain", "probe", "supervised", "pseudolabel", "student", "pipeline", "tune", "report", "predict")

# The only local environment variables a job inherits (when set).
PASSTHROUGH_ENV = ("TOOLKIT_DATA_DIR", "TOOLKIT_OUTPUT_ROOT", "MLFLOW_TRACKING_URI")

# Never uploaded with the code (gitignore syntax, relative to the repo root;
# Ray also honours .gitignore). A leading "/" anchors a pattern at the root,
# so a toolkit file or folder named like one of them (toolkit/datasets/) still ships while ./data does not.
WORKING_DIR_EXCLUDES = (
    ".git",
    "/.venv*",
    "/venv*",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    "/build",
    "/dist",
    "/.whl",
    "/runs",
    "/outputs",
    "/mlruns",
    "mlflow.db",
    "/data",
    "/.data",
    "*.ckpt",
    "*.pt",
)


class SubmitError(ValueError):
    """A request that cannot become a job; the message is one line for the CLI."""


def available_profiles(configs_dir: Path) -> list[str]:
    """Profile names (``<name>.yaml`` files) in ``configs_dir``, sorted."""
    return sorted(p.stem for p in Path(configs_dir).glob("*.yaml")) if Path(configs_dir).is_dir() else []


def _profile_path(profile: str, configs_dir: Path, working_dir: Path) -> Path:
    names = available_profiles(configs_dir)
    if profile not in names:  # also rejects "../x" and other paths
        shown = ", ".join(names) if names else "none"
        raise SubmitError(f"unknown profile {profile!r} (available in {configs_dir}: {shown})")
    path = Path(configs_dir) / f"{profile}.yaml"
    try:
        path.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise SubmitError(f"profile {path} is outside the uploaded working dir {working_dir}") from None
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SubmitError(f"profile {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if tree is not None and not isinstance(tree, dict):
        raise SubmitError(f"profile {path} must be a mapping of config keys")
    return path


def _check_config(profile_path: Path, overrides: list[str]) -> None:
    """Resolve the config locally so unknown keys and bad values fail before upload."""
    try:
        from toolkit.config import ConfigError, load_config
    except ImportError:  # toolkit not importable here: the cluster will check
        return
    try:
        load_config(profile_path, overrides)
    except ConfigError as e:
        raise SubmitError(str(e).splitlines()[0]) from None


def _redaction():
    """``toolkit.redaction`` (what a credential looks like), imported when first needed: run as
    a script, this checkout joins ``sys.path`` only in ``__main__``."""
    from toolkit import redaction

    return redaction


def _passthrough_env(env: Mapping[str, str]) -> dict[str, str]:
    out = {k: env[k] for k in PASSTHROUGH_ENV if env.get(k)}
    for name, value in out.items():
        if _redaction().holds_secret(value):
            # The runtime_env is stored by the cluster and shown in the dashboard.
            hint = ("configure MLFLOW_TRACKING_USERNAME/PASSWORD on the cluster instead"
                    if name == "MLFLOW_TRACKING_URI" else "give the cluster's nodes their own credentials instead")
            raise SubmitError(f"{name} carries credentials ({_redaction().redact(value)}); refusing to put them "
                              f"in the job's runtime_env, {hint}")
    return out


def build_job_spec(
    profile: str,
    command_args: Sequence[str],
    env: Mapping[str, str],
    configs_dir: str | os.PathLike | None = None,
    working_dir: str | os.PathLike = REPO_ROOT,
    check_config: bool = True,
) -> dict:
    """Keyword arguments for ``JobSubmissionClient.submit_job``.

    ``command_args`` is ``[command, key=value, ...]``; the entrypoint is
    ``toolkit <command> --config <profile file> <key=value ...>`` with the
    profile path relative to ``working_dir`` (the job's cwd on the cluster).
    ``env`` is the local environment; only ``PASSTHROUGH_ENV`` is read.
    ``configs_dir`` defaults to ``<working_dir>/launch/configs``.
    Raises ``SubmitError`` for anything that cannot run.
    """
    working_dir = Path(working_dir).resolve()
    configs_dir = Path(configs_dir) if configs_dir is not None else working_dir / "launch" / "configs"
    if not command_args:
        raise SubmitError(f"no toolkit command given (one of: {', '.join(COMMANDS)})")
    command, *overrides = command_args
    if command not in COMMANDS:
        raise SubmitError(f"unknown toolkit command {command!r} (one of: {', '.join(COMMANDS)})")
    for arg in overrides:
        if arg == "--config" or arg.startswith("--config="):
            raise SubmitError("--config comes from --profile; pass further settings as key=value")
        if "=" not in arg or arg.startswith("-"):
            raise SubmitError(f"expected key=value after the command, got {arg!r} "
                              "(options too: e.g. run.backend=ray instead of --backend ray)")
        if _redaction().holds_secret(arg):
            # the entrypoint, like the runtime_env, is stored by the cluster and shown in its dashboard
            raise SubmitError(f"{_redaction().redact(arg)}: the value carries credentials; refusing to put "
                              "them in the job's entrypoint, give the cluster's nodes their own (for s3://, "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role)")

    profile_path = _profile_path(profile, configs_dir, working_dir)
    if check_config:
        _check_config(profile_path, list(overrides))
    config_arg = profile_path.resolve().relative_to(working_dir).as_posix()
    entrypoint = shlex.join(["toolkit", command, "--config", config_arg, *overrides])

    return {
        "entrypoint": entrypoint,
        "runtime_env": {
            "working_dir": str(working_dir),
            "excludes": list(WORKING_DIR_EXCLUDES),
            "env_vars": _passthrough_env(env),
        },
        "metadata": {"profile": profile, "command": command},
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit `toolkit <command> --config launch/configs/<profile>.yaml [key=value ...]` as a Ray job.",
        epilog="example: python launch/submit.py --address http://127.0.0.1:8265 --profile gpu -- pretrain ray.num_workers=4",
    )
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS,
                   help=f"Ray dashboard / Jobs API address (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--profile", required=True, help="run profile: launch/configs/<profile>.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the job (entrypoint, runtime_env) as JSON; submit nothing")
    p.add_argument("--follow", action="store_true", help="tail the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--configs-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--working-dir", default=str(REPO_ROOT), help=argparse.SUPPRESS)
    p.add_argument("toolkit_args", nargs="*", metavar="COMMAND [key=value ...]",
                   help=f"toolkit command ({', '.join(COMMANDS)}) and overrides, after --")
    return p


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options before the first ``--``, the toolkit command after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _print(text: str, end: str = "\n", file=None) -> None:
    """Every line this script prints, credentials masked (an address, an error or a job's log may quote one)."""
    print(_redaction().redact(text), end=end, file=file or sys.stdout, flush=True)


def _follow(client, job_id: str) -> str:
    """Print the job's logs as they come; return its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            _print(lines, end="")

    asyncio.run(tail())
    # The log stream can end (e.g. a dropped tunnel) before the job does.
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(2.0)
        status = client.get_job_status(job_id)
    return str(status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    ours, theirs = _split_argv(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(ours)
    try:
        spec = build_job_spec(args.profile, [*args.toolkit_args, *theirs], os.environ,
                              configs_dir=args.configs_dir, working_dir=args.working_dir)
    except SubmitError as e:
        parser.exit(2, _redaction().redact(f"{parser.prog}: error: {e}\n"))

    if args.dry_run:
        _print(json.dumps(spec, indent=2))
        return 0

    forwarded = sorted(spec["runtime_env"]["env_vars"])
    if forwarded:
        _print(f"forwarding {', '.join(forwarded)} to the job (must be valid on the cluster)", file=sys.stderr)

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = client.submit_job(**spec)
    except (ConnectionError, RuntimeError) as e:
        _print(f"{parser.prog}: error: cannot submit to {args.address}: {str(e).splitlines()[0]} "
               "(is `ray dashboard ray_cluster.yaml` running?)", file=sys.stderr)
        return 1
    _print(f"submitted {job_id}: {spec['entrypoint']}", file=sys.stderr)

    if not args.follow:
        _print(f"  logs:   ray job logs {job_id} --address {args.address} --follow\n"
               f"  status: ray job status {job_id} --address {args.address}\n"
               f"  stop:   ray job stop {job_id} --address {args.address}", file=sys.stderr)
        _print(job_id)
        return 0
    try:
        status = _follow(client, job_id)
    except KeyboardInterrupt:
        _print(f"\nstopped following; the job keeps running (ray job stop {job_id} --address {args.address})",
               file=sys.stderr)
        return 130
    _print(f"job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    # Run as a script, sys.path[0] is launch/: make this checkout's toolkit
    # importable for the local config check even when it is not installed.
    sys.path.insert(1, str(REPO_ROOT))
    sys.exit(main())
