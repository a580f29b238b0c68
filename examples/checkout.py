"""The sagas module the web examples share: definitions only, no I/O at import.

A worker process runs these sagas with::

    saga worker examples.checkout:SAGAS --dsn postgresql://...

and a web process (``examples/fastapi_app.py``, ``examples/aiohttp_app.py``, or
``examples/client_worker/web.py`` in client mode) starts runs of them. Both import this
one module, so they agree on the saga's name, version and steps.

The steps stand in for real services: ``reserve_stock``, ``charge_card`` and ``ship``
each take ``step_delay`` seconds (so examples and tests can watch a run in flight), a
card named ``"declined"`` fails the charge for good (the reservation is then released),
and a destination ``"nowhere"`` fails the shipping (the charge is refunded, then the
reservation released).
"""

from __future__ import annotations

import os
import socket

import anyio
from pydantic import BaseModel, Field

import saga


class Order(BaseModel):
    """What a client posts to create an order."""

    order_id: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0)
    card: str = "visa"
    destination: str = "Lyon"
    # gt=0 refuses NaN and -Infinity but lets +Infinity through: start() then refuses it
    # with saga.SerializationError (the web apps answer 422).
    weight_kg: float = Field(default=1.0, gt=0)
    step_delay: float = Field(default=0.0, ge=0, le=5)


class Receipt(BaseModel):
    """The charge, as the payment service would return it."""

    charge_id: str
    amount_cents: int


class Shipment(BaseModel):
    """The saga's output: where the parcel goes, and which process shipped it."""

    order_id: str
    tracking: str
    charge_id: str
    weight_kg: float
    shipped_by: str


checkout = saga.Saga("checkout", input=Order)
FAST_RETRY = saga.Retry(max_attempts=3, initial_delay=0.05, max_delay=0.5)


@checkout.step(retry=FAST_RETRY, timeout=10)
async def reserve_stock(ctx: saga.Context[Order]) -> str:
    """Reserve the goods; the idempotency key makes a repeated call a no-op."""
    await anyio.sleep(ctx.input.step_delay)
    return f"rsv-{ctx.input.order_id}"


@reserve_stock.compensate
async def release_stock(ctx: saga.Context[Order], reservation_id: str) -> None:
    """Give the reservation back."""
    await anyio.sleep(ctx.input.step_delay)


@checkout.step(retry=FAST_RETRY, timeout=10)
async def charge_card(ctx: saga.Context[Order]) -> Receipt:
    """Charge the card; a declined card is a permanent failure (no retries)."""
    await anyio.sleep(ctx.input.step_delay)
    if ctx.input.card == "declined":
        raise saga.PermanentError("card declined by issuer")
    return Receipt(charge_id=f"ch-{ctx.input.order_id}", amount_cents=ctx.input.amount_cents)


@charge_card.compensate
async def refund(ctx: saga.Context[Order], receipt: Receipt) -> None:
    """Refund the charge."""
    await anyio.sleep(ctx.input.step_delay)


@checkout.step(retry=FAST_RETRY, timeout=10)
async def ship(ctx: saga.Context[Order]) -> Shipment:
    """Hand the parcel to a courier."""
    await anyio.sleep(ctx.input.step_delay)
    if ctx.input.destination == "nowhere":
        raise saga.PermanentError("no courier delivers there")
    return Shipment(
        order_id=ctx.input.order_id,
        tracking=f"trk-{ctx.result(reserve_stock)}",
        charge_id=ctx.result(charge_card).charge_id,
        weight_kg=ctx.input.weight_kg,
        shipped_by=f"{socket.gethostname()}:{os.getpid()}",
    )


#: What ``saga worker examples.checkout:SAGAS`` runs.
SAGAS = [checkout]
