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

from toolkit.config.fields import ConfigError
from toolkit.config.study import Config, all_keys


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



class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (the same safe tags) that refuses a key given twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, so ``epochs: 3`` above a later
    ``epochs: 30`` would be lost silently. Keys brought in by a merge (``<<: *base``) may
    still be overridden: only the keys written in the mapping itself are compared.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    seen = key in first_line
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {first_line[key]} and {line}); keep one")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` for a key given twice in one mapping."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass: safe_load's tags only


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


def apply_overrides(cfg, overrides: dict[str, Any]):
    """Return ``cfg`` (a ``Config``, ``Study`` or ``Execution``) with dotted-key overrides applied,
    type-checked and validated."""
    keys = all_keys(type(cfg))
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
        inner = flatten_yaml(v, key) if isinstance(v, dict) else {key: v}
        for dotted in inner:  # `pretrain: {epochs: 3}` and `pretrain.epochs: 4` name one key
            if dotted in out:
                raise ConfigError(f"config file: key '{dotted}' is given twice; keep one")
        out.update(inner)
    return out


def _assignment_pairs(args: list[str]) -> list[tuple[str, str]]:
    """``key=value`` arguments -> (key, value) pairs in order, repeats kept."""
    out = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r} (e.g. pretrain.epochs=5)")
        k, v = a.split("=", 1)
        out.append((k.strip(), v))
    return out


def parse_assignments(args: list[str]) -> dict[str, str]:
    return dict(_assignment_pairs(args))


def _read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file of overrides -> its dotted keys; one ConfigError line naming the file otherwise."""
    p = Path(path)
    text = read_text_file(p, "config file")
    try:
        tree = safe_load_unique(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is not allowed: nested too deeply") from None
    try:
        return flatten_yaml(tree)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config file:", f"config file {str(p)!r}:", 1)) from None


def load_config(path: str | os.PathLike | None = None, assignments: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults <- YAML overrides (``path``) <- ``key=value`` assignments; validated.

    A key given again later wins, but every value given is validated (in the final config),
    so a bad ``run.backend=gpu`` is not hidden by a later ``--backend local``.
    """
    cfg = base or Config()
    given: list[tuple[str, Any, str]] = []  # (key, value, where), in the order they were given
    if path:
        given += [(k, v, f"in config file {str(Path(path))!r}") for k, v in _read_config_file(path).items()]
    given += [(k, v, "on the command line") for k, v in _assignment_pairs(assignments or [])]
    overrides = {k: v for k, v, _ in given}  # the last value of a key wins
    final = apply_overrides(cfg, overrides)
    for i, (key, value, where) in enumerate(given):
        if any(k == key for k, _, _ in given[i + 1:]):  # overridden later: still checked, in the final config
            try:
                apply_overrides(cfg, {**overrides, key: value})
            except ConfigError as e:
                raise ConfigError(f"{e} (given {where}, overridden by a later value; each value given must be "
                                  "valid)") from None
    return final



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

