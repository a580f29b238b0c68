"""The JSON codec refuses lossy values and round-trips the rest: pure logic (private:
``saga._codec``, the one place that decides what a payload may be, is what this checks)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
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
