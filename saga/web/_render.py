"""Rendering: the Jinja environment (autoescaping everything), the filters the
templates use, and payloads shown through the app's ``redact``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any

import jinja2

#: redact(path, value) -> what to show: path is "input", "result.<step>" or "output"
#: (payloads, decoded from JSON), or "error" (an error message, a str).
Redact = Callable[[str, Any], Any]


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("saga.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["age"] = age
    env.filters["seconds"] = seconds
    return env


def when(value: datetime | None) -> str:
    """A timestamp as operators read it: UTC, to the millisecond."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def seconds(value: float | None) -> str:
    """A duration: 12 ms, 3.40 s, 5 min 3 s, 2 h 5 min, 3 d 4 h."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.2f} s"
    whole = int(value)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def age(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago (or, for a future time, in how long)."""
    if value is None:
        return "-"
    delta = ((now or datetime.now(UTC)) - value).total_seconds()
    return f"{seconds(delta)} ago" if delta >= 0 else f"in {seconds(-delta)}"


def show_error(message: str, redact: Redact | None) -> str:
    """An error message as shown: through ``redact("error", message)`` when given."""
    if redact is None:
        return message
    return str(redact("error", message))


#: The most characters of one payload a page shows.
MAX_SHOWN = 64 * 1024


def show_payload(path: str, text: str | None, redact: Redact | None) -> str:
    """A payload's JSON text, decoded, redacted (when ``redact`` is given) and
    pretty-printed again; "-" when absent."""
    if text is None:
        return "-"
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    if redact is not None:
        value = redact(path, value)
    try:
        shown = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        shown = repr(value)
    if len(shown) > MAX_SHOWN:
        shown = shown[:MAX_SHOWN] + f"\n... ({len(shown) - MAX_SHOWN} more characters not shown)"
    return shown
