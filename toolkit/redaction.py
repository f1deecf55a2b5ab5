"""The one place that decides what a credential looks like and masks it.

Everything the toolkit shows, logs or stores goes through here: MLflow params and tags,
``config.yaml``, the config inside every checkpoint and model file, each error line, the
``TOOLKIT_TRACEBACK=1`` traceback and what ``launch/submit.py`` prints. Two forms are
recognised in any text:

- a URI's user part, ``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``;
- a query parameter whose name holds a secret word, ``?token=abc`` -> ``?token=***``
  (``sig``, ``X-Amz-Signature``, ``X-Amz-Credential``, ``access_token``, ``password``, ...).

A param whose *name* holds a secret word is masked whole. What a command needs to run (the
real ``ray.storage_path``) comes from the command line each time, never from a stored copy.
Imports nothing but ``re``: ``launch/submit.py`` uses it where torch is not installed.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Lower-case fragments of names whose values are secrets: query parameters, MLflow param names.
SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "key", "auth", "credential", "signature", "sig",
                "session")

# scheme://<user part>@: up to the last "@" of the same run of non-blank characters (a password
# may hold an unencoded "@" or "/"), without reaching into a second URI
_USER_PART = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:(?!://)\S)*@")
# ?name=value, &name=value or ;name=value where the name holds a secret word; the value ends at
# the next parameter, fragment, blank, quote or closing bracket (an error line quotes URIs with
# repr or in brackets; tokens and signatures are hex, base64 or percent-encoded)
_SECRET_PARAM = re.compile(r"([?&;][^=&#?\s]*(?:" + "|".join(SECRET_WORDS) + r")[^=&#?\s]*=)[^&;#\s'\")\]>]*",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URI user parts and secret query values masked; safe to print, log or store."""
    return _SECRET_PARAM.sub(r"\1" + MASK, _USER_PART.sub(r"\1" + MASK + "@", text))


def holds_secret(text: str) -> bool:
    """Whether ``redact`` would mask anything in ``text``."""
    return redact(text) != text


def is_secret_name(name: str) -> bool:
    """Whether a param or variable called ``name`` holds a secret by its name (``api_key``, ``db_password``)."""
    low = name.lower()
    return any(word in low for word in SECRET_WORDS)


def redact_tree(obj: Any) -> Any:
    """``obj`` (nested dicts, lists and tuples) with every string redacted; other values (tensors) as they are."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(redact_tree(v) for v in obj)
    return obj
