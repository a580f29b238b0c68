"""The JSON codec refuses lossy values and round-trips the rest: pure logic (private:
``saga._codec``, the one place that decides what a payload may be, is what this checks)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from saga import PayloadTooLargeError, SerializationError
from saga._codec import decode, encode


class Item(BaseModel):
    sku: str
    price: Decimal
    at: dt.datetime


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (float("nan"), "value"),
        ({"a": [1, float("-inf")]}, r"value\['a'\]\[1\]"),
        (b"bytes", "value"),
        (bytearray(b"x"), "value"),
        ({1, 2}, "value"),
        ({1: "int key"}, "value"),
        ("nul\x00", "value"),
        ("lone \ud800 surrogate", "value"),
        ({"k\x00": 1}, r"value\['k\\x00'\]"),
    ],
)
def test_lossy_values_are_refused_with_their_location(value: Any, where: str) -> None:
    """NaN, infinities, bytes, sets, non-str keys, NUL and lone surrogates raise
    SerializationError naming where in the value they sit."""
    with pytest.raises(SerializationError, match=where):
        encode(value)


def test_arbitrary_objects_are_refused() -> None:
    """An object pydantic cannot serialize raises SerializationError, not a driver error."""
    with pytest.raises(SerializationError, match="object"):
        encode(object())


def test_size_cap() -> None:
    """Payloads above max_bytes raise PayloadTooLargeError naming both sizes."""
    encode("x" * 90, max_bytes=100)
    with pytest.raises(PayloadTooLargeError, match="above the limit of 100 bytes"):
        encode("x" * 200, max_bytes=100)


def test_models_and_rich_types_round_trip() -> None:
    """Models, Decimals, datetimes and UUIDs come back equal, as their declared types."""
    item = Item(sku="A-1", price=Decimal("9.99"), at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    assert decode(encode(item, Item), Item) == item
    ident = uuid.uuid4()
    assert decode(encode(ident, uuid.UUID), uuid.UUID) == ident
    assert decode(encode({"a": [1, 2.5, None, "é"]})) == {"a": [1, 2.5, None, "é"]}
    assert decode(encode(None)) is None


def test_deep_nesting_is_refused() -> None:
    """Absurdly deep values are refused instead of blowing the stack."""
    value: Any = []
    for _ in range(200):
        value = [value]
    with pytest.raises(SerializationError, match="nested"):
        encode(value)


class Stamped(BaseModel):
    at: dt.datetime
    times: list[dt.time] = []


_FIXED = [
    dt.UTC,
    dt.timezone(dt.timedelta(hours=5, minutes=30)),
    dt.timezone(dt.timedelta(hours=-3)),
    ZoneInfo("UTC"),
    ZoneInfo("Etc/GMT+3"),  # a fixed zone, whatever its name
]
_VARYING = ["Europe/Paris", "America/New_York", "Australia/Sydney", "Asia/Tehran"]


@settings(max_examples=60, deadline=None)
@given(
    at=st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    zone=st.sampled_from(_FIXED),
    where=st.sampled_from(["at", "times"]),
)
def test_datetimes_in_utc_or_a_fixed_offset_round_trip(
    at: dt.datetime, zone: dt.tzinfo, where: str
) -> None:
    """A datetime (or time) in UTC or any fixed offset, a field or inside a list, is
    stored and read back as the same instant in the same offset."""
    aware = at.replace(tzinfo=zone)
    value = {
        "at": Stamped(at=aware),
        "times": Stamped(at=aware, times=[aware.timetz()]),
    }[where]
    back = decode(encode(value, Stamped), Stamped)
    assert back.at == aware
    assert back.at.utcoffset() == aware.utcoffset()
    assert [t.utcoffset() for t in back.times] == [t.utcoffset() for t in value.times]


@settings(max_examples=60, deadline=None)
@given(
    at=st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    zone=st.sampled_from(_VARYING),
)
def test_a_datetime_in_a_zone_whose_offset_varies_is_refused(at: dt.datetime, zone: str) -> None:
    """A datetime in a named zone whose offset varies (Europe/Paris) would come back
    with its day's fixed offset only, another value (a day later is another instant
    across a change to summer time): refused, naming the field and what to do."""
    value = Stamped(at=at.replace(tzinfo=ZoneInfo(zone)))
    with pytest.raises(SerializationError, match=rf"\.at: its time zone {zone} .*UTC"):
        encode(value, Stamped)
