"""Turning inputs and step results into JSON for Postgres, and back, without silent loss.

pydantic alone would quietly write NaN as ``null`` and bytes as a string that decodes to
``str``; Postgres ``jsonb`` rejects ``\\u0000``. A value that cannot make the round trip
is refused here with an error naming where in the value the problem sits, before
anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import pydantic_core
from pydantic import BaseModel, TypeAdapter

from saga._errors import PayloadTooLargeError, SerializationError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

_MAX_DEPTH = 100


@lru_cache(maxsize=512)
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def _check_raw(value: Any, path: str, depth: int) -> None:
    """Reject values that pydantic would serialize lossily (NaN, bytes, sets)."""
    if depth > _MAX_DEPTH:
        raise SerializationError(f"{path}: nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SerializationError(f"{path}: {value!r} cannot be stored as JSON")
        return
    if isinstance(value, str):
        _check_str(value, path)
        return
    if isinstance(value, bytes | bytearray | memoryview):
        raise SerializationError(
            f"{path}: bytes cannot be stored as JSON; encode them (e.g. base64) into a str"
        )
    if isinstance(value, set | frozenset):
        raise SerializationError(f"{path}: a set has no JSON form; use a sorted list")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SerializationError(f"{path}: mapping key {key!r} is not a str")
            _check_str(key, f"{path}[{key!r}]")
            _check_raw(item, f"{path}[{key!r}]", depth + 1)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_raw(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _check_raw(getattr(value, name), f"{path}.{name}", depth + 1)
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _check_raw(getattr(value, field.name), f"{path}.{field.name}", depth + 1)
        return
    # Anything else (datetime, UUID, Decimal, enums, arbitrary objects) is left to
    # pydantic, which serializes the known types and refuses the rest.


def _check_str(value: str, path: str) -> None:
    if "\x00" in value:
        raise SerializationError(f"{path}: strings with NUL characters cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(f"{path}: string is not valid Unicode ({exc.reason})") from exc


def encode(
    value: Any,
    annotation: Any = Any,
    *,
    what: str = "value",
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """Serialize ``value`` to a JSON text that decodes back to an equal value.

    ``annotation`` is the declared type (a step's return annotation or the saga's input
    model); pydantic uses it to serialize models, dates, UUIDs and so on.
    """
    _check_raw(value, what, 0)
    try:
        plain = _adapter(annotation).dump_python(value, mode="json")
    except pydantic_core.PydanticSerializationError as exc:
        raise SerializationError(
            f"{what}: {type(value).__name__} cannot be serialized to JSON: {exc}"
        ) from exc
    try:
        text = json.dumps(plain, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what}: cannot be serialized to JSON: {exc}") from exc
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"{what}: {size} bytes of JSON is above the limit of {max_bytes} bytes "
            "(max_payload_bytes)"
        )
    return text


def decode(text: str | None, annotation: Any = Any) -> Any:
    """Parse JSON stored by :func:`encode` and validate it into ``annotation``."""
    if text is None:
        return None
    plain = json.loads(text)
    if annotation is Any:
        return plain
    return _adapter(annotation).validate_python(plain)
