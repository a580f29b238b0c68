"""Inputs round-trip exactly through Postgres, for every pydantic feature a model may use.

README, "Inputs and results round-trip exactly": a step sees exactly the input handed to
``start()``, ``run.result()`` gives it back, and where a value would come back different
``start()`` refuses it with a ``SerializationError`` saying where, before anything is
written. Each feature is its own case, on a real database.

No ``from __future__ import annotations`` here: the step builders annotate their return
type with a variable (the model or field type of the case), evaluated when defined.
"""

import datetime as dt
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import asyncpg
import pydantic
import pytest
from pydantic import BaseModel, SecretBytes

import saga
from tests import _payloads as m
from tests._payloads import assert_identical
from tests.conftest import OrchestratorFactory

PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))


def _times() -> m.Times:
    return m.Times(
        aware=dt.datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=PLUS_0530),
        utc=dt.datetime(2000, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC),
        naive=dt.datetime(1970, 1, 1, 0, 0, 0, 1),
        day=dt.date(1999, 12, 31),
        at=dt.time(23, 59, 59, 999999),
        at_aware=dt.time(8, 0, tzinfo=dt.timezone(-dt.timedelta(hours=3))),
        span=dt.timedelta(days=-3, seconds=5, microseconds=7),
        spans=[dt.timedelta(0), dt.timedelta(days=10**5), dt.timedelta(microseconds=1)],
    )


def _secrets() -> m.Secrets:
    return m.Secrets(
        password="hunter2-🔑",
        pin=4321,
        tokens=["tok-a", "tok-b"],
        by_host={"db.example": "pg-pass"},
        nested={"keys": [11, 22]},
        maybe="maybe-secret",
    )


_MODELS: dict[str, Callable[[], BaseModel]] = {
    "alias": lambda: m.Aliased(orderId="o-1", **{"amount-cents": 500}),
    "alias_generator": lambda: m.Camel(userName="ada", homeAddress="1 Loop"),
    "alias_generator_populate_by_name": lambda: m.CamelByName(user_name="ada", zip_code=75001),
    "secrets": _secrets,
    "field_serializers": lambda: m.Serialized(
        count=7, amount=Decimal("19.990"), tags=["a", "b c"], window=[3, 1, 2]
    ),
    "model_serializer": lambda: m.ModelSerialized(
        who="ada", when=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=PLUS_0530)
    ),
    "model_serializer_wrap": lambda: m.WrapModelSerialized(n=3),
    "annotated_types": lambda: m.Normalized(
        price=Decimal("12.34"), email="  Ada@Example.COM ", handle=" Ada "
    ),
    "discriminator_field": lambda: m.Pets(
        favourite=m.Dog(good=True), others=[m.Cat(lives=9), m.Dog(good=False)]
    ),
    "discriminator_callable": lambda: m.Payments(
        first=m.BankPay(ref="iban-1"),
        rest=[m.CardPay(ref="c-1"), m.BankPay(ref="b-2")],
        note="same shapes, told apart by a callable",
    ),
    "generic": lambda: m.Page[m.Item](items=[m.Item(sku="a", qty=1)], next_cursor="c2"),
    "generic_nested": lambda: m.Envelope[m.Page[m.Item]](
        body=m.Page[m.Item](items=[m.Item(sku="x", qty=2)]),
        pages=[m.Page[m.Page[m.Item]](items=[m.Page[m.Item](items=[])], next_cursor=None)],
    ),
    "datetimes": _times,
    "decimals": lambda: m.Decimals(
        values=[
            Decimal("3.14159265358979323846264338327950288419716939937510582097494459"),
            Decimal("1E+30"),
            Decimal("-1.5E-40"),
            Decimal("1.10"),
            Decimal("0.000"),
            Decimal("-0"),
            Decimal("123456789012345678901234567890.000000001"),
        ],
        one=Decimal("1e-7"),
    ),
    "enums_literal_uuid": lambda: m.Choices(
        color=m.Color.GREEN,
        size=m.Size.LARGE,
        level=m.Level.HIGH,
        mode=3,
        ident=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        idents={"a": uuid.uuid4(), "ключ": uuid.UUID(int=0)},
    ),
    "tuples_optional_defaults": lambda: m.Shapes(numbers=(1, 2, 3), pair=("x", 1.0), maybe=0),
    "computed_field": lambda: m.Computed(price_cents=250, qty=4),
    "extra_allow": lambda: m.Open(
        name="ada", ratio=1.0, floats=m.FLOATS, big=2**70, unicode=m.UNICODE, none=None
    ),
    "any_floats_big_ints": lambda: m.Loose(
        data={"floats": m.FLOATS, "ints": m.BIG_INTS, "deep": {"x": [[1.0], {"y": -0.0}]}},
        anything=[1e20, 1e-7, 1e300, -0.0, 2**70, True, None],
    ),
    "unicode": lambda: m.Text(title="Grüße 🎉 \u00e9\u0301", by_lang=m.UNICODE),
}

# (model, field the first step returns, secret values that must be stored in clear)
_CASES = [
    ("alias", "amount_cents", ()),
    ("alias_generator", "home_address", ()),
    ("alias_generator_populate_by_name", "zip_code", ()),
    ("secrets", "password", ("hunter2-🔑", "pg-pass", "tok-b", "4321", "maybe-secret")),
    ("secrets", "pin", ()),
    ("secrets", "tokens", ()),
    ("secrets", "by_host", ()),
    ("secrets", "nested", ()),
    ("field_serializers", "count", ()),
    ("field_serializers", "amount", ()),
    ("field_serializers", "tags", ()),
    ("field_serializers", "window", ()),
    ("model_serializer", "when", ()),
    ("model_serializer_wrap", "n", ()),
    ("annotated_types", "price", ()),
    ("annotated_types", "email", ()),
    ("annotated_types", "handle", ()),
    ("discriminator_field", "others", ()),
    ("discriminator_callable", "note", ()),
    ("generic", "items", ()),
    ("generic_nested", "body", ()),
    *(("datetimes", name, ()) for name in m.Times.model_fields),
    ("decimals", "values", ()),
    ("decimals", "one", ()),
    *(("enums_literal_uuid", name, ()) for name in m.Choices.model_fields),
    *(("tuples_optional_defaults", name, ()) for name in m.Shapes.model_fields),
    ("computed_field", "qty", ()),
    ("extra_allow", "name", ()),
    ("extra_allow", "floats", ()),
    ("extra_allow", "unicode", ()),
    ("any_floats_big_ints", "data", ()),
    ("any_floats_big_ints", "anything", ()),
    ("unicode", "by_lang", ()),
]


def _field_type(model: type[BaseModel], field: str) -> Any:
    if field in model.model_fields:  # the declared type, Annotated metadata included
        return model.model_fields[field].rebuild_annotation()
    return Any  # an extra key of an extra='allow' model


def echo_saga(model: type[BaseModel], field: str, seen: dict[str, Any]) -> saga.Saga[Any]:
    """Step 1 returns one field of the input (declared as that field's type); step 2
    returns the input itself (declared as the model), so the run's output is the input."""
    part_type = _field_type(model, field)
    echo = saga.Saga("payload_echo", input=model)

    @echo.step()
    async def take_part(ctx: saga.Context[Any]) -> part_type:
        seen["input"] = ctx.input
        return getattr(ctx.input, field)

    @echo.step()
    async def give_back(ctx: saga.Context[Any]) -> model:
        seen["part"] = ctx.result(take_part)
        return ctx.input

    return echo


async def _run_to_end(
    orchestrator: OrchestratorFactory, definition: saga.Saga[Any], value: Any
) -> tuple[saga.RunHandle, Any]:
    orch = await orchestrator(definition, lease_seconds=30)
    with anyio.fail_after(20):
        run = await orch.start(definition, value)
        return run, await run.result(timeout=15)


@pytest.mark.parametrize(
    ("model", "field", "in_clear"), _CASES, ids=[f"{c[0]}-{c[1]}" for c in _CASES]
)
async def test_input_round_trips_exactly_through_storage(
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    model: str,
    field: str,
    in_clear: tuple[str, ...],
) -> None:
    """A step sees exactly the input handed to start() (equal, same types all the way
    down), a field of it returned with its declared type reaches the next step intact,
    run.result() gives the input back, and the stored input and output are plain JSON
    text that the model itself reads back as the original; secrets are stored in clear,
    as the README warns."""
    original = _MODELS[model]()
    seen: dict[str, Any] = {}
    run, result = await _run_to_end(orchestrator, echo_saga(type(original), field, seen), original)
    assert_identical(original, seen["input"])
    assert_identical(getattr(original, field), seen["part"])
    assert_identical(original, result)
    row = await db.fetchrow("SELECT input, output FROM saga.runs WHERE id = $1", run.id)
    for text in (row["input"], row["output"]):
        assert isinstance(text, str)
        json.loads(text)
        assert_identical(original, type(original).model_validate_json(text))
    for secret in in_clear:
        assert secret in row["input"]


async def test_camel_case_dict_input_round_trips(orchestrator: OrchestratorFactory) -> None:
    """start() with a camelCase dict (what a web API receives) validates it into the
    aliased model, and the step sees that model exactly, as does run.result()."""
    seen: dict[str, Any] = {}
    definition = echo_saga(m.Camel, "user_name", seen)
    _, result = await _run_to_end(orchestrator, definition, {"userName": "ada"})
    assert_identical(m.Camel(userName="ada"), seen["input"])
    assert_identical(m.Camel(userName="ada"), result)


async def test_validator_with_a_side_effect_is_accepted(
    orchestrator: OrchestratorFactory,
) -> None:
    """A validator with a side effect (counting) but an unchanged value is accepted; the
    step sees the right value. It ran again when the input was read back (the README
    says so: keep validators free of effects that must happen once)."""
    m.validated.clear()
    original = m.Counted(name="ada")
    seen: dict[str, Any] = {}
    _, result = await _run_to_end(orchestrator, echo_saga(m.Counted, "name", seen), original)
    assert_identical(original, seen["input"])
    assert_identical(original, result)
    assert len(m.validated) > 1
    assert set(m.validated) == {"ada"}


def _refused_input_cases() -> list[Any]:
    loose = m.Loose
    cases = [
        ("non_idempotent_validator", m.Suffixed, lambda: m.Suffixed(name="ada"), r"\.name"),
        ("non_idempotent_validator_dict", m.Suffixed, lambda: {"name": "ada"}, r"\.name"),
        ("non_idempotent_before_validator", m.DoubledOnRead, lambda: {"n": 2}, r"\.n\b"),
        ("serializer_output_invalid", m.BadSerializer, lambda: {"n": 1}, "does not validate"),
        ("model_serializer_drops_field", m.DroppingSerializer, lambda: {"a": 1, "b": 2}, "b: Fi"),
        ("split_alias", m.SplitAlias, lambda: {"userName": "ada"}, "userName"),
        ("computed_field_extra_forbid", m.ComputedForbid, lambda: {"a": 1}, "double"),
        ("nan", m.Floaty, lambda: {"x": float("nan")}, r"\.x"),
        ("infinity", m.Floaty, lambda: {"x": float("-inf")}, r"\.x"),
        ("nul", m.Floaty, lambda: {"x": 1.0, "text": "a\x00b"}, r"\.text"),
        ("lone_surrogate", m.Floaty, lambda: {"x": 1.0, "text": "\ud800"}, r"\.text"),
        ("any_tuple", loose, lambda: {"data": {}, "anything": (1, 2)}, r"\.anything"),
        ("any_date", loose, lambda: {"data": {"d": dt.date(2020, 1, 1)}}, r"\['d'\]"),
        ("any_decimal", loose, lambda: {"data": {"p": Decimal("1.5")}}, r"\['p'\]"),
        ("any_uuid", loose, lambda: {"data": {"u": uuid.uuid4()}}, r"\['u'\]"),
        ("any_set", loose, lambda: {"data": {"s": {1, 2}}}, r"\['s'\]"),
        ("any_bytes", loose, lambda: {"data": {"b": b"\xff"}}, r"\['b'\]"),
        ("any_nan", loose, lambda: {"data": {"f": [1.0, float("nan")]}}, r"\['f'\]\[1\]"),
        ("any_int_key", loose, lambda: {"data": {"k": {1: "one"}}}, r"\['k'\]"),
        ("any_object", loose, lambda: {"data": {"o": object()}}, "object"),
    ]
    params = [pytest.param(model, make, where, id=name) for name, model, make, where in cases]
    # Values of Any fields whose type changes although they compare equal to what comes
    # back: under a bare Any they are refused, inside a declared type they slip through.
    same_but_not = {
        "any_str_enum": m.Color.RED,
        "any_int_enum": m.Level.HIGH,
        "any_ordered_dict": OrderedDict(a=1),
        "any_str_subclass": m.Label("x"),
    }
    for name, value in same_but_not.items():
        params.append(
            pytest.param(
                loose,
                lambda value=value: {"data": {"v": value}},
                r"\['v'\]",
                id=name,
            )
        )
    return params


@pytest.mark.parametrize(("model", "make", "where"), _refused_input_cases())
async def test_input_that_cannot_round_trip_is_refused_before_anything_is_written(
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    model: type[BaseModel],
    make: Callable[[], Any],
    where: str,
) -> None:
    """An input that would come back different (non-idempotent validators, serializers
    whose output does not validate, values of Any fields that change type, NaN, NUL,
    lone surrogates, bytes, sets, objects) makes start() raise SerializationError naming
    the input and where it differs; no run and no event is written, no step runs."""
    ran: list[Any] = []
    definition = saga.Saga("refused", input=model)

    @definition.step()
    async def record(ctx: saga.Context[Any]) -> None:
        ran.append(ctx.input)

    orch = await orchestrator(definition)
    with anyio.fail_after(10), pytest.raises(saga.SerializationError, match=where) as raised:
        await orch.start(definition, make())
    assert str(raised.value).startswith("input")
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0
    assert await db.fetchval("SELECT count(*) FROM saga.events") == 0
    assert ran == []


async def test_split_aliases_readable_by_name_round_trip(orchestrator: OrchestratorFactory) -> None:
    """A model reading camelCase and writing snake_case (populate_by_name=True, so its
    own JSON validates back) works as written: the step sees the input exactly."""
    original = m.SplitAliasByName(userName="ada")
    assert m.SplitAliasByName.model_validate_json(original.model_dump_json()) == original
    seen: dict[str, Any] = {}
    definition = echo_saga(m.SplitAliasByName, "user_name", seen)
    _, result = await _run_to_end(orchestrator, definition, original)
    assert_identical(original, seen["input"])
    assert_identical(original, result)


async def test_secret_bytes_are_refused_like_bytes(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Bytes have no JSON form, secret or not: a SecretBytes field is refused by start()
    with a SerializationError naming the field and saying what to do, and nothing is
    written (the README: encode bytes, e.g. base64, into a str)."""
    definition = echo_saga(m.Blob, "key", {})
    orch = await orchestrator(definition)
    with pytest.raises(saga.SerializationError, match=r"input\.key.*base64"):
        await orch.start(definition, m.Blob(key=SecretBytes(b"\x00\xff raw key")))
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_declared_set_fields_round_trip(orchestrator: OrchestratorFactory) -> None:
    """frozenset[str] and set[int] fields, whose declared type reads a JSON array back as
    the same set, round-trip: the step sees them exactly."""
    original = m.Tags(tags=frozenset({"b", "a", "é"}), ids={3, 1, 2**70})
    seen: dict[str, Any] = {}
    _, result = await _run_to_end(orchestrator, echo_saga(m.Tags, "tags", seen), original)
    assert_identical(original, seen["input"])
    assert_identical(original, result)


async def test_refusal_of_a_changed_extra_names_the_key(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """An extra='allow' key whose value would come back as another type (a datetime
    read back as a str) is refused, and the error says where: the key's name."""
    definition = saga.Saga("refused", input=m.Open)

    @definition.step()
    async def record(ctx: saga.Context[Any]) -> None:
        pass

    orch = await orchestrator(definition)
    with anyio.fail_after(10), pytest.raises(saga.SerializationError) as raised:
        await orch.start(definition, m.Open(name="ada", when=dt.datetime(2020, 1, 1)))
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0
    assert "when" in str(raised.value)


class Appointment(BaseModel):
    at: dt.datetime


async def test_a_datetime_in_a_zone_whose_offset_varies_is_refused_at_start_and_as_result(
    orchestrator: OrchestratorFactory,
) -> None:
    """A datetime in ZoneInfo("Europe/Paris") would reach the step with its day's fixed
    offset (a day later then an hour off across the change to summer time): start()
    refuses it with a SerializationError naming the field, writing nothing, and a step
    returning one fails for good with that error; the same instant in UTC runs."""
    paris = ZoneInfo("Europe/Paris")
    s = saga.Saga("appointment", input=Appointment)

    @s.step()
    async def book(ctx: saga.Context[Appointment]) -> dt.datetime:
        return (ctx.input.at + dt.timedelta(days=1)).astimezone(paris)

    orch = await orchestrator(s)
    given = dt.datetime(2026, 3, 28, 12, 0, tzinfo=paris)
    with pytest.raises(saga.SerializationError, match=r"\.at: its time zone Europe/Paris"):
        await orch.start(s, Appointment(at=given))
    assert sum((await saga.count_runs(orch)).values()) == 0
    run = await orch.start(s, Appointment(at=given.astimezone(dt.UTC)))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=10)
    assert "its time zone Europe/Paris" in str(raised.value.error)


class Region(BaseModel):
    region: str

    @pydantic.field_validator("region")
    @classmethod
    def known(cls, region: str) -> str:
        return {"eu": "eu-west-1", "eu-west-1": "eu-west-1"}[region]  # KeyError otherwise


class Once(BaseModel):
    region: str

    @pydantic.field_validator("region")
    @classmethod
    def short_only(cls, region: str) -> str:
        return {"eu": "eu-west-1"}[region]  # not idempotent: "eu-west-1" raises KeyError


async def test_a_validator_raising_anything_is_bad_input_not_a_crash(
    orchestrator: OrchestratorFactory,
) -> None:
    """A validator may raise any exception (pydantic passes all but ValueError on):
    start() refuses such an input with InvalidInputError naming the saga and the
    exception's type, a signal's payload likewise; a validator that raises on its own
    output (not idempotent) is a SerializationError, before anything is written."""
    regions = saga.Saga("regions", input=Region)

    @regions.step()
    async def place(ctx: saga.Context[Region]) -> str:
        return ctx.input.region

    approval = regions.wait_for("approval", Region)

    @regions.step()
    async def confirm(ctx: saga.Context[Region]) -> str:
        return ctx.result(approval).region

    once = saga.Saga("once", input=Once)

    @once.step()
    async def go(ctx: saga.Context[Once]) -> str:
        return ctx.input.region

    orch = await orchestrator(regions, once)
    with pytest.raises(saga.InvalidInputError, match=r"saga 'regions'.*KeyError"):
        await orch.start(regions, {"region": "mars"})
    with pytest.raises(saga.SerializationError, match=r"does not validate again.*KeyError"):
        await orch.start(once, {"region": "eu"})
    assert sum((await saga.count_runs(orch)).values()) == 0
    run = await orch.start(regions, {"region": "eu"})
    with pytest.raises(saga.InvalidInputError, match=r"signal 'approval'.*KeyError"):
        await orch.signal(run.id, approval, {"region": "mars"})
    assert await orch.signal(run.id, approval, {"region": "eu"})
    assert await run.result(timeout=10) == "eu-west-1"
