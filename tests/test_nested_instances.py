"""Model instances inside an input that were never validated (`model_construct`):
invalid input wherever they are, while valid instances that cannot be stored stay a
`SerializationError`. README, Payloads and What you can rely on."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from pydantic import BaseModel, ConfigDict, Field, field_serializer

import saga
from tests._sagas import parked_saga
from tests.conftest import ClientFactory

pytestmark = pytest.mark.timeout(60)


class _Tagged(BaseModel):
    """A model whose field is stored under an alias (a camelCase API)."""

    model_config = ConfigDict(populate_by_name=False)
    item_name: str = Field(alias="itemName")
    at: datetime


class _Order(BaseModel):
    tagged: _Tagged


class _Cents(BaseModel):
    """A serializer whose output does not validate back."""

    amount: int

    @field_serializer("amount")
    def _as_text(self, amount: int) -> str:
        return f"{amount} cents"


class _Cart(BaseModel):
    cents: _Cents


_PARIS = datetime(2026, 3, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))


@pytest.mark.parametrize(
    ("model", "value"),
    [
        (_Order, {"tagged": _Tagged(itemName="tea", at=_PARIS)}),
        (_Cart, {"cents": _Cents(amount=5)}),
    ],
    ids=["aliased_model_with_zoneinfo_datetime", "serializer_output_does_not_validate"],
)
async def test_a_valid_instance_inside_a_mapping_that_cannot_round_trip_is_a_serialization_error(
    open_client: ClientFactory, db: asyncpg.Connection, model: type[BaseModel], value: Any
) -> None:
    """README, Payloads: where a value would come back different ("a serializer whose
    output does not validate", a datetime in a zone whose offset varies), `start()`
    "refuses it with a `SerializationError`"; aliases "work as you write them".

    A valid instance (aliased, holding a Paris datetime; or with such a serializer)
    inside a mapping is refused as SerializationError, not blamed as invalid input. (A
    first version of the check for unvalidated instances validated their dumps, which
    do not validate back, and raised InvalidInputError.)"""
    s = parked_saga(f"roundtrip_{model.__name__.lower().strip('_')}", input=model)
    await open_client(s)
    with pytest.raises(saga.SerializationError):
        await s.start(value)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_a_valid_instance_whose_serializer_does_not_validate_is_a_serialization_error(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README, Payloads: "a serializer whose output does not validate" is refused with a
    `SerializationError`. Given as the model instance (`_Cents(amount=5)`), as given as
    a mapping, the input is refused so, not as InvalidInputError (it was: its dump was
    validated)."""
    s = parked_saga("serializer_instance", input=_Cents)
    await open_client(s)
    with pytest.raises(saga.SerializationError):
        await s.start({"amount": 5})
    with pytest.raises(saga.SerializationError):
        await s.start(_Cents(amount=5))
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


class _Sku(BaseModel):
    sku: str


class _Line(NamedTuple):
    item: _Sku
    quantity: int


@dataclasses.dataclass
class _Crate:
    item: _Sku


class _Shipment(BaseModel):
    line: _Line | None = None
    crate: _Crate | None = None


@pytest.mark.parametrize(
    "value",
    [
        {"line": _Line(_Sku.model_construct(sku=5), 1)},
        {"crate": _Crate(_Sku.model_construct(sku=5))},
    ],
    ids=["in_a_namedtuple", "in_a_dataclass"],
)
async def test_an_unvalidated_instance_inside_a_namedtuple_or_dataclass_is_invalid_input(
    open_client: ClientFactory, db: asyncpg.Connection, value: Any
) -> None:
    """README: "invalid input raises `InvalidInputError` and nothing is written". An
    instance built with `model_construct` that does not validate, inside a `NamedTuple`
    or a dataclass the input model declares, is InvalidInputError naming where, as in
    a plain tuple or a mapping (it was a SerializationError)."""
    s = parked_saga("nested_unvalidated", input=_Shipment)
    await open_client(s)
    with pytest.raises(saga.InvalidInputError, match=r"sku"):
        await s.start(value)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0
