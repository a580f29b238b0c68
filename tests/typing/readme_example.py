"""The README's example, type-checked by mypy --strict (see [tool.mypy] files).

tests/test_readme.py checks that every line of the README's Python blocks appears here,
so the documented code cannot drift from what mypy checks. Not collected by pytest.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import assert_type

import asyncpg
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from pydantic import BaseModel

import saga


class _Inventory:
    async def reserve(self, order_id: str, *, key: str) -> str:
        return f"rsv-{order_id}-{key}"

    async def release(self, reservation_id: str, *, key: str) -> None:
        return None


class _Payments:
    async def charge(self, amount_cents: int, *, key: str) -> Receipt:
        return Receipt(charge_id=f"ch-{amount_cents}-{key}")

    async def refund(self, charge_id: str, *, key: str) -> None:
        return None


class _Warehouse:
    async def load(self, rows: int, *, key: str) -> int:
        return rows


class _Shipping:
    async def book(self, order_id: str, *, key: str) -> str:
        return f"slot-{order_id}-{key}"


inventory = _Inventory()
payments = _Payments()
shipping = _Shipping()
warehouse = _Warehouse()


class Order(BaseModel):
    order_id: str
    amount_cents: int


class Receipt(BaseModel):
    charge_id: str


checkout = saga.Saga("checkout", input=Order, output=Receipt)  # output: optional, checked


@checkout.step(retry=saga.Retry(max_attempts=5), timeout=10)
async def reserve_stock(ctx: saga.Context[Order]) -> str:
    return await inventory.reserve(ctx.input.order_id, key=ctx.idempotency_key)


@reserve_stock.compensate
async def release_stock(ctx: saga.Context[Order], reservation_id: str) -> None:
    await inventory.release(reservation_id, key=ctx.idempotency_key)


@checkout.step()
async def charge_card(ctx: saga.Context[Order]) -> Receipt:
    reservation_id = ctx.result(reserve_stock)  # typed result of an earlier step
    assert_type(reservation_id, str)  # mypy proves ctx.result() returns the step's type
    return await payments.charge(ctx.input.amount_cents, key=ctx.idempotency_key)


@charge_card.compensate(retry=saga.Retry(max_attempts=20))
async def refund(ctx: saga.Context[Order], receipt: Receipt) -> None:
    await payments.refund(receipt.charge_id, key=ctx.idempotency_key)


async def main(dsn: str) -> None:
    async with saga.Orchestrator(dsn, sagas=[checkout]) as orch:  # e.g. in a FastAPI lifespan
        run = await checkout.start(Order(order_id="o-1", amount_cents=500), key="o-1")
        try:
            receipt = await run.result(timeout=30)  # a Receipt; or return run.id at once
            assert_type(receipt, Receipt)
        except saga.RunCompensatedError as exc:
            print("rolled back because", exc.error)
        for event in await run.history():
            print(event.describe())
        status: saga.RunStatus = await orch.get_run(run.id).status()
        print(status, receipt)


async def operate(dsn: str, run_id: uuid.UUID) -> None:
    """The README's operator API example."""
    async with saga.Client(dsn) as ops:
        page = await saga.list_runs(ops, status="failed", older_than=timedelta(hours=1))
        for info in page.runs:
            print(info.id, info.saga, info.status, info.error)

        found = await saga.list_runs(ops, key="order-1042", saga="checkout")
        counts = await saga.count_runs(ops, newer_than=timedelta(days=1))
        print(len(found.runs), counts[saga.RunStatus.FAILED])

        run = ops.get_run(run_id)
        info = await run.info()
        for attempt in saga.timeline(await run.history()):
            print(attempt.step, attempt.compensation, attempt.outcome, attempt.duration)
        if info.status is saga.RunStatus.FAILED:
            await run.retry()
        else:
            await run.cancel()

        pruned = await saga.prune(ops, older_than=timedelta(days=30), batch_size=1000)
        print(pruned.runs, pruned.events)

    applied = await saga.migrate(dsn)
    print(applied)


async def act(dsn: str, checkout: saga.Saga[Order]) -> None:
    """The README's example of operator actions."""
    async with saga.Client(dsn, sagas=[checkout]) as ops:
        attention = await saga.needs_attention(ops, limit=50)
        for info in attention.runs:
            run = ops.get_run(info.id)
            if info.compensation_error is not None:
                await run.skip_compensation(note="refunded by hand", by="ana")
            else:
                await run.resolve(note="customer called", by="ana")

        count = await saga.count_matching(ops, saga="checkout", status="failed")
        result = await saga.retry_runs(
            ops,
            saga="checkout",
            status="failed",
            limit=1000,
            expect=count,
            by="ana",
            note="bank is back",
        )
        print(len(result.acted), result.refused)


# The README's web section: saga's errors as HTTP statuses, FastAPI form.


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield


ERROR_STATUS: dict[type[saga.SagaError], int] = {
    saga.InvalidInputError: 422,
    saga.SerializationError: 422,
    saga.PayloadTooLargeError: 413,  # a SerializationError: the most specific class wins
    saga.RunNotFoundError: 404,
    saga.InvalidRunStateError: 409,
    saga.IdempotencyConflictError: 409,
    saga.DatabaseError: 503,
    saga.LifecycleError: 503,
}


async def saga_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(ERROR_STATUS[c] for c in type(exc).__mro__ if c in ERROR_STATUS)
    headers = {"Retry-After": "5"} if status == 503 else {}
    detail = str(exc) if status < 500 else "temporarily unavailable, retry in 5 s"
    body = {"error": type(exc).__name__, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


app = FastAPI(lifespan=lifespan, max_body_size=1024 * 1024)
for error_type in ERROR_STATUS:
    app.add_exception_handler(error_type, saga_error)


# The README's logging section: see saga's debug lines.


def verbose_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))


# The README's waits section: a trial that sleeps, a refund that waits for a decision,
# a run started in the caller's transaction.


class Signup(BaseModel):
    email: str


class _Billing:
    async def start_trial(self, email: str, *, key: str) -> str:
        return f"trial-{email}-{key}"

    async def convert(self, trial_id: str, *, key: str) -> str:
        return f"sub-{trial_id}-{key}"


class _Bank:
    async def hold(self, amount_cents: int, *, key: str) -> str:
        return f"hold-{amount_cents}-{key}"

    async def release(self, hold_id: str, *, key: str) -> None:
        return None

    async def pay(self, hold_id: str, *, key: str) -> str:
        return f"paid-{hold_id}-{key}"


billing = _Billing()
bank = _Bank()


trial = saga.Saga("trial", input=Signup)


@trial.step()
async def start_trial(ctx: saga.Context[Signup]) -> str:
    return await billing.start_trial(ctx.input.email, key=ctx.idempotency_key)


trial.sleep(timedelta(days=7))  # or trial.sleep(until=lambda ctx: ctx.input.ends_at)


@trial.step()
async def convert(ctx: saga.Context[Signup]) -> str:
    return await billing.convert(ctx.result(start_trial), key=ctx.idempotency_key)


class RefundRequest(BaseModel):
    refund_id: str
    amount_cents: int


class Decision(BaseModel):
    approved: bool
    manager: str


refunds = saga.Saga("refund", input=RefundRequest)


@refunds.step()
async def hold_funds(ctx: saga.Context[RefundRequest]) -> str:
    return await bank.hold(ctx.input.amount_cents, key=ctx.idempotency_key)


@hold_funds.compensate
async def release_funds(ctx: saga.Context[RefundRequest], hold_id: str) -> None:
    await bank.release(hold_id, key=ctx.idempotency_key)


decision = refunds.wait_for("decision", Decision, timeout=timedelta(hours=48))


@refunds.step()
async def pay_refund(ctx: saga.Context[RefundRequest]) -> str:
    answer = ctx.result(decision)  # the signal's payload, typed
    assert_type(answer, Decision)  # mypy proves ctx.result(wait) returns the model
    if not answer.approved:
        raise saga.PermanentError(f"rejected by {answer.manager}")  # releases the hold
    return await bank.pay(ctx.result(hold_funds), key=ctx.idempotency_key)


@app.post("/refunds/{refund_id}/decision", status_code=202)
async def decide(refund_id: str, body: Decision, request: Request) -> dict[str, bool]:
    orch: saga.Client = request.app.state.orchestrator
    accepted = await orch.signal_key(refunds, refund_id, decision, body)
    return {"accepted": accepted}  # False: a decision was already recorded


async def place_order(pool: asyncpg.Pool, orch: saga.Client, order: Order) -> uuid.UUID:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO orders (id) VALUES ($1)", order.order_id)
        run = await orch.start(checkout, order, key=order.order_id, conn=conn)
    return run.id  # committed with the order row, or neither exists


# Steps in parallel.
order = saga.Saga("order", input=Order)


@order.step()
async def reserve(ctx: saga.Context[Order]) -> str:
    return await inventory.reserve(ctx.input.order_id, key=ctx.idempotency_key)


@order.step(after=[])  # at the start too: runs beside reserve
async def book_slot(ctx: saga.Context[Order]) -> str:
    return await shipping.book(ctx.input.order_id, key=ctx.idempotency_key)


@order.step(after=[reserve, book_slot])  # the join: once both completed
async def charge(ctx: saga.Context[Order]) -> Receipt:
    slot = ctx.result(book_slot)  # typed; only steps it runs after
    assert_type(slot, str)
    return await payments.charge(ctx.input.amount_cents, key=f"{slot}:{ctx.idempotency_key}")


# Child sagas.
class Chunk(BaseModel):
    rows: int


class ImportJob(BaseModel):
    rows: int


chunk = saga.Saga("chunk", input=Chunk, output=int)


@chunk.step()
async def load(ctx: saga.Context[Chunk]) -> int:
    return await warehouse.load(ctx.input.rows, key=ctx.idempotency_key)


imports = saga.Saga("import", input=ImportJob)


@imports.step()
async def split(ctx: saga.Context[ImportJob]) -> list[int]:
    return list(range(0, ctx.input.rows, 1000))


loads = imports.children(
    "loads",
    chunk,
    lambda ctx: [Chunk(rows=1000) for _ in ctx.result(split)],
    max_children=500,
    after=[split],
)


@imports.step(after=[loads])
async def report(ctx: saga.Context[ImportJob]) -> int:
    loaded: list[int] = ctx.result(loads)  # the children's outputs, in input order
    assert_type(ctx.result(loads), list[int])
    return sum(loaded)


# The README's dashboard section: mounted in the FastAPI app above.

from saga.web import Operator, dashboard  # noqa: E402

orchestrator = saga.Orchestrator("postgresql://localhost/app", sagas=[checkout])


async def authorize(request: Request) -> Operator | None:
    user = request.headers.get("x-forwarded-user")
    if user is None:
        return None
    return Operator(user, can_act=user in {"alice", "bob"})


app.mount("/saga", dashboard(orchestrator, authorize=authorize))


# The README's traffic control section.


class Transfer(BaseModel):
    account: str
    amount: int
    vip: bool = False


# One at a time per account; VIP transfers first; executed by the "payments" lane's workers.
transfer = saga.Saga(
    "transfer",
    input=Transfer,
    priority=lambda t: 10 if t.vip else 0,
    concurrency_key=lambda t: t.account,
    concurrency_limit=1,
    lane="payments",
)

# At most 50 calls per second to the bank, shared by every worker on the database.
bank_api = saga.RateLimit("bank", per_second=50, burst=50)


@transfer.step(rate_limit=bank_api)
async def move_money(ctx: saga.Context[Transfer]) -> str:
    return "receipt"


class ReportRequest(BaseModel):
    days: int = 1


daily_report = saga.Saga("report", input=ReportRequest)


@daily_report.step()
async def build_report(ctx: saga.Context[ReportRequest]) -> int:
    return ctx.input.days


# Every day at 02:00 Paris time; a slot missed while nothing ran is run once, late.
nightly = saga.Scheduled(
    "nightly-report",
    daily_report,
    saga.Schedule.cron("0 2 * * *", timezone="Europe/Paris"),
    ReportRequest(),
    missed="latest",
)


async def serve(dsn: str) -> None:
    # The web app: starts transfers, fires the schedule and executes every saga.
    async with saga.Orchestrator(dsn, sagas=[transfer, daily_report], schedules=[nightly]) as orch:
        await orch.start(transfer, Transfer(account="acct-7", amount=5), priority=50)


async def payments_worker(dsn: str) -> None:
    # Workers of the "payments" lane's own: they execute transfers only.
    async with saga.Orchestrator(dsn, sagas=[transfer], lanes=["payments"]) as orch:
        await orch.wait_stopped()


# The README's "Tracing at high throughput": sample 5 % of runs, bigger span batches.
sampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.05)))  # 5 % of runs
sampled.add_span_processor(
    BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=8192, max_export_batch_size=2048)
)
worker = saga.Orchestrator("postgresql://localhost/app", sagas=[checkout], tracer_provider=sampled)
