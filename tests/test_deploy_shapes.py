"""Deploys: a changed stored shape is another definition (README "Deploys").

A rolling deploy puts two definitions of one saga on one database. A run records its
saga name, version and the definition's fingerprint, and only workers with that
fingerprint execute it. These tests change the stored form of an input or of a step's
result without a version bump (aliases, field order, what a NewType or a type alias
stands for) and check that the fingerprint changes, so that the new code never runs the
old data; and that a start through a new version does not hand back an old version's run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, NewType

import anyio
import pydantic
import pytest
import typing_extensions
from pydantic import BaseModel, Field
from typing_extensions import TypeAliasType

import saga
import saga.testing
from saga._codec import decode, encode
from tests._sagas import ONCE, Job, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

# -- an input model whose aliases changed ---------------------------------------------------


class OrderOld(BaseModel):
    amount: int = Field(validation_alias="amt", serialization_alias="amt")


class OrderNew(BaseModel):  # the same class, redeployed with the field's JSON name changed
    amount: int = Field(validation_alias="amount_cents", serialization_alias="amount_cents")


OrderNew.__name__ = OrderNew.__qualname__ = "OrderOld"


def _aliased(model: type[BaseModel], charged: list[int]) -> saga.Saga[Any]:
    s = saga.Saga("aliased", input=model)

    @s.step(retry=ONCE)
    async def charge(ctx: saga.Context[Any]) -> int:
        charged.append(int(ctx.input.amount))
        return int(ctx.input.amount)

    return s


@pytest.mark.timeout(60)
async def test_an_input_alias_change_is_another_definition(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """README "Deploys": the fingerprint is "a hash of the input model's fields (names,
    aliases, types)"; "An orchestrator executes only runs whose (name, version,
    fingerprint) it registered; others wait, untouched ... So a changed definition never
    runs old data".

    The input model's field is stored under its alias (``serialization_alias="amt"``);
    the new release renames the alias (both ways): the old release's run, stored as
    ``{"amt": 5}``, waits untouched for a worker with its definition, counted in
    ``unclaimable_runs()``."""
    old_calls: list[int] = []
    new_calls: list[int] = []
    old, new = _aliased(OrderOld, old_calls), _aliased(OrderNew, new_calls)
    assert encode(OrderOld(amt=5), OrderOld, what="input", max_bytes=100) == '{"amt":5}'
    with anyio.fail_after(45):
        web_old = await open_client(old)  # the previous release's web process
        run = await web_old.start(old, OrderOld(amt=5))
        worker_new = await orchestrator(new)  # the new release's worker
        await anyio.sleep(2)
        info = await run.info()
        unclaimable = await worker_new.unclaimable_runs()
    waited = info.status is saga.RunStatus.PENDING and bool(unclaimable)
    assert waited, (
        "expected the old release's run (input stored as {'amt': 5}) to wait, untouched, "
        "for a worker with its definition (counted in unclaimable_runs()); observed: the "
        f"new definition (same fingerprint {new.fingerprint == old.fingerprint}) ran it: "
        f"{info.status}, error {info.error and info.error.type}: "
        f"{info.error and info.error.message[:120]}; unclaimable_runs()={unclaimable}"
    )


# -- a step result whose fields changed ------------------------------------------------------


class QuoteOld(NamedTuple):
    amount: int
    fee: int


class QuoteNew(NamedTuple):  # the same result type, redeployed with its fields reordered
    fee: int
    amount: int


QuoteNew.__name__ = QuoteNew.__qualname__ = "QuoteOld"


def _quoting(result_type: Any, paid: list[int]) -> saga.Saga[Any]:
    s = saga.Saga("quoting", input=Job)

    async def quote(ctx: saga.Context[Job]) -> Any:
        return result_type(amount=100, fee=1)

    quote.__annotations__ = {"ctx": saga.Context[Job], "return": result_type}
    quoted = s.step(retry=ONCE)(quote)
    s.sleep(3600)

    @s.step(retry=ONCE)
    async def pay(ctx: saga.Context[Job]) -> int:
        amount = int(ctx.result(quoted).amount)
        paid.append(amount)
        return amount

    return s


@pytest.mark.timeout(60)
async def test_a_result_type_change_is_another_definition(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Deploys": the fingerprint covers "the steps, their order, result types";
    "a changed definition never runs old data". A step's result type is a NamedTuple
    (stored as a JSON array); the new release reorders its fields. A run that completed
    ``quote`` under the old release and sleeps across the deploy keeps sleeping when the
    new worker's clock passes its end: the new definition never reads ``[100, 1]`` as
    ``fee=100, amount=1``."""
    paid_old: list[int] = []
    paid_new: list[int] = []
    old, new = _quoting(QuoteOld, paid_old), _quoting(QuoteNew, paid_new)
    with anyio.fail_after(45):
        worker_old = await orchestrator(old)
        started = await worker_old.start(old, Job(n=1))
        await until_status(started, saga.RunStatus.SLEEPING)
        await worker_old.aclose()  # the deploy: the old worker is gone
        worker_new = await orchestrator(new)
        run = worker_new.get_run(started.id)
        await saga.testing.advance(worker_new, run, 7200)  # its sleep ends
        await anyio.sleep(2)
        info = await run.info()
    waited = info.status is saga.RunStatus.SLEEPING and not paid_new
    assert waited, (
        "expected the run (quote stored as [100, 1] by the old QuoteOld(amount, fee)) to "
        "keep waiting for the old definition; observed: the new definition ran 'pay' on "
        f"it and paid {paid_new} (the quote was 100), run {info.status}"
    )


# -- the fingerprint of other stored shapes --------------------------------------------------


@pydantic.dataclasses.dataclass
class FeeOld:
    amount: int = Field(alias="amt")


@pydantic.dataclasses.dataclass
class FeeNew:
    amount: int = Field(alias="amount_cents")


FeeNew.__name__ = FeeNew.__qualname__ = "FeeOld"
assert dataclasses.is_dataclass(FeeNew)


SHAPES: dict[str, tuple[Any, Any, Any]] = {
    # (old result type, new result type, a value of the old one)
    "pydantic dataclass field re-aliased": (FeeOld, FeeNew, FeeOld(amt=5)),
    "NamedTuple fields reordered": (QuoteOld, QuoteNew, QuoteOld(amount=100, fee=1)),
    "NewType over another type": (NewType("Cents", int), NewType("Cents", str), 5),
    "type alias to another type": (
        TypeAliasType("Amount", int),
        TypeAliasType("Amount", str),
        5,
    ),
}


def _meaning(value: Any) -> Any:
    """A value by field name (a NamedTuple compares as a plain tuple otherwise)."""
    if hasattr(value, "_asdict"):
        return dict(value._asdict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _one_step(result_type: Any) -> saga.Saga[Any]:
    s = saga.Saga("shaped", input=Job)

    async def produce(ctx: saga.Context[Job]) -> Any:
        return None

    produce.__annotations__ = {"ctx": saga.Context[Job], "return": result_type}
    s.step()(produce)
    return s


@pytest.mark.timeout(30)
@pytest.mark.parametrize("change", list(SHAPES))
def test_the_fingerprint_sees_a_changed_result_shape(change: str) -> None:
    """README "Deploys": the fingerprint is a hash "of the steps, their order, result
    types" (saga/_fingerprint.py: "built from the structure of the stored data only"),
    so that "a changed definition never runs old data". Each case changes a step's
    result type so that the value the old definition stored no longer reads back as the
    same value under the new one (checked first): the fingerprints differ."""
    old_type, new_type, value = SHAPES[change]
    stored = encode(value, old_type, what="result", max_bytes=1000)
    try:
        same = _meaning(decode(stored, new_type)) == _meaning(decode(stored, old_type))
    except pydantic.ValidationError:
        same = False
    assert not same, f"{change}: the stored {stored} should read differently"
    old, new = _one_step(old_type), _one_step(new_type)
    assert old.fingerprint != new.fingerprint, (
        f"{change}: the stored result {stored} no longer reads back the same under the new "
        f"definition, but both definitions have fingerprint {old.fingerprint}"
    )


# -- idempotency keys across versions --------------------------------------------------------


class ReceiptV1(BaseModel):
    charge_id: str


class ReceiptV2(BaseModel):
    charge_id: str
    amount: int


class Order(BaseModel):
    order_id: str


def _checkout(version: int, output: type[BaseModel]) -> saga.Saga[Any]:
    s = saga.Saga("checkout", input=Order, output=output, version=version)

    async def charge(ctx: saga.Context[Order]) -> Any:
        if output is ReceiptV2:
            return ReceiptV2(charge_id="c", amount=5)
        return ReceiptV1(charge_id="c")

    charge.__annotations__ = {"ctx": saga.Context[Order], "return": output}
    s.step()(charge)
    return s


@pytest.mark.timeout(60)
async def test_a_start_of_v2_does_not_hand_back_a_v1_run_as_its_own(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """README "API": ``output`` "types `run.result()` (`Saga[Order, Receipt]` starts
    `RunHandle[Receipt]`)", and "`result()` still returns the output read back as its
    declared type"; "Deploys": "Deploying a change ...: bump `version`".

    An order's request is answered by the old release (checkout v1, key "o-1"); the
    client retries it after the deploy, against the new release's web process, which
    starts checkout v2 (another output model) with the same key: the start is refused
    with ``IdempotencyConflictError`` naming the v1 run (its handle would be typed for a
    ``ReceiptV2`` it cannot return), and ``require_same_input=False`` gets that run."""
    v1, v2 = _checkout(1, ReceiptV1), _checkout(2, ReceiptV2)
    with anyio.fail_after(45):
        old = await orchestrator(v1)
        first = await old.start(v1, Order(order_id="o-1"), key="o-1")
        assert isinstance(await first.result(timeout=10), ReceiptV1)
        new_web = await open_client(v2)  # the new release: checkout v2 only
        with pytest.raises(saga.IdempotencyConflictError) as refused:
            await new_web.start(v2, Order(order_id="o-1"), key="o-1")
        assert refused.value.run_id == first.id
        assert "version 1" in str(refused.value)
        same = await new_web.start(v2, Order(order_id="o-1"), key="o-1", require_same_input=False)
    assert same.id == first.id
    assert not same.created


def _payment_saga(amount_type: Any) -> saga.Saga[Job]:
    """A saga whose one step returns a ``Payment`` TypedDict (typing_extensions: the one
    README asks for before Python 3.12) with an ``amount`` of ``amount_type``."""

    Payment = typing_extensions.TypedDict(  # noqa: UP013 - a field of a given type
        "Payment", {"amount": amount_type, "fee": int}
    )

    s = saga.Saga("payments", input=Job)

    async def pay(ctx: saga.Context[Job]) -> Any:
        return Payment(amount=amount_type(1), fee=0)

    pay.__annotations__["return"] = Payment
    s.step(name="pay")(pay)
    return s


def test_the_fingerprint_sees_a_typing_extensions_typeddict() -> None:
    """A step's result is a ``typing_extensions.TypedDict`` (the one README asks for
    before Python 3.12) whose field ``amount`` changes from int to str: the fingerprint
    changes (it describes the fields, not only the name)."""
    old, new = _payment_saga(int), _payment_saga(str)
    from saga._fingerprint import describe_type

    desc = describe_type(old.get_step("pay").result_type)
    assert old.fingerprint != new.fingerprint, desc
