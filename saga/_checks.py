"""Argument checks shared by definitions and the runtime.

Every setting a user can pass is checked where it is given, with an error that names the
setting: a value that cannot work (NaN, an infinity, a fraction of an attempt, a number
beyond what Postgres stores) must fail at once, never later inside a loop of a worker.
"""

from __future__ import annotations

import inspect
import math
import re
import uuid
from collections.abc import Iterable
from typing import Any

from saga._errors import DefinitionError

#: Postgres ``integer`` columns (saga version, attempt numbers) hold at most this.
MAX_INT32 = 2**31 - 1
#: The longest age or time shift accepted (1,000 years): Postgres' timestamps reach back
#: to 4713 BC, and a filter beyond them would fail in the database instead.
MAX_AGE_SECONDS = 1000 * 365.25 * 86400


def show(value: Any) -> str:
    """``repr(value)``, short and safe (an int of 5,000 digits cannot even be printed)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else "<?>"
    return text if len(text) <= 80 else text[:77] + "..."


def run_id(value: Any, error: type[Exception]) -> uuid.UUID:
    """A run id: a UUID, or its text."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise error(f"not a run id (a UUID): {show(value)}")


def finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def seconds(
    name: str,
    value: Any,
    error: type[Exception],
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    allow_zero: bool = False,
    unit: str = "seconds",
) -> float:
    """A finite number of seconds (or of ``unit``) in ``[minimum, maximum]`` (``> 0``
    unless allow_zero)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not finite(value):
        raise error(f"{name} must be a finite number of {unit}, got {show(value)}")
    if value < minimum or (value == 0 and not allow_zero) or value > maximum:
        low = f">= {minimum:g}" if allow_zero or minimum > 0 else "> 0"
        high = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise error(f"{name} must be {low}{high} {unit}, got {show(value)}")
    return float(value)


def integer(
    name: str, value: Any, error: type[Exception], *, minimum: int, maximum: int = MAX_INT32
) -> int:
    """An ``int`` (not a bool, not a float) within ``[minimum, maximum]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{name} must be an int, got {show(value)}")
    if not minimum <= value <= maximum:
        raise error(f"{name} must be from {minimum} to {maximum}, got {show(value)}")
    return value


def flag(name: str, value: Any, error: type[Exception]) -> bool:
    """A ``bool``: a truthy stand-in (``"false"``, ``0``, ``None``) must not silently turn
    a setting on or off."""
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool, got {show(value)}")
    return value


def text(name: str, value: Any, error: type[Exception], *, max_length: int) -> str:
    """A non-empty str that Postgres can store: no NUL, valid Unicode (no lone surrogate)."""
    if not isinstance(value, str) or not value:
        raise error(f"{name} must be a non-empty str, got {show(value)}")
    if len(value) > max_length:
        raise error(f"{name} must be at most {max_length} characters, got {len(value)}")
    if "\x00" in value:
        raise error(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{name} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def who(name: str, value: Any, error: type[Exception], *, max_length: int) -> str:
    """Who acted, as history records it: :func:`text`, and not blank (no one to name)."""
    checked = text(name, value, error, max_length=max_length)
    if not checked.strip():
        raise error(f"{name} must name someone, got a blank str")
    return checked


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")


def is_name(value: str) -> bool:
    """Whether a saga, step, wait or schedule could be named ``value``."""
    return bool(_NAME_RE.fullmatch(value))


def validate_name(name: str, what: str) -> str:
    """Names are stored as data, but they also appear in logs, CLIs and metrics."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise DefinitionError(
            f"invalid {what} name {show(name)}: use 1-128 characters, letters, digits, "
            "'_', '.', ':' or '-', starting with a letter or '_'"
        )
    return name


def takes(fn: Any, params: int, what: str, expected: str | None = None) -> None:
    """``fn`` can be called with ``params`` positional arguments, as saga calls it: a
    :class:`DefinitionError` naming ``what`` otherwise (a required keyword-only
    parameter, say, could never be given), at definition rather than in a run."""
    try:  # the function as called (a decorator's wrapper may supply arguments itself)
        sig = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):  # builtins without a signature: called as they are
        return
    try:
        sig.bind(*range(params))
    except TypeError as exc:
        expected = expected or ("(ctx)" if params == 1 else "(ctx, result)")
        raise DefinitionError(
            f"{what} must take {expected} (saga calls it so), and it cannot be called so: {exc}"
        ) from None


def providers(tracer_provider: Any, meter_provider: Any, error: type[Exception]) -> None:
    """OpenTelemetry providers (or None), not something that fails at the first span."""
    for name, provider, method in (
        ("tracer_provider", tracer_provider, "get_tracer"),
        ("meter_provider", meter_provider, "get_meter"),
    ):
        if provider is not None and not callable(getattr(provider, method, None)):
            kind = name.replace("_", " ")
            raise error(f"{name} must be an OpenTelemetry {kind} (or None), got {show(provider)}")


def sequence_of(name: str, value: Any, item: type, error: type[Exception]) -> list[Any]:
    """A list (any iterable but a string or a lone item) of ``item`` objects."""
    if isinstance(value, item | str | bytes) or not isinstance(value, Iterable):
        raise error(f"{name} must be a list of {item.__name__} objects, got {show(value)}")
    values = list(value)
    for one in values:
        if not isinstance(one, item):
            raise error(f"{name} must hold {item.__name__} objects, got {show(one)}")
    return values
