"""Secret hygiene: parameters whose names look secret are replaced before anything writes them.

Redaction happens once, where parameters enter (`ig.train`'s `parameters`, a sink's `RunInfo`);
its result is a `Redacted` dict, which MLflow, args.json and checkpoint manifests receive as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECRET_WORDS = ("password", "secret", "token", "key", "credential")
REDACTED = "***"


def is_secret(name: str) -> bool:
    """Whether a parameter's name looks like it holds a secret (password, token, key, ...)."""
    n = name.lower()
    return any(w in n for w in SECRET_WORDS)


class Redacted(dict[str, Any]):
    """Parameters whose secret-looking values are replaced; only `redact` makes one, so holding one proves it."""


def redact(params: Mapping[str, Any]) -> Redacted:
    """A JSON-ready copy of `params` with secret-looking values replaced, safe to write anywhere."""
    if isinstance(params, Redacted):
        return params  # redacted where it entered
    return Redacted({k: (REDACTED if is_secret(k) and v not in (None, "") else _plain(v)) for k, v in params.items()})


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): (REDACTED if is_secret(str(k)) else _plain(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
