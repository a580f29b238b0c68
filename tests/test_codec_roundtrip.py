"""Property tests of the payload codec, without a database.

``saga._codec`` is private: these tests pin what the README promises of every payload
("Inputs and results round-trip exactly", "Bad input") at the one place that decides it.
What ``encode`` accepts, ``decode`` returns equal and with identical types (floats stay
floats, ints stay ints, all the way down); everything else raises ``SerializationError``,
never another exception type.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections import OrderedDict
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter

from saga import SerializationError
from saga._codec import decode, encode
from tests import _payloads as m
from tests._payloads import assert_identical

# --- strategies --------------------------------------------------------------------------

# Finite floats of every magnitude, plus the ones JSON libraries get wrong.
floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [*m.FLOATS, 2.2250738585072014e-308, 1e16, 123456789.12345678, 0.1 + 0.2]
)
ints = st.integers() | st.integers(-(2**256), 2**256) | st.sampled_from(m.BIG_INTS)
# Any Unicode scalar value except NUL (Postgres text cannot hold it): astral planes,
# emoji, combining marks and line separators included; lone surrogates excluded.
texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
scalars = st.none() | st.booleans() | ints | floats | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=25,
)


class Hostile:
    """An object whose every comparison and text representation raises."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        raise RuntimeError("repr")


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# Values with no exact JSON form inside a model's dict[str, Any] field.
unstorable_in_model = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
    st.sets(st.integers(), max_size=3),
    st.frozensets(texts, max_size=3),
    st.tuples(scalars, scalars),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.uuids(),
    st.builds(object),
    st.builds(Hostile),
    st.builds(complex, floats, floats),
    st.builds(m.Item, sku=texts, qty=st.integers()),
    texts.map(lambda s: s + "\x00"),
    texts.map(lambda s: "\ud800" + s),
    st.dictionaries(st.integers(), scalars, min_size=1, max_size=2),
    st.dictionaries(texts.map(lambda s: s + "\x00"), scalars, min_size=1, max_size=2),
    st.just(_deep(101)),
    st.just(10**4400),
)
# Under a bare Any, also values that compare equal to what comes back (a str enum
# equals its str): their type would change.
unstorable = unstorable_in_model | st.sampled_from(
    [m.Color.RED, m.Level.HIGH, m.Size.SMALL, OrderedDict(a=1), m.Label("x")]
)


@st.composite
def embedded(draw: st.DrawFn, inner: st.SearchStrategy[Any]) -> Any:
    """``inner`` drawn, then nested 0 to 3 levels deep among JSON siblings."""
    value = draw(inner)
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            siblings = draw(st.lists(json_values, max_size=3))
            siblings.insert(draw(st.integers(0, len(siblings))), value)
            value = siblings
        else:
            mapping = draw(st.dictionaries(texts, json_values, max_size=3))
            key = draw(texts.filter(lambda k, d=mapping: k not in d))
            mapping[key] = value
            value = mapping
    return value


class Loose(BaseModel):
    data: dict[str, Any]


class Rich(BaseModel):
    when: dt.datetime
    day: dt.date
    span: dt.timedelta
    amount: Decimal
    ident: uuid.UUID
    ratio: float
    count: int
    label: str
    tags: list[str]


offsets = st.sampled_from(
    [
        None,
        dt.UTC,
        dt.timezone(dt.timedelta(hours=5, minutes=30)),
        dt.timezone(-dt.timedelta(hours=11, minutes=59)),
    ]
)
rich = st.builds(
    Rich,
    when=st.datetimes(timezones=offsets),
    day=st.dates(),
    span=st.timedeltas(),
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    ident=st.uuids(),
    ratio=floats,
    count=ints,
    label=texts,
    tags=st.lists(texts, max_size=3),
)

SETTINGS = settings(max_examples=300, deadline=None)


# --- properties --------------------------------------------------------------------------


@SETTINGS
@given(value=json_values)
def test_json_values_round_trip_with_identical_types(value: Any) -> None:
    """Every JSON-like value (finite floats of any magnitude, big ints, any Unicode text
    but NUL, nested lists and dicts) is accepted under Any and decodes equal, with the
    same type at every level: 1.0 stays a float, 1e20 stays a float, 2**70 an int."""
    assert_identical(value, decode(encode(value)))


@SETTINGS
@given(value=json_values)
def test_json_values_round_trip_inside_a_model(value: Any) -> None:
    """The same values held by a model's dict[str, Any] field, and returned under
    dict[str, Any] and list[Any], come back identical."""
    model = Loose(data={"v": value})
    assert_identical(model, decode(encode(model, Loose), Loose))
    assert_identical({"v": value}, decode(encode({"v": value}, dict[str, Any]), dict[str, Any]))
    assert_identical([value], decode(encode([value], list[Any]), list[Any]))


@SETTINGS
@given(value=embedded(unstorable))
def test_unstorable_values_raise_serialization_error(value: Any) -> None:
    """A JSON-like value holding, anywhere, something with no exact JSON form under Any
    (NaN, infinities, bytes, sets, tuples, datetimes, decimals, UUIDs, enums, models,
    arbitrary or hostile objects, NUL, lone surrogates, non-str keys, nesting beyond 100
    levels, ints beyond 4300 digits) raises SerializationError, nothing else."""
    with pytest.raises(SerializationError):
        encode(value)


@SETTINGS
@given(value=embedded(unstorable_in_model))
def test_unstorable_values_in_a_model_raise_serialization_error(value: Any) -> None:
    """The same values inside a model's dict[str, Any] field raise SerializationError,
    nothing else."""
    with pytest.raises(SerializationError):
        encode(Loose(data={"v": value}), Loose, what="input")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(math.nan, id="nan"),
        pytest.param(-math.inf, id="infinity"),
        pytest.param(b"\xff", id="bytes"),
        pytest.param({1, 2}, id="set"),
        pytest.param((1, 2), id="tuple"),
        pytest.param(dt.datetime(2020, 1, 1), id="datetime"),
        pytest.param(Decimal("1.5"), id="decimal"),
        pytest.param(uuid.UUID(int=7), id="uuid"),
        pytest.param("a\x00", id="nul"),
        pytest.param("\udc80", id="lone_surrogate"),
        pytest.param({1: "x"}, id="int_key"),
        pytest.param(1 + 2j, id="complex"),
        pytest.param(object(), id="object"),
        pytest.param(Hostile(), id="hostile_object"),
    ],
)
def test_refusal_names_the_path_to_the_bad_value(bad: Any) -> None:
    """A bad value nested in a model's dict[str, Any] field, or in a plain value under
    Any, is refused with the path to it (README, "Bad input")."""
    with pytest.raises(SerializationError) as in_model:
        encode(Loose(data={"v": [1, bad]}), Loose, what="input")
    assert "data['v'][1]" in str(in_model.value)
    with pytest.raises(SerializationError) as in_value:
        encode({"v": [1, bad]}, what="input")
    assert "['v'][1]" in str(in_value.value)


@SETTINGS
@given(value=embedded(scalars | unstorable))
def test_encode_either_round_trips_exactly_or_raises_serialization_error(value: Any) -> None:
    """For any mixture, encode either raises SerializationError or returns a text that
    decodes to an identical value: never another exception, never a silent change."""
    try:
        text = encode(value)
    except SerializationError:
        return
    assert_identical(value, decode(text))


@SETTINGS
@given(model=rich)
def test_typed_model_fields_round_trip_exactly(model: Rich) -> None:
    """A model of datetimes (naive and with offsets), dates, timedeltas, decimals of any
    digits and exponent, UUIDs, finite floats, big ints and Unicode text comes back
    identical: same offsets, same decimal digits, floats still floats."""
    assert_identical(model, decode(encode(model, Rich), Rich))


@SETTINGS
@given(
    value=st.sampled_from([m.Color.RED, m.Level.HIGH, OrderedDict(a=1), m.Label("x")]),
    annotation=st.sampled_from([Loose, dict[str, Any], list[Any]]),
)
def test_values_that_only_compare_equal_are_refused_under_declared_types(
    value: Any, annotation: Any
) -> None:
    """A str enum, an IntEnum, an OrderedDict or a str subclass in an Any position of a
    declared type is refused, as it is under a bare Any (it would come back as str,
    int or dict)."""
    payload = {
        Loose: Loose(data={"v": value}),
        list[Any]: [value],
    }.get(annotation, {"v": value})
    with pytest.raises(SerializationError):
        encode(payload, annotation)


@settings(max_examples=300, deadline=None)
@given(
    value=ints | texts | st.booleans(),
    declared=st.sampled_from(["exact", "any"]),
)
def test_plain_results_take_the_short_path_with_the_same_text(value: Any, declared: str) -> None:
    """Property: an int, str or bool result declared as its own type (or not declared)
    skips pydantic, and its text is exactly what pydantic's JSON dump gives; it decodes
    to an identical value. (The short path runs on every step of such sagas.)"""
    annotation = type(value) if declared == "exact" else Any
    text = encode(value, annotation)
    assert json.loads(text) == TypeAdapter(annotation).dump_python(value, mode="json")
    assert_identical(decode(text, annotation), value)


def test_a_plain_result_above_the_limit_is_refused() -> None:
    """The short path keeps the payload limit: a long string result is refused, naming
    the limit."""
    with pytest.raises(SerializationError, match="max_payload_bytes"):
        encode("x" * 2000, str, max_bytes=1000)
