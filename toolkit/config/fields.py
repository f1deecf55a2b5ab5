"""How a config section is written: a field with its help text, a check that names the key,
the error both raise, and the limits several sections share.

Kept apart from the sections so every other part of the config package (parsing, the
cross-section checks) can raise the same ``ConfigError`` without importing the dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the key."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text (shown by ``toolkit CMD --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, key: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids: uuid4 hex
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_SEED = 2**32 - 1  # numpy and sklearn take seeds below 2**32
