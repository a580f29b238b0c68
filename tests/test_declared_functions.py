"""Functions saga calls, checked where they are declared: callables of the context
wrapped by decorators, step result models defined where the saga is built (or shadowing
the module's), and hostile names of waits and children steps. README, API."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel

import saga
from tests.conftest import ClientFactory

pytestmark = pytest.mark.timeout(60)


class _In(BaseModel):
    n: int = 1


class _Decision(BaseModel):
    who: str


def _one_step(name: str) -> saga.Saga[Any]:
    s = saga.Saga(name, input=_In)

    @s.step()
    async def first(ctx: saga.Context[_In]) -> int:
        return 1

    return s


def _supplying(value: Any) -> Any:
    """A decorator (functools.wraps, as every decorator should) that calls the wrapped
    function with the context and one more argument it supplies itself: the wrapper is
    called as saga calls it, with the context alone."""

    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(ctx: Any) -> Any:
            return fn(ctx, value)

        return wrapper

    return decorate


def _async_supplying(value: Any) -> Any:
    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(ctx: Any) -> Any:
            return await fn(ctx, value)

        return wrapper

    return decorate


@_supplying(UTC)
def _wake_at(ctx: Any, tz: timezone) -> datetime:
    return datetime.now(tz) + timedelta(seconds=1)


@_supplying(2)
def _two_children(ctx: Any, count: int) -> list[dict[str, Any]]:
    return [{"n": i} for i in range(count)]


@_async_supplying("auto")
async def _auto_decision(ctx: Any, who: str) -> _Decision:
    return _Decision(who=who)


def _declare_until() -> None:
    _one_step("decorated_until").sleep(until=_wake_at)


def _declare_inputs() -> None:
    _one_step("decorated_inputs").children("kids", _one_step("kid"), _two_children)


def _declare_on_timeout() -> None:
    _one_step("decorated_on_timeout").wait_for(
        "decision", _Decision, timeout=60, on_timeout=_auto_decision
    )


@pytest.mark.parametrize(
    "declare", [_declare_until, _declare_inputs, _declare_on_timeout], ids=lambda f: f.__name__
)
def test_a_decorated_function_of_the_context_is_accepted(declare: Any) -> None:
    """README, Waits: `sleep(until=fn)`, "a function, sync or async, of the context";
    Child sagas: "`inputs(ctx)` (sync or async)"; an `on_timeout` "`async def (ctx)`".

    Each function here is wrapped by a `functools.wraps` decorator that supplies a
    second argument itself: what saga is given takes `(ctx)`, and is accepted. (A first
    version of the check at definition read the signature through `__wrapped__` and
    refused them.)"""
    declare()


class Receipt(BaseModel):
    """The module's Receipt: the result type of `_charge`."""

    total: int


async def _charge(ctx: saga.Context[_In]) -> Receipt:
    return Receipt(total=ctx.input.n)


def test_a_step_result_type_is_its_own_annotation_not_a_local_of_the_declaring_function() -> None:
    """README, API: "The return annotation is the result's type". `_charge` is annotated
    with this module's `Receipt`; declared inside a function with a different local
    `Receipt`, its result type stays this module's. (A first version of looking where
    a step is declared read that function's names first.)"""

    def build() -> saga.Saga[Any]:
        class Receipt(BaseModel):  # the builder's own model, same name
            note: str

        s = saga.Saga("shadowed", input=_In)

        @s.step()
        async def prepare(ctx: saga.Context[_In]) -> Receipt:
            return Receipt(note="ready")

        s.step(name="charge")(_charge)
        return s

    s = build()
    assert s.result_type("charge") is Receipt, s.result_type("charge")


async def test_a_local_result_model_reaches_a_step_declared_through_a_decorator_helper(
    open_client: ClientFactory,
) -> None:
    """README, API: the return annotation is the result's type, "resolved when the saga
    is registered". A model defined in the function that builds the saga, whose steps
    are declared through a small decorator of its own (`@logged()` wrapping
    `s.step()`), is found: the functions the step is declared in are looked at,
    innermost first (not only the helper's)."""

    def build() -> saga.Saga[Any]:
        class Out(BaseModel):
            value: int

        s = saga.Saga("helper_declared", input=_In)

        def logged(**options: Any) -> Any:
            def decorate(fn: Any) -> Any:
                return s.step(**options)(fn)

            return decorate

        @logged()
        async def compute(ctx: saga.Context[_In]) -> Out:
            return Out(value=1)

        return s

    await open_client(build())


async def test_a_local_result_model_defined_below_its_step_is_resolved(
    open_client: ClientFactory,
) -> None:
    """README, API: the return annotation "may name a model defined further down ...: it
    is resolved when the saga is registered". In the builder, a model defined below its
    step is found at registration (the builder's names are read then, not copied when
    the step was declared)."""

    def build() -> saga.Saga[Any]:
        s = saga.Saga("defined_below", input=_In)

        @s.step()
        async def compute(ctx: saga.Context[_In]) -> Out:
            return Out(value=1)

        class Out(BaseModel):
            value: int

        return s

    await open_client(build())


_HUGE = 10**5000  # more than 4,300 digits: repr() of it raises ValueError


def _not_a_saga_model() -> None:
    _one_step("huge_wait_model").wait_for(_HUGE, "not a model")  # type: ignore[arg-type]


def _with_a_timeout() -> None:
    _one_step("huge_wait_timeout").wait_for(_HUGE, _Decision, timeout=5)  # type: ignore[arg-type]


def _bad_on_timeout() -> None:
    _one_step("huge_wait_on_timeout").wait_for(
        _HUGE,
        _Decision,
        on_timeout="later",  # type: ignore[arg-type]
    )


def _children_of_nothing() -> None:
    _one_step("huge_children").children(_HUGE, "not a saga", lambda ctx: [])  # type: ignore[arg-type]


def _children_bad_inputs() -> None:
    _one_step("huge_children_inputs").children(_HUGE, _one_step("kid"), "not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "declare",
    [
        _with_a_timeout,
        _not_a_saga_model,
        _bad_on_timeout,
        _children_of_nothing,
        _children_bad_inputs,
    ],
    ids=lambda f: f.__name__,
)
def test_a_huge_int_wait_or_children_name_is_a_definition_error(
    declare: Any,
) -> None:
    """README, API: "Broken definitions fail at once with `DefinitionError`: ... hostile
    names". A wait or children step named by an int of more than 4,300 digits, with or
    without another mistake, is a DefinitionError, not a bare ValueError raised while
    its message was formatted (the name is checked first now)."""
    with pytest.raises(saga.DefinitionError):
        declare()
