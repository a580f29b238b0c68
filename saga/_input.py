"""Inputs and signal payloads as callers give them: validated into their model
(:func:`validate_as`), then stored (:func:`encode_valid`), telling a model instance
that was never validated (``model_construct``, a field set after it was built: pydantic
takes instances as they are) from a value JSON cannot hold."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from saga._codec import encode
from saga._errors import (
    InvalidInputError,
    PayloadTooLargeError,
    SerializationError,
    describe_exception,
)

M = TypeVar("M", bound=BaseModel)

#: How deep a value is looked into for an instance never validated.
_MAX_DEPTH = 100


def validate_as(model: type[M], value: Any, what: str, *, from_json: bool = False) -> M:
    """``value`` (a model or a mapping; JSON text ``from_json``) validated into ``model``:
    :class:`InvalidInputError` naming ``what`` when it does not validate, or when one of
    its validators raises something else (pydantic passes all but ``ValueError`` on)."""
    try:
        if from_json:
            return model.model_validate_json(value)
        return model.model_validate(value)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {what}: {exc}") from exc
    except Exception as exc:
        raise InvalidInputError(
            f"invalid {what}: a validator raised {describe_exception(exc)}"
        ) from exc


def encode_valid(
    model: type[M], value: Any, what: str, stored_as: str, max_bytes: int
) -> tuple[M, str]:
    """``value`` validated into ``model`` (:func:`validate_as`) and its JSON (:func:`encode`).

    A model instance is taken as it is (pydantic does not validate instances again),
    unless it cannot be stored: then one whose own fields do not validate (built with
    ``model_construct``, or changed after it was built), anywhere in the value, is bad
    input (:class:`InvalidInputError` naming where), not a value JSON cannot hold."""
    validated = validate_as(model, value, what)
    try:
        return validated, encode(validated, model, what=stored_as, max_bytes=max_bytes)
    except PayloadTooLargeError:
        raise
    except SerializationError as exc:
        found = None
        with contextlib.suppress(Exception):  # a value whose own methods raise
            found = _unvalidated(value, "", 0)
        if found is not None:
            raise InvalidInputError(f"invalid {what}: {found}") from exc
        raise


def _unvalidated(value: Any, path: str, depth: int) -> str | None:
    """Where in ``value`` (mappings, lists, tuples, dataclasses, models: at any depth) a
    model instance holds fields that do not validate as its own, and why; None: none.
    Each instance is checked on the values it holds (not on what they serialize to: a
    valid instance that serializes to something else is not bad input)."""
    if depth > _MAX_DEPTH:
        return None
    held = _held(value)
    for key, item in held:
        found = _unvalidated(item, f"{path}.{key}" if path else str(key), depth + 1)
        if found is not None:
            return found
    if not isinstance(value, BaseModel):
        return None
    try:
        try:  # the fields by name (aliases aside: pydantic 2.11 and later)
            type(value).model_validate(dict(held), by_alias=False, by_name=True)
        except TypeError:
            type(value).model_validate(dict(held))
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in (path, *first["loc"]) if part != "")
        return f"{where}: {first['msg']}"
    return None


def _held(value: Any) -> list[tuple[Any, Any]]:
    """What ``value`` holds, by key: a model's fields (as set), a mapping's items, a
    sequence's or a dataclass's members; nothing for anything else."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return [(n, v) for n, v in vars(value).items() if n in fields]
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, list | tuple):
        return list(enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    return []
