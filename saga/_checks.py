"""Argument checks shared by definitions and the runtime.

Every setting a user can pass is checked where it is given, with an error that names the
setting: a value that cannot work (NaN, an infinity, a fraction of an attempt, a number
beyond what Postgres stores) must fail at once, never later inside a loop of a worker.
"""

from __future__ import annotations

import math
from typing import Any

#: Postgres ``integer`` columns (saga version, attempt numbers) hold at most this.
MAX_INT32 = 2**31 - 1


def seconds(
    name: str,
    value: Any,
    error: type[Exception],
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    allow_zero: bool = False,
) -> float:
    """A finite number of seconds in ``[minimum, maximum]`` (``> 0`` unless allow_zero)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise error(f"{name} must be a finite number of seconds, got {value!r}")
    if value < minimum or (value == 0 and not allow_zero) or value > maximum:
        low = f">= {minimum:g}" if allow_zero or minimum > 0 else "> 0"
        high = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise error(f"{name} must be {low}{high} seconds, got {value!r}")
    return float(value)


def integer(
    name: str, value: Any, error: type[Exception], *, minimum: int, maximum: int = MAX_INT32
) -> int:
    """An ``int`` (not a bool, not a float) within ``[minimum, maximum]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{name} must be an int, got {value!r}")
    if not minimum <= value <= maximum:
        raise error(f"{name} must be from {minimum} to {maximum}, got {value!r}")
    return value


def text(name: str, value: Any, error: type[Exception], *, max_length: int) -> str:
    """A non-empty str that Postgres can store: no NUL, valid Unicode (no lone surrogate)."""
    if not isinstance(value, str) or not value:
        raise error(f"{name} must be a non-empty str, got {value!r}")
    if len(value) > max_length:
        raise error(f"{name} must be at most {max_length} characters, got {len(value)}")
    if "\x00" in value:
        raise error(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{name} is not valid Unicode (it holds a lone surrogate)") from None
    return value
