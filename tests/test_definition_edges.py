"""Definitions at their edges, as README's API section writes them: ten years of sleep,
functions saga calls with the context (`until=`, `on_timeout=`, children's `inputs`),
hostile names, and a result model defined where the saga is built."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import saga


class Order(BaseModel):
    """The input of the sagas below."""

    n: int = 0


class Decision(BaseModel):
    """A wait's signal."""

    ok: bool


async def _first(ctx: saga.Context[Order]) -> str:
    return "done"


def _one_step_saga(name: str = "edges") -> saga.Saga[Order]:
    s = saga.Saga(name, input=Order)
    s.step(name="first")(_first)
    return s


# -- Definitions: "at most ten years" ---------------------------------------------------


def test_a_sleep_of_less_than_ten_years_is_accepted() -> None:
    """README, Waits: "Durations and timeouts must be positive and at most ten years."
    A sleep of 3,651 days (ten years are 3,652 or 3,653 days) is accepted. Before, the
    bound was 10 x 365 days."""
    s = _one_step_saga()
    s.sleep(timedelta(days=3651))  # raises DefinitionError instead


def test_a_wait_timeout_of_less_than_ten_years_is_accepted() -> None:
    """README, Waits: timeouts "at most ten years": a wait's timeout of 3,651 days is
    accepted (the bound was 10 x 365 days)."""
    s = _one_step_saga()
    s.wait_for("decision", Decision, timeout=timedelta(days=3651))


# -- Definitions: "wrong parameters" fail at once ---------------------------------------


def test_sleep_until_that_cannot_take_the_context_fails_at_definition() -> None:
    """README, API/Definitions: "Broken definitions fail at once with `DefinitionError`:
    ... wrong parameters ...". `sleep(until=lambda: ...)` (saga calls it with the
    context) is refused when declared. Before, it failed in a run, after the step before
    it had its effect."""
    s = _one_step_saga()
    with pytest.raises(saga.DefinitionError):
        s.sleep(until=lambda: None)  # type: ignore[arg-type,misc]


def test_on_timeout_function_that_cannot_take_the_context_fails_at_definition() -> None:
    """README, API/Definitions: "... wrong parameters ..., an `on_timeout` that cannot
    work" fail at once. An on_timeout taking no parameter, or two required ones, is
    refused when declared (it was accepted, and could never be called)."""

    async def no_ctx() -> Decision:
        return Decision(ok=True)

    async def two(ctx: Any, extra: Any) -> Decision:
        return Decision(ok=True)

    for fn in (no_ctx, two):
        s = _one_step_saga()
        with pytest.raises(saga.DefinitionError):
            s.wait_for("decision", Decision, timeout=5, on_timeout=fn)  # type: ignore[arg-type]


def test_children_inputs_that_cannot_take_the_context_fail_at_definition() -> None:
    """README, API/Definitions: "... wrong parameters ..." fail at once; Child sagas:
    `inputs(ctx)`. An inputs function taking no parameter, or two required ones, is
    refused when declared (it failed in a run, after the steps before it)."""
    child = _one_step_saga("edges_child")
    for inputs in (lambda: [Order()], lambda ctx, extra: [Order()]):
        parent = _one_step_saga("edges_parent")
        with pytest.raises(saga.DefinitionError):
            parent.children("kids", child, inputs)  # type: ignore[arg-type]


_HUGE = 10**5000  # an int whose repr() Python refuses (more than 4,300 digits)


def _declare_wait_named_huge() -> None:
    s = _one_step_saga()
    s.wait_for(_HUGE, Decision)  # type: ignore[arg-type]


def _declare_sleep_named_huge() -> None:
    s = _one_step_saga()
    s.sleep(5, name=_HUGE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "declare",
    [
        lambda: saga.Saga(_HUGE, input=Order),  # type: ignore[arg-type]
        lambda: saga.Saga("edges", input=Order, lane=_HUGE),  # type: ignore[arg-type]
        lambda: saga.Saga("edges", input=Order).step(name=_HUGE)(_first),  # type: ignore[arg-type]
        _declare_wait_named_huge,
        _declare_sleep_named_huge,
        lambda: saga.Saga("edges", input=Order).step(after=[_HUGE])(_first),  # type: ignore[list-item]
        lambda: saga.Saga("edges", input=Order).step()(_HUGE),  # type: ignore[arg-type]
        lambda: saga.Retry(non_retryable=[_HUGE]),  # type: ignore[list-item]
    ],
    ids=["saga", "lane", "step", "wait", "sleep", "after", "step-fn", "non_retryable"],
)
def test_a_huge_int_as_a_name_is_a_definition_error(declare: Any) -> None:
    """README, API/Definitions: "Broken definitions fail at once with `DefinitionError`:
    ... hostile names ...". A name (saga, lane, step, wait, sleep, an `after=` entry, a
    step function, a `non_retryable` item) that is an int of 5,000 digits is a
    DefinitionError. Before, formatting it into the message raised a bare ValueError
    ("Exceeds the limit (4300 digits)")."""
    with pytest.raises(saga.DefinitionError):
        declare()


def test_a_huge_int_as_a_schema_name_is_a_configuration_error() -> None:
    """README, API/Errors: `ConfigurationError` for a bad runtime argument (schema
    name, ...). A schema that is an int of 5,000 digits is one (it was a bare
    ValueError)."""
    with pytest.raises(saga.ConfigurationError):
        saga.Client("postgresql://u@localhost/db", schema=_HUGE)  # type: ignore[arg-type]


# -- Definitions: the return annotation, resolved at registration -------------------------


async def test_a_step_returning_a_model_defined_in_a_function_registers(
    orchestrator: Any,
) -> None:
    """README, API/Definitions: the return annotation "is resolved when the saga is
    registered, and one that is never defined at run time ... is a `DefinitionError`".

    A model defined at run time in the function that builds the saga, in a module with
    `from __future__ import annotations` (as README's example), is the step's result
    type: the saga registers and runs. Before, the annotation was evaluated in the
    module's names only: DefinitionError "not defined in its module"."""

    class Slot(BaseModel):
        code: str

    s = saga.Saga("local_model", input=Order)

    @s.step()
    async def book(ctx: saga.Context[Order]) -> Slot:
        return Slot(code="A1")

    @s.step()
    async def confirm(ctx: saga.Context[Order]) -> str:
        return ctx.result(book).code

    await orchestrator(s)  # raises DefinitionError instead
    run = await s.start(Order())
    assert await run.result(timeout=15) == "A1"
