"""Shared scaffolding of the payload tests: exact comparison, and models using every
pydantic feature the README promises to round-trip (aliases, secrets, serializers,
validators, discriminated unions, generics, datetimes, decimals, UUIDs, enums).

Models live at module level so that step return annotations naming them resolve.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import uuid
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Secret,
    SecretBytes,
    SecretStr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    Tag,
    computed_field,
    field_serializer,
    field_validator,
    model_serializer,
)
from pydantic.alias_generators import to_camel

_SECRETS = (SecretStr, SecretBytes, Secret)


def assert_identical(expected: Any, actual: Any, path: str = "value") -> None:
    """``actual`` equals ``expected`` with the same types all the way down: floats stay
    floats (sign of zero included), tuples stay tuples, models keep their fields and
    extras, secrets their values, datetimes their UTC offset, decimals their digits."""
    assert type(actual) is type(expected), f"{path}: {type(expected)} became {type(actual)}"
    if isinstance(expected, BaseModel):
        for name in type(expected).model_fields:
            assert_identical(getattr(expected, name), getattr(actual, name), f"{path}.{name}")
        assert_identical(expected.model_extra, actual.model_extra, f"{path}(extra)")
    elif isinstance(expected, _SECRETS):
        assert_identical(expected.get_secret_value(), actual.get_secret_value(), f"{path}(secret)")
    elif isinstance(expected, dict):
        assert list(expected) == list(actual), f"{path}: keys {list(expected)} != {list(actual)}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), f"{path}: length changed"
        for index, (x, y) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(x, y, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert math.copysign(1.0, expected) == math.copysign(1.0, actual), f"{path}: sign"
    elif isinstance(expected, Decimal):
        assert expected.as_tuple() == actual.as_tuple(), f"{path}: {expected!r} != {actual!r}"
    elif isinstance(expected, dt.datetime | dt.time):
        assert expected.utcoffset() == actual.utcoffset(), f"{path}: offset changed"
    assert expected == actual, f"{path}: {expected!r} != {actual!r}"


# --- the models ------------------------------------------------------------------------


class Job(BaseModel):
    """A plain input, for sagas whose payload under test is a step result."""

    n: int


class Aliased(BaseModel):
    order_id: str = Field(alias="orderId")
    amount_cents: int = Field(alias="amount-cents")


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel)
    user_name: str
    home_address: str | None = None


class CamelByName(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    user_name: str
    zip_code: int


class SplitAliasByName(BaseModel):
    """Reads ``userName``, writes ``user`` by alias; populate_by_name=True, so its own
    JSON (``model_dump_json()``, by field name) validates back."""

    model_config = ConfigDict(populate_by_name=True)
    user_name: str = Field(validation_alias="userName", serialization_alias="user")


class SplitAlias(BaseModel):
    """Reads ``userName``, writes ``user``: its own JSON never validates back."""

    user_name: str = Field(validation_alias="userName", serialization_alias="user")


class Secrets(BaseModel):
    password: SecretStr
    pin: Secret[int]
    tokens: list[SecretStr]
    by_host: dict[str, SecretStr]
    nested: dict[str, list[Secret[int]]]
    maybe: SecretStr | None = None


class Blob(BaseModel):
    key: SecretBytes


class Serialized(BaseModel):
    """Plain and wrap field serializers, JSON-only and always, that round-trip."""

    count: int
    amount: Decimal
    tags: list[str]
    window: list[int]

    @field_serializer("count", when_used="json")
    def _count_as_text(self, value: int) -> str:
        return str(value)

    @field_serializer("amount", when_used="always")
    def _amount_as_text(self, value: Decimal) -> str:
        return str(value)

    @field_serializer("tags", mode="wrap", when_used="json")
    def _tags_joined(self, value: list[str], handler: SerializerFunctionWrapHandler) -> str:
        return ",".join(handler(value))

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_split(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @field_serializer("window", mode="wrap", when_used="always")
    def _window_boxed(
        self, value: list[int], handler: SerializerFunctionWrapHandler
    ) -> dict[str, Any]:
        return {"items": handler(value)}

    @field_validator("window", mode="before")
    @classmethod
    def _window_unboxed(cls, value: Any) -> Any:
        return value["items"] if isinstance(value, dict) else value


class ModelSerialized(BaseModel):
    """A plain model serializer writing its own shape, which validates back."""

    who: str
    when: dt.datetime

    @model_serializer(mode="plain")
    def _shape(self) -> dict[str, Any]:
        return {"who": self.who, "when": self.when.isoformat()}


class WrapModelSerialized(BaseModel):
    """A wrap model serializer adding a key that validation ignores."""

    n: int

    @model_serializer(mode="wrap")
    def _versioned(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        return {**handler(self), "schema_version": 2}


def _from_cents(value: Any) -> Any:
    return Decimal(value) / 100 if isinstance(value, int) else value


Cents = Annotated[
    Decimal,
    PlainSerializer(lambda d: int(d * 100), return_type=int),
    BeforeValidator(_from_cents),
]
Email = Annotated[str, BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v)]


class Normalized(BaseModel):
    price: Cents
    email: Email
    handle: str

    @field_validator("handle")
    @classmethod
    def _normalized(cls, value: str) -> str:
        return value.strip().lower()


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    good: bool


Pet = Annotated[Cat | Dog, Field(discriminator="kind")]


class Pets(BaseModel):
    favourite: Pet
    others: list[Pet]


class CardPay(BaseModel):
    via: str = "card"
    ref: str


class BankPay(BaseModel):
    via: str = "bank"
    ref: str


def _payment_tag(value: Any) -> Any:
    return value.get("via") if isinstance(value, dict) else getattr(value, "via", None)


# Same shape on both sides: only the callable discriminator tells them apart.
Payment = Annotated[
    Annotated[CardPay, Tag("card")] | Annotated[BankPay, Tag("bank")],
    Discriminator(_payment_tag),
]


class Payments(BaseModel):
    first: Payment
    rest: list[Payment]
    note: str = ""


T = TypeVar("T")


class Item(BaseModel):
    sku: str
    qty: int


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class Envelope(BaseModel, Generic[T]):
    body: T
    pages: list[Page[T]]


class Times(BaseModel):
    aware: dt.datetime
    utc: dt.datetime
    naive: dt.datetime
    day: dt.date
    at: dt.time
    at_aware: dt.time
    span: dt.timedelta
    spans: list[dt.timedelta]


class Decimals(BaseModel):
    values: list[Decimal]
    one: Decimal


class Color(str, enum.Enum):  # noqa: UP042 (the str mixin users write)
    RED = "red"
    GREEN = "green"


class Size(enum.Enum):
    SMALL = 1
    LARGE = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 3


class Choices(BaseModel):
    color: Color
    size: Size
    level: Level
    mode: Literal["fast", "slow", 3]
    ident: uuid.UUID
    idents: dict[str, uuid.UUID]


class Shapes(BaseModel):
    numbers: tuple[int, ...]
    pair: tuple[str, float]
    maybe: int | None = None
    missing: str | None = None
    listed: list[int] = Field(default_factory=list)
    stamp: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    ident: uuid.UUID = Field(default_factory=uuid.uuid4)


class Tags(BaseModel):
    tags: frozenset[str]
    ids: set[int]


class Computed(BaseModel):
    price_cents: int
    qty: int

    @computed_field
    @property
    def total_cents(self) -> int:
        return self.price_cents * self.qty


class ComputedForbid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int

    @computed_field
    @property
    def double(self) -> int:
        return self.a * 2


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class Loose(BaseModel):
    data: dict[str, Any]
    anything: Any = None


FLOATS = [1.0, 1e20, 1e-7, 1e300, -0.0, 0.1, 5e-324, 1.7976931348623157e308, -2.5]
BIG_INTS = [2**70, -(2**70), 2**64, -(2**63) - 1, 10**100]
UNICODE = {
    "ключ🔑": "значение🎉",
    "": "\u200d",
    "日本語": "\U0001d518\U0001d52b\U0001d526 (astral)",
    "עברית": "e\u0301 combining",
    'quote"back\\slash': "tab\tnew\nline\r\u2028",
    "👩‍👩‍👧": "🏳️‍🌈",
}


class Text(BaseModel):
    title: str
    by_lang: dict[str, str]


# --- validators with side effects --------------------------------------------------------

validated: list[str] = []  # what Counted's validator saw, in order


class Counted(BaseModel):
    """A validator with a side effect (counting) that leaves the value unchanged."""

    name: str

    @field_validator("name")
    @classmethod
    def _count(cls, value: str) -> str:
        validated.append(value)
        return value


class Suffixed(BaseModel):
    """Not idempotent: every validation appends to the value."""

    name: str

    @field_validator("name")
    @classmethod
    def _suffix(cls, value: str) -> str:
        return value + "!"


Doubled = Annotated[int, BeforeValidator(lambda v: v * 2 if isinstance(v, int) else v)]


class DoubledOnRead(BaseModel):
    """Not idempotent: a before-validator doubles the number on every validation."""

    n: Doubled


class BadSerializer(BaseModel):
    """A serializer whose output does not validate as the field's type."""

    n: int

    @field_serializer("n", when_used="always")
    def _labelled(self, value: int) -> str:
        return f"n={value}"


class DroppingSerializer(BaseModel):
    """A model serializer that leaves out a required field."""

    a: int
    b: int

    @model_serializer(mode="plain")
    def _only_a(self) -> dict[str, Any]:
        return {"a": self.a}


class Floaty(BaseModel):
    x: float
    text: str = ""


class Label(str):
    """A str subclass, as users write for tagged strings."""
