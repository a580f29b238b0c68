"""The fingerprint of a saga definition: what a run's stored data depends on.

A run records the fingerprint of the definition it started with, and an orchestrator
executes only runs whose fingerprint it has. A definition whose steps, their order, their
result types or the input model changed without a version bump therefore never runs old
data through new code: such runs wait, counted and logged, for a worker that has their
definition.

The description is built from the structure of the stored data only (model fields, their
aliases and types, type arguments, enum values, step names and order), never from reprs,
JSON schemas or module paths, so that upgrading Python or pydantic, moving a model to
another module or running a module as ``__main__`` does not change the fingerprint of an
unchanged definition. Function bodies, retry policies and timeouts are not part of it:
changing them is a normal deploy.
"""

from __future__ import annotations

import enum
import hashlib
import json
import types
import typing
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from saga._definition import Saga

_UNIONS = (typing.Union, types.UnionType)


def _name(tp: Any) -> str:
    """A type's own name, without its module (where it is defined is not its shape)."""
    return str(getattr(tp, "__qualname__", None) or getattr(tp, "__name__", None) or tp)


def describe_type(tp: Any, _seen: frozenset[int] = frozenset()) -> Any:
    """A JSON-able, version-stable description of a type annotation."""
    if tp is Any:
        return "any"
    if tp is None or tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return describe_type(typing.get_args(tp)[0], _seen)
    if origin is typing.Literal:
        return ["literal", [repr(arg) for arg in typing.get_args(tp)]]
    if origin is not None:
        head = "union" if origin in _UNIONS else _name(origin)
        return [head, [describe_type(arg, _seen) for arg in typing.get_args(tp)]]
    if isinstance(tp, typing.TypeVar):
        return ["typevar", tp.__name__]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if id(tp) in _seen:  # a recursive model: refer to it, do not descend again
            return ["model-ref", _name(tp)]
        seen = _seen | {id(tp)}
        fields = [
            [
                name,
                field.alias or "",
                field.is_required(),
                describe_type(field.annotation, seen),
            ]
            for name, field in tp.model_fields.items()
        ]
        return ["model", fields]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ["enum", [repr(member.value) for member in tp]]
    return _name(tp)


def fingerprint(saga: Saga[Any]) -> str:
    """32 hex digits identifying the definition's stored-data contract."""
    description = {
        "saga": saga.name,
        "version": saga.version,
        "input": describe_type(saga.input_type),
        "steps": [
            [step.name, describe_type(step.result_type), step.compensation is not None]
            for step in saga.steps
        ],
    }
    text = json.dumps(description, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
