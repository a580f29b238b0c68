"""saga in a FastAPI app: start a checkout saga per order, answer at once, poll or wait.

    SAGA_DSN=postgresql://localhost/shop uvicorn examples.fastapi_app:app

- ``POST /orders`` validates the order, durably starts a run (idempotent on
  ``order_id``) and answers ``202 Accepted`` with the run id at once. With ``?wait=5`` it
  first waits up to 5 s for the outcome and answers ``200`` when the run ended in time.
- ``GET /orders/{run_id}`` returns the run's status and its timeline.
- ``GET /orders/{run_id}/result?timeout=10`` waits (long-poll) for the outcome: ``200``
  when the run ended, ``202`` when it is still going.
- ``POST /orders/{run_id}/cancel`` asks for a cancel: ``202``, ``409`` once it ended.

The orchestrator opens in the app's lifespan, so the process starts and watches runs and,
with ``concurrency > 0``, also executes them. ``create_app(concurrency=0)`` makes a pure
client that only starts and watches runs while ``saga worker examples.checkout:SAGAS``
processes execute them (see ``examples/client_worker``).

Cancellation: if the client goes away while the handler awaits ``start()``, the run is
committed or not at all (``start()`` shields its single INSERT); while it awaits
``result()``, only the waiting stops and the run goes on.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

import saga
from examples.checkout import SAGAS, Order, checkout
from examples.responses import MAX_WAIT, describe, outcome


def get_orchestrator(request: Request) -> saga.Orchestrator:
    """The orchestrator the lifespan opened (a FastAPI dependency)."""
    orchestrator: saga.Orchestrator = request.app.state.orchestrator
    return orchestrator


# Module level: FastAPI resolves string annotations in the module's namespace.
Orch = Annotated[saga.Orchestrator, Depends(get_orchestrator)]


def create_app(dsn: str | None = None, *, concurrency: int = 8, **options: Any) -> FastAPI:
    """The app. ``dsn`` defaults to ``$SAGA_DSN``, read when the app starts;
    ``options`` go to :class:`saga.Orchestrator` (``poll_interval``, ``schema`` ...)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with saga.Orchestrator(
            dsn or os.environ["SAGA_DSN"], sagas=SAGAS, concurrency=concurrency, **options
        ) as orchestrator:
            app.state.orchestrator = orchestrator
            yield

    app = FastAPI(title="shop", lifespan=lifespan)

    @app.post("/orders", status_code=202)
    async def create_order(
        order: Order,
        response: Response,
        orchestrator: Orch,
        wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT)] = None,
    ) -> dict[str, Any]:
        """Start the checkout saga for this order; answer at once, or after ``wait`` s."""
        run = await orchestrator.start(checkout, order, key=order.order_id)
        response.headers["Location"] = f"/orders/{run.id}"
        if wait is None:
            return {"run_id": str(run.id), "status": "pending", "created": run.created}
        code, body = await outcome(run, wait)
        response.status_code = code
        return {**body, "created": run.created}

    @app.get("/orders/{run_id}")
    async def get_order(run_id: uuid.UUID, orchestrator: Orch) -> dict[str, Any]:
        """The run's state and timeline."""
        run = orchestrator.get_run(run_id)
        try:
            info = await run.info()
            history = await run.history()
        except saga.RunNotFoundError:
            raise HTTPException(404, f"no order run {run_id}") from None
        return describe(info, history)

    @app.get("/orders/{run_id}/result")
    async def get_result(
        run_id: uuid.UUID,
        orchestrator: Orch,
        timeout: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 10.0,
    ) -> JSONResponse:
        """Wait up to ``timeout`` seconds for the outcome (long-poll)."""
        try:
            code, body = await outcome(orchestrator.get_run(run_id), timeout)
        except saga.RunNotFoundError:
            raise HTTPException(404, f"no order run {run_id}") from None
        return JSONResponse(body, status_code=code)

    @app.post("/orders/{run_id}/cancel", status_code=202)
    async def cancel_order(run_id: uuid.UUID, orchestrator: Orch) -> dict[str, Any]:
        """Cancel the order: what completed is compensated."""
        try:
            await orchestrator.get_run(run_id).cancel()
        except saga.RunNotFoundError:
            raise HTTPException(404, f"no order run {run_id}") from None
        except saga.InvalidRunStateError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"run_id": str(run_id), "status": "cancel_requested"}

    return app


app = create_app()
