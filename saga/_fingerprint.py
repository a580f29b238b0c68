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

import dataclasses
import enum
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from typing_extensions import is_typeddict

from saga._waits import Wait

_UNIONS = (typing.Union, types.UnionType)


def _name(tp: Any) -> str:
    """A type's own name, without its module (where it is defined is not its shape)."""
    return str(getattr(tp, "__qualname__", None) or getattr(tp, "__name__", None) or tp)


def describe_type(tp: Any, _seen: tuple[int, ...] = ()) -> Any:
    """A JSON-able, version-stable description of a type annotation."""
    simple = _simple(tp)
    if simple is not None:
        return simple
    origin = typing.get_origin(tp)
    if origin is not None:
        return _generic(tp, origin, _seen)
    if isinstance(tp, typing.NewType):  # stored as its supertype
        return ["newtype", _name(tp), describe_type(tp.__supertype__, _seen)]
    if _is_alias(tp):  # `type Amount = int` (or typing_extensions.TypeAliasType)
        if id(tp) in _seen:
            return ["ref", _seen.index(id(tp))]
        return ["alias", _name(tp), describe_type(tp.__value__, (*_seen, id(tp)))]
    fields = _fields(tp)
    if fields is None:
        return _name(tp)
    if id(tp) in _seen:  # a recursive type: refer to it by its depth, not its name
        return ["ref", _seen.index(id(tp))]
    seen = (*_seen, id(tp))
    return [
        "fields",
        [
            [name, alias, required, describe_type(ann, seen)]
            for name, alias, required, ann in fields
        ],
    ]


def _simple(tp: Any) -> Any:
    """The description of ``Any``, ``None``, a type variable or an enum (else None)."""
    if tp is Any:
        return "any"
    if tp is None or tp is type(None):
        return "none"
    if isinstance(tp, typing.TypeVar):
        return ["typevar", tp.__name__]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ["enum", [repr(member.value) for member in tp]]
    return None


def _generic(tp: Any, origin: Any, seen: tuple[int, ...]) -> Any:
    """The description of a parametrized type (``list[int]``, a union, a literal...)."""
    if origin is typing.Annotated:
        return describe_type(typing.get_args(tp)[0], seen)
    if origin is typing.Literal:
        return ["literal", [repr(arg) for arg in typing.get_args(tp)]]
    head = "union" if origin in _UNIONS else _name(origin)
    return [head, [describe_type(arg, seen) for arg in typing.get_args(tp)]]


def _is_alias(tp: Any) -> bool:
    """A type alias object (``type X = ...``, ``TypeAliasType``): named, with a value."""
    return type(tp).__name__ == "TypeAliasType" and hasattr(tp, "__value__")


def _alias(field: Any) -> str:
    """A pydantic field's JSON names: its ``alias``, and (only where they differ from it,
    so that fields without them keep their description) the names it is stored under
    and read from."""
    alias = field.alias or ""
    extra = []
    if field.serialization_alias not in (None, field.alias):
        extra.append(f"out={field.serialization_alias}")
    if field.validation_alias not in (None, field.alias):
        extra.append(f"in={_choices(field.validation_alias)}")
    return alias if not extra else "|".join([alias, *extra])


def _choices(alias: Any) -> str:
    """A validation alias (a name, an ``AliasPath`` or ``AliasChoices``) as text."""
    if isinstance(alias, str):
        return alias
    if hasattr(alias, "choices"):
        return "(" + ",".join(_choices(choice) for choice in alias.choices) + ")"
    return "/".join(str(part) for part in getattr(alias, "path", [alias]))


def _fields(tp: Any) -> list[tuple[str, str, bool, Any]] | None:
    """(name, alias, required, annotation) of a structured type's fields, or None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [
            (name, _alias(field), field.is_required(), field.annotation)
            for name, field in tp.model_fields.items()
        ]
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = _hints(tp)
        infos = getattr(tp, "__pydantic_fields__", {})  # a pydantic dataclass's aliases
        return [
            (
                f.name,
                _alias(infos[f.name]) if f.name in infos else "",
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                hints.get(f.name, Any),
            )
            for f in dataclasses.fields(tp)
        ]
    if is_typeddict(tp):  # (typing_extensions': it knows both kinds, on every Python)
        required: frozenset[str] = getattr(tp, "__required_keys__", frozenset())
        return [(name, "", name in required, ann) for name, ann in _hints(tp).items()]
    if isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):
        hints = _hints(tp)  # a NamedTuple: stored as a list, in the fields' order
        defaults = getattr(tp, "_field_defaults", {})
        return [(name, "", name not in defaults, hints.get(name, Any)) for name in tp._fields]
    return None


def _hints(tp: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tp)
    except Exception:  # unresolvable forward references: the raw annotations will do
        return dict(getattr(tp, "__annotations__", {}))


def fingerprint(
    name: str, version: int, input_type: Any, steps: Sequence[tuple[str, Any, bool]]
) -> str:
    """32 hex digits identifying a definition's stored-data contract: its name, version,
    input type, and its steps as (name, result type, has a compensation), in order."""
    description = {
        "saga": name,
        "version": version,
        "input": describe_type(input_type),
        "steps": [
            [step, describe_type(result), compensates] for step, result, compensates in steps
        ],
    }
    text = json.dumps(description, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def of_definition(saga: Any, graph: Any) -> str:
    """The fingerprint of a saga definition (``graph``: its graph, None when linear).
    What only some sagas have (waits, sleeps, a graph, a pivot, children steps) enters
    only theirs: the others keep the fingerprints their runs recorded."""
    steps: list[tuple[str, Any, bool]] = []
    for s in saga.steps:
        steps.append((s.name, s.result_type, s.compensation is not None))
        if s.spawn is not None:  # (a child saga's version 1 is implied, as it always was)
            child = s.spawn.saga
            suffix = "" if child.version == 1 else f"@v{child.version}"
            steps.append((f"children:{child.name}{suffix}", None, False))
        if s.pivot:
            steps.append(("pivot", None, False))
        if graph is not None:
            steps.append((f"after:{','.join(graph.deps[s.name])}", None, False))
        if isinstance(s.after, Wait):
            steps.append((f"wait:{s.after.name}", s.after.model, False))
        elif s.after is not None:
            steps.append((f"sleep:{s.after.name}", None, False))
    return fingerprint(saga.name, saga.version, saga.input_type, steps)
