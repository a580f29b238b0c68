"""Whether two payloads are the same value: what a round trip through JSON must give
back (:func:`difference`, types included all the way down), and whether two stored JSON
texts hold the same value (:func:`same_json`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, time, timedelta, tzinfo
from typing import Any

from pydantic import BaseModel

_SCALARS = frozenset({int, str, bool, type(None)})


def difference(a: Any, b: Any, path: str, *, widened: bool = False) -> str | None:
    """Where ``b`` differs from ``a`` (types included), or None when it does not.
    ``widened``: an int that became an equal float does not count (a declared ``float``
    takes ints, as a type checker does)."""
    if type(a) is type(b) and type(a) in _SCALARS and a == b:
        return None  # the common case, decided without walking
    where = path or "the value"
    if widened and type(a) is int and type(b) is float and a == b:
        return None
    if type(a) is not type(b):
        return f"{where}: a {type(a).__name__} comes back as a {type(b).__name__}"
    shape = _shape_change(a, b)
    if shape is not None:
        return f"{where}: {shape}"
    for child_path, x, y in _pairs(a, b, path):
        found = difference(x, y, child_path, widened=widened)
        if found:
            return found
    if a != b:
        return f"{where}: the {type(a).__name__} comes back different"
    if isinstance(a, datetime | time) and _offset(a.tzinfo) != _offset(b.tzinfo):
        return (
            f"{where}: its time zone {a.tzinfo} comes back as the fixed offset {b.tzinfo} "
            "(only offsets are stored: give it in UTC or a fixed offset)"
        )
    return None


def _offset(zone: tzinfo | None) -> timedelta | None:
    """A time zone's fixed offset (None: no zone, or one whose offset varies, such as
    ``ZoneInfo("Europe/Paris")``: equal instants in it and in its offset of the day
    still differ, an hour apart once its summer time starts)."""
    return None if zone is None else zone.utcoffset(None)


def _shape_change(a: Any, b: Any) -> str | None:
    if isinstance(a, BaseModel) and list(a.model_extra or {}) != list(b.model_extra or {}):
        return "its extra fields change"
    if isinstance(a, dict) and (list(a) != list(b) or list(map(type, a)) != list(map(type, b))):
        return "its keys change"
    if isinstance(a, list | tuple) and len(a) != len(b):
        return "its length changes"
    return None


def _pairs(a: Any, b: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, a's part, b's part) of two values of one shape."""
    if isinstance(a, BaseModel):
        for name in type(a).model_fields:
            yield f"{path}.{name}", getattr(a, name), getattr(b, name)
        extra_b = b.model_extra or {}
        for name, item in (a.model_extra or {}).items():
            yield f"{path}.{name}", item, extra_b[name]
    elif isinstance(a, dict):
        for key in a:
            yield f"{path}[{key!r}]", a[key], b[key]
    elif isinstance(a, list | tuple):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield f"{path}[{index}]", x, y


def same_json(a: str, b: str) -> bool:
    """Whether two stored JSON texts hold the same value: key order aside, but types not
    (``1``, ``1.0`` and ``true`` differ, as they would reach the steps differently)."""
    return a == b or _same(json.loads(a), json.loads(b))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
