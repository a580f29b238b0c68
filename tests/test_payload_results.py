"""Step results round-trip exactly through Postgres, or fail the run cleanly.

README, "Inputs and results round-trip exactly" and "Bad input": a step's result is read
back as its declared return type, exactly; a result that cannot be stored and read back
unchanged fails the step for good with a ``saga.SerializationError`` naming the step,
the completed steps are compensated, and the orchestrator goes on working.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Literal

import anyio
import asyncpg
import pytest
from pydantic import SecretStr

import saga
from tests import _payloads as m
from tests._payloads import assert_identical
from tests.conftest import OrchestratorFactory

NO_ANNOTATION = object()


def _returning(make: Callable[[], Any], annotation: Any) -> Callable[..., Any]:
    """A step returning ``make()``, declared ``-> annotation`` (or not at all)."""

    async def step(ctx: saga.Context[m.Job]):
        return make()

    if annotation is not NO_ANNOTATION:
        step.__annotations__["return"] = annotation
    return step


def _result_case(name: str, annotation: Any, make: Callable[[], Any]) -> Any:
    return pytest.param(annotation, make, id=name)


PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))

ACCEPTED = [
    _result_case("alias", m.Aliased, lambda: m.Aliased(orderId="o-1", **{"amount-cents": 5})),
    _result_case("camel", m.Camel, lambda: m.Camel(userName="ada")),
    _result_case("secret_str", SecretStr, lambda: SecretStr("s3cr3t-🔑")),
    _result_case(
        "secrets_nested",
        m.Secrets,
        lambda: m.Secrets(password="p", pin=1, tokens=["t"], by_host={"h": "s"}, nested={}),
    ),
    _result_case(
        "serializers",
        m.Serialized,
        lambda: m.Serialized(count=1, amount=Decimal("0.10"), tags=["x"], window=[2, 1]),
    ),
    _result_case(
        "model_serializer",
        m.ModelSerialized,
        lambda: m.ModelSerialized(who="w", when=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
    ),
    _result_case("pets", list[m.Pet], lambda: [m.Dog(good=True), m.Cat(lives=7)]),
    _result_case(
        "callable_discriminator_in_model",
        m.Payments,
        lambda: m.Payments(first=m.BankPay(ref="b"), rest=[m.CardPay(ref="c")]),
    ),
    _result_case("generic", m.Page[m.Item], lambda: m.Page[m.Item](items=[m.Item(sku="s", qty=1)])),
    _result_case(
        "datetime_aware", dt.datetime, lambda: dt.datetime(2026, 3, 1, 2, 3, 4, 5, PLUS_0530)
    ),
    _result_case("datetime_naive", dt.datetime, lambda: dt.datetime(2026, 3, 1, 2, 3, 4, 5)),
    _result_case("date", dt.date, lambda: dt.date(1, 1, 1)),
    _result_case("time", dt.time, lambda: dt.time(12, 0, 0, 1, tzinfo=dt.UTC)),
    _result_case("timedelta", dt.timedelta, lambda: dt.timedelta(days=-1, microseconds=3)),
    _result_case("decimal_digits", Decimal, lambda: Decimal("3.14159265358979323846264338327")),
    _result_case("decimal_exponent", Decimal, lambda: Decimal("-1.50E-40")),
    _result_case("uuid", uuid.UUID, lambda: uuid.UUID(int=2**128 - 1)),
    _result_case("str_enum", m.Color, lambda: m.Color.GREEN),
    _result_case("enum", m.Size, lambda: m.Size.LARGE),
    _result_case("int_enum", m.Level, lambda: m.Level.HIGH),
    _result_case("literal", Literal["a", 2], lambda: 2),
    _result_case("tuple_fixed", tuple[int, str, float], lambda: (1, "é", 1.0)),
    _result_case("tuple_variadic", tuple[int, ...], lambda: (1, 2, 3)),
    _result_case("optional_none", str | None, lambda: None),
    _result_case("computed_field", m.Computed, lambda: m.Computed(price_cents=3, qty=2)),
    _result_case("extra_allow", m.Open, lambda: m.Open(name="n", f=1.0, big=2**70)),
    _result_case(
        "dict_any", dict[str, Any], lambda: {"floats": m.FLOATS, "ints": m.BIG_INTS, "n": None}
    ),
    _result_case("list_float", list[float], lambda: m.FLOATS),
    _result_case("big_int", int, lambda: 2**70),
    _result_case("huge_float", float, lambda: 1e300),
    _result_case("negative_zero", float, lambda: -0.0),
    _result_case("unicode", dict[str, str], lambda: m.UNICODE),
    _result_case("json_unannotated", NO_ANNOTATION, lambda: {"a": [1, 1.0, "é🎉", None, True]}),
    _result_case("none_unannotated", NO_ANNOTATION, lambda: None),
]


def produce_consume(annotation: Any, make: Callable[[], Any], seen: dict[str, Any]) -> Any:
    """``produce`` returns the value; ``consume`` reads it (ctx.result) and returns it."""
    definition = saga.Saga("results", input=m.Job)
    produce = definition.step(name="produce")(_returning(make, annotation))

    async def consume(ctx: saga.Context[m.Job]) -> Any:
        seen["result"] = ctx.result(produce)
        return seen["result"]

    if annotation is not NO_ANNOTATION:
        consume.__annotations__["return"] = annotation
    definition.step()(consume)
    return definition


async def _result_of(orchestrator: OrchestratorFactory, definition: Any) -> tuple[Any, Any]:
    orch = await orchestrator(definition, lease_seconds=30)
    with anyio.fail_after(20):
        run = await orch.start(definition, m.Job(n=1))
        return run, await run.result(timeout=15)


@pytest.mark.parametrize(("annotation", "make"), ACCEPTED)
async def test_step_result_round_trips_exactly(
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    annotation: Any,
    make: Callable[[], Any],
) -> None:
    """A step's result, read back as its declared return type, is exactly what it
    returned (equal, same types all the way down) for the next step (ctx.result) and for
    run.result(); the stored output is plain JSON text."""
    seen: dict[str, Any] = {}
    run, result = await _result_of(orchestrator, produce_consume(annotation, make, seen))
    assert_identical(make(), seen["result"])
    assert_identical(make(), result)
    output = await db.fetchval("SELECT output FROM saga.runs WHERE id = $1", run.id)
    json.loads(output)


async def test_secret_result_reaches_the_next_step_and_is_stored_in_clear(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A SecretStr result reaches the next step with its real value, which is therefore
    stored in clear (the README's warning), not as '**********'."""
    seen: dict[str, Any] = {}
    definition = produce_consume(SecretStr, lambda: SecretStr("s3cr3t"), seen)
    run, _ = await _result_of(orchestrator, definition)
    assert seen["result"].get_secret_value() == "s3cr3t"
    output = await db.fetchval("SELECT output FROM saga.runs WHERE id = $1", run.id)
    assert json.loads(output) == "s3cr3t"


async def test_annotated_discriminated_union_result_round_trips(
    orchestrator: OrchestratorFactory,
) -> None:
    """A step declared ``-> Annotated[A | B, Discriminator(fn)]`` (same-shaped members
    told apart by a callable) returning a B gives the next step that B."""
    seen: dict[str, Any] = {}
    definition = produce_consume(m.Payment, lambda: m.BankPay(ref="b-1"), seen)
    _, result = await _result_of(orchestrator, definition)
    assert_identical(m.BankPay(ref="b-1"), seen["result"])
    assert_identical(m.BankPay(ref="b-1"), result)


async def test_declared_frozenset_result_round_trips(orchestrator: OrchestratorFactory) -> None:
    """A step declared ``-> frozenset[str]`` gives the next step that frozenset."""
    seen: dict[str, Any] = {}
    definition = produce_consume(frozenset[str], lambda: frozenset({"a", "b"}), seen)
    _, result = await _result_of(orchestrator, definition)
    assert_identical(frozenset({"a", "b"}), seen["result"])
    assert_identical(frozenset({"a", "b"}), result)


class RaisingMapping(Mapping[str, int]):
    """A mapping whose iteration raises."""

    def __getitem__(self, key: str) -> int:
        raise RuntimeError("no items")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("iteration exploded")

    def __len__(self) -> int:
        return 1


class Hostile:
    """An arbitrary object whose comparisons and text raise."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        raise RuntimeError("repr")


REFUSED = [
    pytest.param(m.Aliased, lambda: {"orderId": "o", "amount-cents": 1}, "Aliased", id="dict"),
    pytest.param(int, lambda: "5", "int", id="str_for_int"),
    pytest.param(dict[str, int], RaisingMapping, "iteration exploded", id="raising_mapping"),
    pytest.param(NO_ANNOTATION, lambda: (1, "a"), "tuple", id="tuple_unannotated"),
    pytest.param(float, lambda: float("nan"), "nan", id="nan"),
    pytest.param(dict[str, Any], lambda: {"x": [float("inf")]}, r"\['x'\]\[0\]", id="inf"),
    pytest.param(bytes, lambda: b"\x00\xff", "bytes", id="bytes"),
    pytest.param(NO_ANNOTATION, object, "object", id="object"),
    pytest.param(NO_ANNOTATION, Hostile, "Hostile", id="hostile_object"),
    pytest.param(NO_ANNOTATION, lambda: dt.date(2020, 1, 1), "date", id="date_unannotated"),
    pytest.param(m.Suffixed, lambda: m.Suffixed(name="a"), r"\.name", id="non_idempotent"),
    pytest.param(str, lambda: "nul\x00", "NUL", id="nul"),
]


@pytest.mark.parametrize(("annotation", "make", "where"), REFUSED)
async def test_unstorable_result_compensates_promptly_and_the_orchestrator_goes_on(
    orchestrator: OrchestratorFactory,
    annotation: Any,
    make: Callable[[], Any],
    where: str,
) -> None:
    """A result that cannot be stored and read back unchanged (wrong type for the
    declaration, a mapping whose iteration raises, an unannotated tuple or date, NaN,
    infinities, bytes, NUL, arbitrary objects, a non-idempotent validator) fails its step
    at once, with no retry and no lease to wait out: the run ends compensated, with a
    saga.SerializationError naming the step and where it differs, the completed step's
    compensation ran, and the next run on the same orchestrator completes."""
    undone: list[str] = []
    definition = saga.Saga("refusals", input=m.Job)

    @definition.step()
    async def reserve(ctx: saga.Context[m.Job]) -> str:
        return f"res-{ctx.input.n}"

    @reserve.compensate
    async def release(ctx: saga.Context[m.Job], reservation: str) -> None:
        undone.append(reservation)

    definition.step(name="emit_result")(_returning(make, annotation))
    after = saga.Saga("after", input=m.Job)

    @after.step()
    async def add_one(ctx: saga.Context[m.Job]) -> int:
        return ctx.input.n + 1

    orch = await orchestrator(definition, after, lease_seconds=30)
    with anyio.fail_after(15):
        run = await orch.start(definition, m.Job(n=1))
        with pytest.raises(saga.RunCompensatedError) as raised:
            await run.result(timeout=5)
        following = await orch.start(after, m.Job(n=41))
        assert await following.result(timeout=5) == 42
    error = raised.value.error
    assert error is not None
    assert error.type == "saga.SerializationError"
    assert error.step == "emit_result"
    assert "'emit_result'" in error.message
    assert re.search(where, error.message), error.message
    assert undone == ["res-1"]
    failed = [(e.step, e.attempt) for e in await run.history() if e.kind == "step_failed"]
    assert failed == [("emit_result", 1)]
