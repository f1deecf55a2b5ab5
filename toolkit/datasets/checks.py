"""The package's one error type and the checks every reader shares (class names, target size).

``DataError`` is recognised by ``toolkit.errors`` by its name, so each one reaches the CLI as
one line and exit 2. ``toolkit.datasets.mnist`` can re-export it (``from .datasets.checks import
DataError``) so that both packages raise the same class.
"""

from __future__ import annotations

import re

# a class name becomes a folder name, a file name and part of an MLflow metric name
# (``test/recall_<class>``): ASCII letters, digits, ``_ . -`` and inner spaces only
_CLASS_NAME = re.compile(r"^[A-Za-z0-9_-](?:[A-Za-z0-9_. -]{0,62}[A-Za-z0-9_-])?$")
MAX_IMAGE_SIZE = 1024


class DataError(RuntimeError):
    """A missing, unreadable or malformed dataset; the message names the file, folder or class."""


def check_class_names(names: tuple[str, ...], where: str) -> None:
    """Raise DataError unless every name is a valid file and metric name and no two differ only in case.

    ``where`` says where the names came from (a folder, an array key) for the message.
    """
    for name in names:
        if not _CLASS_NAME.match(name):
            raise DataError(
                f"class name {name!r} in {where} is not a valid file or metric name: use 1-64 ASCII letters, "
                "digits, '_', '-', '.' or inner spaces, starting and ending with a letter, digit, '_' or '-'"
            )
    folded: dict[str, str] = {}
    for name in names:
        other = folded.setdefault(name.lower(), name)
        if other != name:
            raise DataError(f"class names {other!r} and {name!r} in {where} differ only in case "
                            "(they would share one file on a case-insensitive disk): rename one")


def check_target(image_size: int | None, channels: int | None) -> None:
    """Raise DataError unless a stated ``data.image_size`` / ``data.channels`` is possible."""
    if image_size is not None and not (isinstance(image_size, int) and 1 <= image_size <= MAX_IMAGE_SIZE):
        raise DataError(f"data.image_size={image_size!r} is not allowed: give an integer from 1 to {MAX_IMAGE_SIZE}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"data.channels={channels!r} is not allowed: give 1 (grayscale) or 3 (colour)")
