"""A refund that waits up to 48 hours for a manager's decision, in a FastAPI app.

    SAGA_DSN=postgresql://localhost/shop uvicorn examples.approval:app

- ``POST /refunds`` records the refund request in the app's own ``refunds`` table and
  starts the ``refund`` saga **in the same transaction** (``start(conn=...)``): both
  exist or neither does. Idempotent on ``refund_id``. Answers ``202``.
- The saga holds the amount (``hold_funds``, compensated by ``release_funds``), then waits
  for the signal ``decision`` for up to 48 h. The waiting run holds no worker, lease or
  connection: it is a row with a due time.
- ``POST /refunds/{refund_id}/decision`` sends the manager's decision (one ``await``):
  ``202`` when recorded, ``200`` with ``accepted: false`` for a repeat (the first decision
  wins), ``404`` for an unknown refund, ``409`` once the run ended or its wait timed out,
  ``422`` for a malformed decision. saga's errors map to statuses as in the shop app
  (``ERROR_STATUS``): a ``refund_id`` reused for another refund is a ``409``, text saga
  cannot store (a NUL character) a ``422``.
- On approval ``pay_refund`` pays it; on rejection, or after 48 h without a decision,
  the hold is released (compensation) and the run ends ``compensated``.
- ``GET /refunds/{refund_id}`` shows the run: ``waiting`` (with ``times_out_at``), then
  ``completed`` or ``compensated``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any

import asyncpg
from fastapi import FastAPI, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field

import saga
from examples.fastapi_app import add_error_handlers
from examples.responses import MAX_BODY_BYTES

#: A refund id in a URL: what POST /refunds accepts (no NUL: Postgres text cannot hold it).
RefundId = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[^\x00]+$")]


class RefundRequest(BaseModel):
    refund_id: str = Field(min_length=1, max_length=100)
    order_id: str = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0, le=10**15)  # the table's column is a bigint


class Decision(BaseModel):
    approved: bool
    manager: str = Field(min_length=1, max_length=100)
    note: str = ""


class Payments:
    """Stands in for the payment provider: what was held, released and paid."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.released: list[str] = []
        self.paid: list[str] = []

    async def hold(self, order_id: str, amount_cents: int, *, key: str) -> str:
        self.held[key] = amount_cents
        return f"hold-{order_id}"

    async def release(self, hold_id: str, *, key: str) -> None:
        self.released.append(hold_id)

    async def refund(self, hold_id: str, *, key: str) -> str:
        self.paid.append(hold_id)
        return f"refund-{hold_id}"


payments = Payments()

refund = saga.Saga("refund", input=RefundRequest)


@refund.step()
async def hold_funds(ctx: saga.Context[RefundRequest]) -> str:
    order = ctx.input
    return await payments.hold(order.order_id, order.amount_cents, key=ctx.idempotency_key)


@hold_funds.compensate
async def release_funds(ctx: saga.Context[RefundRequest], hold_id: str) -> None:
    await payments.release(hold_id, key=ctx.idempotency_key)


decision = refund.wait_for("decision", Decision, timeout=timedelta(hours=48))


@refund.step()
async def pay_refund(ctx: saga.Context[RefundRequest]) -> str:
    answer = ctx.result(decision)
    if not answer.approved:
        raise saga.PermanentError(f"rejected by {answer.manager}")  # releases the hold
    return await payments.refund(ctx.result(hold_funds), key=ctx.idempotency_key)


REFUNDS_TABLE = """
CREATE TABLE IF NOT EXISTS refunds (
    refund_id    text PRIMARY KEY,
    order_id     text NOT NULL,
    amount_cents bigint NOT NULL,
    run_id       uuid NOT NULL
)
"""


def create_app(dsn: str | None = None, **options: Any) -> FastAPI:
    """The app. ``dsn`` defaults to ``$SAGA_DSN``; ``options`` go to
    :class:`saga.Orchestrator` (``concurrency``, ``poll_interval`` ...)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with asyncpg.create_pool(dsn or os.environ["SAGA_DSN"], max_size=10) as pool:
            await pool.execute(REFUNDS_TABLE)
            async with saga.Orchestrator(pool, sagas=[refund], **options) as orchestrator:
                app.state.pool, app.state.orchestrator = pool, orchestrator
                yield

    # The shop's error handlers: saga's errors as statuses, invalid bodies as 422.
    app = FastAPI(title="refunds", lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    add_error_handlers(app)

    @app.post("/refunds", status_code=202)
    async def request_refund(body: RefundRequest, request: Request) -> dict[str, Any]:
        """Record the request and start its saga in one transaction."""
        pool: asyncpg.Pool = request.app.state.pool
        orchestrator: saga.Orchestrator = request.app.state.orchestrator
        async with pool.acquire() as conn, conn.transaction():
            run = await orchestrator.start(refund, body, key=body.refund_id, conn=conn)
            await conn.execute(
                "INSERT INTO refunds VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                body.refund_id,
                body.order_id,
                body.amount_cents,
                run.id,
            )
        return {"refund_id": body.refund_id, "run_id": str(run.id), "created": run.created}

    async def run_of(request: Request, refund_id: RefundId) -> saga.RunHandle:
        pool: asyncpg.Pool = request.app.state.pool
        run_id = await pool.fetchval("SELECT run_id FROM refunds WHERE refund_id = $1", refund_id)
        if run_id is None:
            raise HTTPException(404, f"no refund {refund_id!r}")
        orchestrator: saga.Orchestrator = request.app.state.orchestrator
        return orchestrator.get_run(run_id)

    @app.post("/refunds/{refund_id}/decision", status_code=202)
    async def decide(
        refund_id: RefundId, body: Decision, request: Request, response: Response
    ) -> dict[str, Any]:
        """The manager's decision, as the saga's ``decision`` signal."""
        run = await run_of(request, refund_id)
        try:
            accepted = await run.signal(decision, body)
        except saga.InvalidRunStateError as exc:
            raise HTTPException(409, str(exc)) from exc
        if not accepted:
            response.status_code = 200  # a decision was already recorded: it stands
        return {"refund_id": refund_id, "accepted": accepted}

    @app.get("/refunds/{refund_id}")
    async def show(refund_id: RefundId, request: Request) -> dict[str, Any]:
        info = await (await run_of(request, refund_id)).info()
        waiting = info.status is saga.RunStatus.WAITING
        return {
            "refund_id": refund_id,
            "status": str(info.status),
            "times_out_at": info.due_at.isoformat() if waiting and info.due_at else None,
            "error": info.error.message if info.error else None,
        }

    return app


app = create_app()
