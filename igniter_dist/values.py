"""Text to typed values, for flags and SageMaker hyperparameters (which arrive as `--key value` strings).

Each parser is an argparse `type=`: it raises `argparse.ArgumentTypeError` with a message argparse
prefixes with the flag's name. Values already of the right type pass through, so options given
in Python are checked by the same functions (see `options.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(value: str | bool) -> bool:
    """Parse an explicit boolean (`true/false/True/False/1/0/yes/no`), as SageMaker passes them."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def positive_int(value: str | int) -> int:
    n = _number(int, value, "must be a positive integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return n


def non_negative_int(value: str | int) -> int:
    n = _number(int, value, "must be zero or a positive integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value!r}")
    return n


def positive_float(value: str | float) -> float:
    x = _number(float, value, "must be a positive number")
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value!r}")
    return x


def _number(kind: Callable[[str | float], N], value: str | float, rule: str) -> N:
    """`kind(value)`, or the rule the value breaks (argparse would say only "invalid int value")."""
    if isinstance(value, bool):  # True is an int to Python, never a count or a rate to a user
        raise argparse.ArgumentTypeError(f"{rule}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{rule}, got {value!r}") from None


def parse_tags(value: str | dict[str, str]) -> dict[str, str]:
    """Parse `k=v,k2=v2`."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    tags: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        tags[k.strip()] = v.strip()
    return tags
