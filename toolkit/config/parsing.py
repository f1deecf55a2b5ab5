"""Reading a config: defaults <- YAML file <- ``key=value`` arguments, each value coerced to its
field's type (and writing one back as YAML).

Every failure is one ``ConfigError`` line naming the key or the file, never a traceback: these
inputs come straight from the user.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .fields import ConfigError
from .study import Config, all_keys


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named; ConfigError (one line naming ``what`` and the path) otherwise.

    Missing, a folder, unreadable (permissions) or not UTF-8: each is one line, never a traceback.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} is not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(p)!r} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                          f"({e.reason})") from None



def _yaml_problem(e: Exception) -> str:
    """A YAML error as one line: what is wrong and where (line, column)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    text = problem or (str(e).strip().splitlines() or [type(e).__name__])[0]
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(text.split())


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a YAML / command-line value to the type of the field's default."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {value!r}: {_yaml_problem(e)}") from None
        except RecursionError:
            raise ConfigError(f"{key}: cannot parse {value[:40]!r}...: nested too deeply") from None
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 and 3e-4 as strings
        except ValueError:
            pass
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{key}={value!r} is not allowed: expected an integer")
        if abs(value) >= 2**63:
            raise ConfigError(f"{key}={value!r} is not allowed: out of range")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{key}={value!r} is not allowed: out of range") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not allowed: must be a finite number")
        return value
    if isinstance(default, str):
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a string")
        return str(value)
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    return value


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with dotted-key overrides applied, type-checked and validated."""
    keys = all_keys()
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key not in keys:
            raise _unknown(key)
        section, name = key.split(".", 1)
        current = getattr(getattr(cfg, section), name)
        sections.setdefault(section, {})[name] = _coerce(key, value, current)
    changes = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()}
    return dataclasses.replace(cfg, **changes).validate()


def flatten_yaml(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``{"pretrain": {"epochs": 3}}`` -> ``{"pretrain.epochs": 3}``)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config file: expected a mapping at '{prefix or 'top level'}', got {type(tree).__name__}")
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_yaml(v, key))
        else:
            out[key] = v
    return out


def parse_assignments(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r} (e.g. pretrain.epochs=5)")
        k, v = a.split("=", 1)
        out[k.strip()] = v
    return out


def load_config(path: str | os.PathLike | None = None, assignments: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults <- YAML overrides (``path``) <- ``key=value`` assignments; validated."""
    cfg = base or Config()
    overrides: dict[str, Any] = {}
    if path:
        p = Path(path)
        text = read_text_file(p, "config file")
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
        except RecursionError:
            raise ConfigError(f"config file {str(p)!r} is not allowed: nested too deeply") from None
        overrides.update(flatten_yaml(tree))
    overrides.update(parse_assignments(assignments or []))
    return apply_overrides(cfg, overrides)



def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from ``to_dict()`` output (checkpoints, MLflow artifacts)."""
    return apply_overrides(Config(), flatten_yaml(d))


def to_yaml(cfg: Config, only_changed: bool = False) -> str:
    d = cfg.to_dict()
    if only_changed:
        default = Config().to_dict()
        d = {s: {k: v for k, v in kv.items() if default[s][k] != v} for s, kv in d.items()}
        d = {s: kv for s, kv in d.items() if kv}
    return yaml.safe_dump(d, sort_keys=False)

