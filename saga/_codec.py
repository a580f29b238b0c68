"""Turning inputs and step results into JSON text for Postgres, and back, exactly.

A payload is stored only if reading it back gives the value the user handed over: pydantic
alone would quietly write NaN as ``null``, a ``SecretStr`` as ``'**********'``, a model
with aliases in a shape its own validation refuses, and a dict where a model is declared.
So :func:`encode` serializes, decodes the text again with the same type, and compares;
a value that does not survive is refused with an error naming where it differs, before
anything is written. Payloads are stored as text (not ``jsonb``, which rewrites numbers
and key order), so what was checked is what is read.

Serializations tried, in order (the first that survives wins; :func:`decode` reads both):

1. pydantic's JSON mode, by alias: custom serializers, dates, decimals, UUIDs, enums;
2. pydantic's Python mode, by alias, with secrets revealed: models holding ``SecretStr``
   and friends (secrets are then stored in clear in Postgres; the README says so).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, Secret, SecretBytes, SecretStr, TypeAdapter, ValidationError

from saga._aio import is_cancellation
from saga._compare import difference, same_json
from saga._errors import (
    PayloadTooLargeError,
    SerializationError,
    describe_exception,
)

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

M = TypeVar("M", bound=BaseModel)

_MAX_DEPTH = 100
_SECRETS = (SecretStr, SecretBytes, Secret)


@lru_cache(maxsize=512)
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def unusable_type(annotation: Any) -> str | None:
    """Why pydantic cannot store and read back values of ``annotation`` (a
    ``typing.TypedDict`` before Python 3.12, an arbitrary class ...), or None."""
    try:
        _adapter(annotation)
    except Exception as exc:  # pydantic's schema errors, an unhashable annotation ...
        return describe_exception(exc)
    return None


def _check_raw(value: Any, path: str, depth: int) -> None:
    """Reject values that no serialization stores faithfully (NaN, bytes, NUL), naming
    where they sit. Anything else (datetime, UUID, Decimal, enums, arbitrary objects) is
    left to pydantic, which serializes the known types and refuses the rest; the round
    trip then proves the result."""
    kind = type(value)
    if kind is int or kind is bool or value is None:
        return  # the common results, checked without a walk
    if depth > _MAX_DEPTH:
        raise SerializationError(f"{path}: nested more than {_MAX_DEPTH} levels deep")
    _check_leaf(value, path)
    if kind is str or kind is float:
        return
    for child_path, child in _children(value, path):
        _check_raw(child, child_path, depth + 1)


def _check_leaf(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise SerializationError(f"{path}: {value!r} cannot be stored as JSON")
    if isinstance(value, str):
        _check_str(value, path)
    elif isinstance(value, bytes | bytearray | memoryview):
        raise SerializationError(
            f"{path}: bytes cannot be stored as JSON; encode them (e.g. base64) into a str"
        )
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise SerializationError(f"{path}: mapping key {key!r} is not a str")
            _check_str(key, f"{path}[{key!r}]")


def _children(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of what a container holds; nothing for a leaf."""
    if isinstance(value, Mapping):
        yield from ((f"{path}[{key!r}]", item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        yield from ((f"{path}[{index}]", item) for index, item in enumerate(value))
    elif isinstance(value, set | frozenset):  # a declared set type round-trips
        yield from ((f"{path}[...]", item) for item in value)
    elif isinstance(value, BaseModel):
        yield from ((f"{path}.{name}", getattr(value, name)) for name in type(value).model_fields)
        yield from ((f"{path}.{name}", item) for name, item in (value.model_extra or {}).items())
    elif isinstance(value, _SECRETS):
        yield f"{path}(secret)", value.get_secret_value()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from ((f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))


def _check_str(value: str, path: str) -> None:
    if "\x00" in value:
        raise SerializationError(f"{path}: strings with NUL characters cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(f"{path}: string is not valid Unicode ({exc.reason})") from exc


def _dumps(plain: Any) -> str:
    return json.dumps(plain, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _as_json(adapter: TypeAdapter[Any], value: Any, by_alias: bool) -> str:
    return _dumps(adapter.dump_python(value, mode="json", by_alias=by_alias, warnings="error"))


def _revealed(value: Any) -> Any:
    """A Python-mode dump made JSON-able, with secrets replaced by their values."""
    if isinstance(value, _SECRETS):
        return _revealed(value.get_secret_value())
    if isinstance(value, dict):
        return {_key(k): _revealed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_revealed(v) for v in value]
    return pydantic_core.to_jsonable_python(value)


def _key(key: Any) -> str:
    plain = pydantic_core.to_jsonable_python(key)
    if isinstance(plain, bool) or not isinstance(plain, str | int | float):
        raise SerializationError(f"mapping key {key!r} has no JSON form")
    return plain if isinstance(plain, str) else _dumps(plain)


def _as_revealed_json(adapter: TypeAdapter[Any], value: Any, by_alias: bool) -> str:
    plain = adapter.dump_python(value, mode="python", by_alias=by_alias, warnings="error")
    return _dumps(_revealed(plain))


# Tried in order; the first whose text reads back as the value wins. By alias first (what
# validation expects by default), by field name for models whose validation and
# serialization aliases differ but that accept names (populate_by_name).
_SERIALIZATIONS: tuple[tuple[Callable[[TypeAdapter[Any], Any, bool], str], bool], ...] = (
    (_as_json, True),
    (_as_revealed_json, True),
    (_as_json, False),
    (_as_revealed_json, False),
)


def encode(
    value: Any,
    annotation: Any = Any,
    *,
    what: str = "value",
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> str:
    """Serialize ``value`` to a JSON text that :func:`decode` turns back into it.

    ``annotation`` is the declared type (a step's return annotation or the saga's input
    model). Raises :class:`SerializationError` (naming ``what`` and where in the value)
    when no serialization survives the round trip, and :class:`PayloadTooLargeError`
    above ``max_bytes``. Never raises anything else, whatever the value does.
    """
    return encode_checked(value, annotation, what=what, max_bytes=max_bytes)[0]


def encode_checked(
    value: Any,
    annotation: Any = Any,
    *,
    what: str = "value",
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[str, Any]:
    """:func:`encode`, also returning the value as :func:`decode` reads it back."""
    try:
        return _encode(value, annotation, what, max_bytes)
    except SerializationError:
        raise
    except BaseException as exc:  # a value whose own methods raise (iteration, __eq__ ...)
        if is_cancellation(exc):
            raise
        raise SerializationError(
            f"{what}: cannot be serialized: {describe_exception(exc)}"
        ) from exc


def _encode(value: Any, annotation: Any, what: str, max_bytes: int) -> tuple[str, Any]:
    _check_raw(value, what, 0)
    kind = type(value)
    if (kind is int or kind is str or kind is bool) and (annotation is kind or annotation is Any):
        # The common results, whose JSON reads back exactly as they are: no adapter.
        text = _dumps(value)
        if len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:
            raise PayloadTooLargeError(
                f"{what}: {len(text.encode('utf-8'))} bytes of JSON is above the limit of "
                f"{max_bytes} bytes (max_payload_bytes)"
            )
        return text, value
    adapter = _adapter(annotation)
    expected = _expected(adapter, annotation, value, what)
    problems: list[str] = []
    for serialize, by_alias in _SERIALIZATIONS:
        try:
            text = serialize(adapter, value, by_alias)
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            where = _unserializable(value, "")
            problems.append(f"{where}: {describe_exception(exc)}" if where else str(exc))
            continue
        size = len(text.encode("utf-8"))
        if size > max_bytes:
            raise PayloadTooLargeError(
                f"{what}: {size} bytes of JSON is above the limit of {max_bytes} bytes "
                "(max_payload_bytes)"
            )
        decoded, problem = _round_trip(annotation, expected, text)
        if problem is None:
            return text, decoded
        problems.append(problem)
    raise SerializationError(f"{what}: cannot be stored and read back unchanged: {problems[0]}")


def _expected(adapter: TypeAdapter[Any], annotation: Any, value: Any, what: str) -> Any:
    """What reading the value back must give: the value as its declared type, which must
    be the value handed over (an enum where an int is declared, a key a TypedDict does
    not have, a validator changing it: refused, not altered; an int where a float is
    declared is fine)."""
    if annotation is Any:
        return value
    declared = getattr(annotation, "__name__", None) or repr(annotation)
    try:
        expected = adapter.validate_python(value)
    except Exception as exc:  # a validator may raise anything (pydantic passes it on)
        raise SerializationError(
            f"{what}: a {type(value).__name__} does not match the declared type "
            f"{declared}: {_first_error(exc)}"
        ) from exc
    if expected is not value:
        changed = difference(value, expected, "", widened=True)
        if changed is not None:
            raise SerializationError(
                f"{what}: the declared type {declared} would change it ({changed}): return "
                "the value as declared"
            )
    return expected


def _round_trip(annotation: Any, expected: Any, text: str) -> tuple[Any, str | None]:
    """The value read back from ``text``, and what differs from ``expected`` (or None)."""
    try:
        decoded = decode(text, annotation)
    except Exception as exc:  # a validator may raise anything (pydantic passes it on)
        return None, f"the stored form does not validate again: {_first_error(exc)}"
    where = difference(expected, decoded, "")
    if where is None and decoded != expected:
        where = "the value comes back different"
    if where is None:
        return decoded, None
    hint = (
        "; declare the type (a return annotation) so it can be read back as one"
        if annotation is Any
        else ""
    )
    return decoded, f"{where}{hint}"


def _unserializable(value: Any, path: str, depth: int = 0) -> str | None:
    """The path of the first leaf pydantic cannot serialize on its own, if one is found
    (only called once serialization failed, to say where)."""
    if depth > _MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, BaseModel):
        fields = {
            **{n: getattr(value, n) for n in type(value).model_fields},
            **(value.model_extra or {}),
        }
        items = ((f"{path}.{n}", v) for n, v in fields.items())
    else:
        try:
            pydantic_core.to_jsonable_python(value)
        except Exception:
            return path or "the value"
        return None
    for where, item in items:
        found = _unserializable(item, where, depth + 1)
        if found:
            return found
    return None


def _first_error(exc: Exception) -> str:
    """Where and why a validation failed (another exception: a validator's own)."""
    if not isinstance(exc, ValidationError):
        return f"a validator raised {describe_exception(exc)}"
    errors = exc.errors(include_url=False, include_input=False)
    if not errors:
        return str(exc)
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "value"
    return f"{where}: {first.get('msg', '')}"


def decode(text: str | None, annotation: Any = Any) -> Any:
    """Parse JSON text stored by :func:`encode` and validate it into ``annotation``."""
    if text is None:
        return None
    if annotation is Any:
        return json.loads(text)
    return _adapter(annotation).validate_json(text)


class Unreadable:
    """A stored payload that no longer decodes: using it fails the attempt, clearly."""

    __slots__ = ("error",)

    def __init__(self, error: SerializationError) -> None:
        self.error = error

    def check(self) -> None:
        raise self.error

    def __getattr__(self, name: str) -> Any:
        """A step reading a field of it (``ctx.result(wait).approved``) gets the reason
        (a SerializationError), not an AttributeError about this class."""
        raise self.error


def decode_stored(text: str | None, annotation: Any, what: str) -> Any:
    """:func:`decode`, or an :class:`Unreadable` saying why the stored ``what`` no longer
    reads as its declared type (the definition changed under a matching fingerprint)."""
    try:
        return decode(text, annotation)
    except BaseException as exc:  # a validator may raise anything, BaseExceptions included
        why = describe_exception(exc)
        return Unreadable(
            SerializationError(f"the stored {what} no longer reads as its declared type: {why}")
        )


def check_readable(value: Any) -> None:
    if isinstance(value, Unreadable):
        value.check()


def same_input(stored: str, given: str, model: BaseModel) -> bool:
    """Whether a stored input (JSON) is the input ``model`` (encoded as ``given``): the
    same JSON, or, read back as the model's type, equal to it with the same types all
    the way down (a set written in another order is the same set)."""
    if same_json(stored, given):
        return True
    try:
        other = decode(stored, type(model))
    except Exception:
        return False
    return difference(model, other, "") is None
