"""Typed data through the whole life of a run (README "Inputs and results
round-trip exactly", "API"; DESIGN "results are typed", "Every step result is
checkpointed in Postgres before the next step starts")."""

from __future__ import annotations

import enum
import typing
from typing import Annotated, Any

import anyio
import pytest
from pydantic import AfterValidator, BaseModel
from typing_extensions import TypedDict

import saga
from tests.conftest import OrchestratorFactory


class Job(BaseModel):
    n: int


async def test_a_later_step_reads_the_checkpointed_result_not_an_earlier_steps_mutation(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN: "Every step result is checkpointed in Postgres before the next step
    starts"; README API: ``ctx.result(step)`` is "the typed result of an earlier step".
    What a third step reads as the first step's result is that result, as stored, not
    what the second step did to the object it read (a worker restarting between them
    would read the stored one: the outcome must not depend on where steps run)."""
    definition = saga.Saga("mutate_later", input=Job)
    seen: list[dict[str, int]] = []

    @definition.step()
    async def produce(ctx: saga.Context[Job]) -> dict[str, int]:
        return {"a": 1}

    @definition.step()
    async def meddle(ctx: saga.Context[Job]) -> None:
        ctx.result(produce)["a"] = 99

    @definition.step()
    async def read(ctx: saga.Context[Job]) -> int:
        seen.append(dict(ctx.result(produce)))
        return ctx.result(produce)["a"]

    orch = await orchestrator(definition)
    with anyio.fail_after(20):
        run = await orch.start(definition, Job(n=1))
        assert await run.result(timeout=15) == 1
    assert seen == [{"a": 1}]


class Color(str, enum.Enum):  # noqa: UP042 (the str mixin users write, as in the tests)
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Totals(TypedDict):
    count: int


def _produce_consume(name: str, annotation: Any, value: Any, seen: list[Any]) -> Any:
    definition = saga.Saga(name, input=Job)

    async def produce(ctx: saga.Context[Job]):  # type: ignore[no-untyped-def]
        return value

    if annotation is not None:
        produce.__annotations__["return"] = annotation
    step = definition.step(name="produce")(produce)

    @definition.step()
    async def consume(ctx: saga.Context[Job]) -> None:
        seen.append(ctx.result(step))

    return definition


async def _stored_or_refused(
    orchestrator: OrchestratorFactory, name: str, annotation: Any, value: Any
) -> list[Any]:
    """Run produce -> consume; [] when the run was refused with SerializationError."""
    seen: list[Any] = []
    definition = _produce_consume(name, annotation, value, seen)
    orch = await orchestrator(definition)
    with anyio.fail_after(20):
        run = await orch.start(definition, Job(n=1))
        try:
            await run.result(timeout=15)
        except saga.RunCompensatedError as exc:
            error = exc.error
        else:
            return seen
    assert error is not None
    assert error.type == "saga.SerializationError", error
    return []


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        pytest.param(Totals, {"count": 2, "note": "kept?"}, id="typeddict_extra_key"),
        pytest.param(Annotated[str, AfterValidator(str.upper)], "abc", id="annotated_validator"),
    ],
)
async def test_a_result_its_declared_type_would_change_is_refused_not_altered(
    orchestrator: OrchestratorFactory, annotation: Any, value: Any
) -> None:
    """README "Inputs and results round-trip exactly": "A payload is stored only after
    reading it back gave the value you handed over ... Where a value would come back
    different ... the step's completion refuses it with a SerializationError". A step
    declared ``-> Totals`` (a TypedDict) returning a dict with a key Totals does not
    declare (or ``-> Annotated[str, AfterValidator(str.upper)]`` returning "abc") must
    not reach the next step changed (the key silently dropped; "ABC")."""
    seen = await _stored_or_refused(orchestrator, "declared_changes", annotation, value)
    assert seen in ([], [value]), f"the next step read {seen[0]!r}, not {value!r}"


async def test_an_enum_dict_key_comes_back_an_enum_or_is_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Inputs and results round-trip exactly": "Types are compared all the way
    down, so a value that only compares equal after the round trip (an enum or an
    `OrderedDict` inside a `dict[str, Any]`) is refused too". A step declared
    ``-> dict[str, Any]`` returning ``{Color.RED: 1}`` must not reach the next step as
    ``{"red": 1}`` (a str key where an enum was)."""
    value = {Color.RED: 1}
    seen = await _stored_or_refused(orchestrator, "enum_key", dict[str, Any], value)
    if seen:
        assert [type(k) for k in seen[0]] == [Color], f"the next step read {seen[0]!r}"


class Loose(BaseModel):
    extra: Any


async def test_an_enum_dict_key_in_the_input_comes_back_an_enum_or_is_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Inputs and results round-trip exactly" ("Types are compared all the way
    down, so a value that only compares equal after the round trip (an enum ...) is
    refused too") and "Durable start": an input whose ``Any`` field holds
    ``{Color.RED: 1}`` is refused by start() (SerializationError), or reaches the step
    with its enum key; not as ``{"red": 1}``."""
    definition = saga.Saga("enum_key_input", input=Loose)
    seen: list[Any] = []

    @definition.step()
    async def read(ctx: saga.Context[Loose]) -> None:
        seen.append(ctx.input.extra)

    orch = await orchestrator(definition)
    with anyio.fail_after(20):
        try:
            run = await orch.start(definition, Loose(extra={Color.RED: 1}))
        except saga.SerializationError:
            return
        await run.result(timeout=15)
    assert [type(k) for k in seen[0]] == [Color], f"the step read {seen[0]!r}"


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        pytest.param(int, Level.HIGH, id="int_enum_as_int"),
        pytest.param(str, Color.RED, id="str_enum_as_str"),
        pytest.param(int, True, id="bool_as_int"),
        pytest.param(list[int], [Level.HIGH, True], id="in_a_list"),
    ],
)
async def test_a_result_that_only_compares_equal_after_the_round_trip_is_refused(
    orchestrator: OrchestratorFactory, annotation: Any, value: Any
) -> None:
    """README "Inputs and results round-trip exactly": "A payload is stored only after
    reading it back gave the value you handed over"; "Types are compared all the way
    down, so a value that only compares equal after the round trip (an enum ...) is
    refused too". A step declared ``-> int`` returning ``Level.HIGH`` (an IntEnum) or
    ``True`` must not reach the next step as a plain ``3`` / ``1``."""
    seen = await _stored_or_refused(orchestrator, "equal_only", annotation, value)
    if seen:
        got = seen[0]
        assert type(got) is type(value), f"{value!r} came back as {got!r}"
        if isinstance(value, list):
            assert [type(x) for x in got] == [type(x) for x in value], f"came back {got!r}"


async def test_a_step_reads_the_input_as_stored_not_as_an_earlier_step_changed_it(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN "Durable start" / README "Inputs and results round-trip exactly": the input
    is stored once, and every step reads it back from what was stored ("Validators run
    again whenever a worker reads the input back"). A second step sees the run's input,
    not the first step's in-memory change to ``ctx.input`` (steps of a graph, or steps
    after a restart, do too)."""
    definition = saga.Saga("input_mutation", input=Job)
    seen: list[int] = []

    @definition.step()
    async def meddle(ctx: saga.Context[Job]) -> None:
        ctx.input.n = 99

    @definition.step()
    async def read(ctx: saga.Context[Job]) -> int:
        seen.append(ctx.input.n)
        return ctx.input.n

    orch = await orchestrator(definition)
    with anyio.fail_after(20):
        run = await orch.start(definition, Job(n=1))
        await run.result(timeout=15)
    assert seen == [1]


class PlainTotals(typing.TypedDict):
    count: int


async def test_a_step_returning_a_typing_typeddict_works_or_is_refused_when_registered(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "API": "The return annotation is the result's type: results are stored as
    JSON and read back as that type (pydantic)", and `output` may be "a `TypedDict`";
    "Broken definitions fail at once with `DefinitionError`". On Python 3.11 (supported:
    "Python >= 3.11") a step declared ``-> PlainTotals`` (a ``typing.TypedDict``) either
    completes with its dict, or its saga is refused when registered; it must not pass
    registration and then fail every run at that step, after its side effects."""
    definition = saga.Saga("typing_td", input=Job, output=PlainTotals)

    @definition.step()
    async def total(ctx: saga.Context[Job]) -> PlainTotals:
        return {"count": ctx.input.n}

    try:
        orch = await orchestrator(definition)
    except saga.DefinitionError:
        return
    with anyio.fail_after(20):
        run = await orch.start(definition, Job(n=2))
        assert await run.result(timeout=15) == {"count": 2}
