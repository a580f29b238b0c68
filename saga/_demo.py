"""The demo: one order saga that completes and one that fails and is compensated.

Runs on ``SAGA_DSN`` when set, else on an embedded PostgreSQL from the ``embedded`` extra
(data in ``.saga-demo/pgdata`` under the current folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import structlog
from pydantic import BaseModel

import saga


class Order(BaseModel):
    order_id: str
    amount_cents: int
    card: str


class Receipt(BaseModel):
    charge_id: str
    amount_cents: int


def build_checkout() -> saga.Saga[Order]:
    """The checkout saga of the README: reserve stock, charge the card, ship."""
    checkout = saga.Saga("demo_checkout", input=Order)
    fast = saga.Retry(max_attempts=3, initial_delay=0.05)

    @checkout.step(retry=fast, timeout=5)
    async def reserve_stock(ctx: saga.Context[Order]) -> str:
        return f"rsv-{ctx.input.order_id}"

    @reserve_stock.compensate
    async def release_stock(ctx: saga.Context[Order], reservation_id: str) -> None:
        print(f"    -> released reservation {reservation_id}")

    @checkout.step(retry=fast)
    async def charge_card(ctx: saga.Context[Order]) -> Receipt:
        if ctx.input.card == "declined":
            raise saga.PermanentError("card declined by issuer")
        if ctx.attempt == 1:
            raise ConnectionError("payment gateway timed out")  # transient: retried
        return Receipt(charge_id=f"ch-{ctx.input.order_id}", amount_cents=ctx.input.amount_cents)

    @charge_card.compensate
    async def refund(ctx: saga.Context[Order], receipt: Receipt) -> None:
        print(f"    -> refunded {receipt.charge_id}")

    @checkout.step(retry=fast)
    async def ship(ctx: saga.Context[Order]) -> str:
        if ctx.input.order_id.endswith("nowhere"):
            raise saga.PermanentError("no courier delivers there")
        return f"parcel for {ctx.result(reserve_stock)}"

    return checkout


async def run_demo(dsn: str) -> int:
    checkout = build_checkout()
    orders = [
        Order(order_id="o-1001", amount_cents=4200, card="visa"),
        Order(order_id="o-1002-nowhere", amount_cents=1999, card="visa"),
    ]
    async with saga.Orchestrator(dsn, sagas=[checkout], schema="saga_demo") as orch:
        for order in orders:
            run = await checkout.start(order)
            print(f"\nrun {run.id} for order {order.order_id}")
            try:
                output = await run.result(timeout=30)
                print(f"  completed: {output}")
            except saga.RunError as exc:
                print(f"  {exc.status}: {exc.error}")
            print("  timeline:")
            for event in await orch.get_run(run.id).history():
                print("    " + event.describe())
    return 0


def main(pgdata: Path | None = None) -> int:
    # The demo is an application, so it may configure logging: warnings only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    dsn = os.environ.get("SAGA_DSN")
    if not dsn:
        from saga._embedded import embedded_postgres_dsn

        folder = pgdata or Path.cwd() / ".saga-demo" / "pgdata"
        print(f"Starting an embedded PostgreSQL in {folder} (set SAGA_DSN to use your own)")
        dsn = embedded_postgres_dsn(folder)
    return anyio.run(run_demo, dsn)
