"""The demo: one order saga that completes and one that fails and is compensated.

Runs on ``--dsn`` or ``SAGA_DSN`` when given, else on an embedded PostgreSQL from the
``embedded`` extra (data in ``.saga-demo/pgdata`` under the current folder), in the
schema ``--schema`` (``SAGA_SCHEMA``, default ``saga_demo``); ``--json`` prints the runs
as one JSON object instead of the timelines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
from pydantic import BaseModel

import saga
from saga._dsn import command_dsn


class Order(BaseModel):
    order_id: str
    amount_cents: int
    card: str


class Receipt(BaseModel):
    charge_id: str
    amount_cents: int


def build_checkout(say: Callable[[str], None] = print) -> saga.Saga[Order]:
    """The checkout saga of the README: reserve stock, charge the card, ship; its
    compensations ``say`` what they undid."""
    checkout = saga.Saga("demo_checkout", input=Order)
    fast = saga.Retry(max_attempts=3, initial_delay=0.05)

    @checkout.step(retry=fast, timeout=5)
    async def reserve_stock(ctx: saga.Context[Order]) -> str:
        return f"rsv-{ctx.input.order_id}"

    @reserve_stock.compensate
    async def release_stock(ctx: saga.Context[Order], reservation_id: str) -> None:
        say(f"    -> released reservation {reservation_id}")

    @checkout.step(retry=fast)
    async def charge_card(ctx: saga.Context[Order]) -> Receipt:
        if ctx.input.card == "declined":
            raise saga.PermanentError("card declined by issuer")
        if ctx.attempt == 1:
            raise ConnectionError("payment gateway timed out")  # transient: retried
        return Receipt(charge_id=f"ch-{ctx.input.order_id}", amount_cents=ctx.input.amount_cents)

    @charge_card.compensate
    async def refund(ctx: saga.Context[Order], receipt: Receipt) -> None:
        say(f"    -> refunded {receipt.charge_id}")

    @checkout.step(retry=fast)
    async def ship(ctx: saga.Context[Order]) -> str:
        if ctx.input.order_id.endswith("nowhere"):
            raise saga.PermanentError("no courier delivers there")
        return f"parcel for {ctx.result(reserve_stock)}"

    return checkout


async def run_demo(dsn: str, schema: str = "saga_demo", as_json: bool = False) -> int:
    say: Callable[[str], None] = (lambda _text: None) if as_json else print
    checkout = build_checkout(say)
    orders = [
        Order(order_id="o-1001", amount_cents=4200, card="visa"),
        Order(order_id="o-1002-nowhere", amount_cents=1999, card="visa"),
    ]
    runs: list[dict[str, object]] = []
    async with saga.Orchestrator(dsn, sagas=[checkout], schema=schema) as orch:
        for order in orders:
            run = await checkout.start(order)
            say(f"\nrun {run.id} for order {order.order_id}")
            shown: dict[str, object] = {"run": str(run.id), "order": order.order_id}
            try:
                output = await run.result(timeout=30)
                say(f"  completed: {output}")
                shown |= {"status": "completed", "output": output}
            except saga.RunError as exc:
                say(f"  {exc.status}: {exc.error}")
                error = exc.error
                failure = error and {"type": error.type, "message": error.message}
                shown |= {"status": str(exc.status), "error": failure}
            history = await orch.get_run(run.id).history()
            say("  timeline:")
            for event in history:
                say("    " + event.describe())
            shown["timeline"] = [event.describe() for event in history]
            runs.append(shown)
    if as_json:
        print(json.dumps({"runs": runs}))
    return 0


def main(
    pgdata: Path | None = None,
    *,
    dsn: str | None = None,
    schema: str | None = None,
    as_json: bool = False,
) -> int:
    """``saga demo``: the exit code (2: a bad DSN or schema, 1: the database failed),
    errors in one line on stderr."""
    # The demo is an application, so it may configure logging: warnings only.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),  # stdout: the runs
    )
    schema = schema if schema is not None else os.environ.get("SAGA_SCHEMA") or "saga_demo"
    try:
        dsn = command_dsn(dsn)
        if not dsn:
            from saga._embedded import embedded_postgres_dsn

            folder = pgdata or Path.cwd() / ".saga-demo" / "pgdata"
            where = f"Starting an embedded PostgreSQL in {folder} (set SAGA_DSN to use your own)"
            print(where, file=sys.stderr if as_json else sys.stdout)
            try:
                dsn = embedded_postgres_dsn(folder)
            except (ImportError, ValueError) as exc:  # the extra missing, an unusable folder
                print(f"saga demo: {exc}", file=sys.stderr)
                return 2
            except OSError as exc:  # the folder cannot be created (a file there, no rights)
                print(f"saga demo: cannot use {folder}: {exc}", file=sys.stderr)
                return 1
        return anyio.run(run_demo, dsn, schema, as_json)
    except saga.ConfigurationError as exc:
        print(f"saga demo: {exc}", file=sys.stderr)
        return 2
    except saga.SagaError as exc:
        print(f"saga demo: {exc}", file=sys.stderr)
        return 1
