"""Typed uses of the API that mypy --strict must accept (checked, never run): the
README's annotations for lists of sagas, the input forms start() and Scheduled take, a
typed signal through a handle, and the types ctx.result() gives."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, assert_type

from pydantic import BaseModel

import saga


class Order(BaseModel):
    order_id: str


class Refund(BaseModel):
    refund_id: str


class Approval(BaseModel):
    approved: bool


checkout = saga.Saga("checkout", input=Order)
refunds = saga.Saga("refunds", input=Refund)


@checkout.step()
async def reserve(ctx: saga.Context[Order]) -> list[str]:
    return [ctx.input.order_id]


approval = checkout.wait_for("approval", Approval)


@checkout.step()
async def ship(ctx: saga.Context[Order]) -> int:
    assert_type(ctx.result(reserve), list[str])
    assert_type(ctx.result(approval), Approval)
    return len(ctx.result(reserve))


@refunds.step()
async def refund(ctx: saga.Context[Refund]) -> None:
    return None


# Sagas of different input models in one list: annotated, as the README says.
SAGAS: list[saga.Saga[Any]] = [checkout, refunds]


async def report_input(slot: datetime) -> Order:
    return Order(order_id=slot.isoformat())


def mapping_input(slot: datetime) -> dict[str, Any]:
    return {"order_id": slot.isoformat()}


every_hour = saga.Schedule.every(timedelta(hours=1))
SCHEDULES: list[saga.Scheduled[Any]] = [
    saga.Scheduled("async-input", checkout, every_hour, report_input),
    saga.Scheduled("mapping-input", checkout, every_hour, mapping_input),
    saga.Scheduled("model-input", checkout, every_hour, Order(order_id="o")),
]


async def use(dsn: str) -> None:
    async with saga.Orchestrator(dsn, sagas=SAGAS, schedules=SCHEDULES) as orch:
        run = await checkout.start({"order_id": "o-1"}, key="o-1", priority=None)
        assert await run.signal(approval, Approval(approved=True))
        assert await run.signal("approval", {"approved": True})
        await orch.start(refunds, Refund(refund_id="r-1"))


async def refused(dsn: str, run: saga.RunHandle) -> None:
    """What mypy must refuse (an unused ignore would fail the check)."""
    await run.signal(approval, Refund(refund_id="r"))  # type: ignore[misc]
    await run.signal(42, {})  # type: ignore[arg-type]
    await checkout.start(Refund(refund_id="r"))  # type: ignore[arg-type]


@checkout.step()
async def reads_another_saga(ctx: saga.Context[Order]) -> None:
    ctx.result(refund)  # type: ignore[arg-type]


async def default_approval(ctx: saga.Context[Order]) -> Approval:
    return Approval(approved=False)


async def default_mapping(ctx: saga.Context[Order]) -> dict[str, Any]:
    return {"approved": False}


async def wrong_default(ctx: saga.Context[Order]) -> Refund:
    return Refund(refund_id="r")


orders = saga.Saga("orders", input=Order)


@orders.step()
async def place(ctx: saga.Context[Order]) -> None:
    return None


orders.wait_for("approval", Approval, timeout=60, on_timeout=default_approval)


@orders.step()
async def confirm(ctx: saga.Context[Order]) -> None:
    return None


orders.wait_for("second", Approval, timeout=60, on_timeout=default_mapping)


@orders.step()
async def settle(ctx: saga.Context[Order]) -> None:
    return None


# An on_timeout returning another model than the wait's: refused by mypy.
orders.wait_for("third", Approval, timeout=60, on_timeout=wrong_default)  # type: ignore[arg-type]


@orders.step()
async def close(ctx: saga.Context[Order]) -> None:
    return None
