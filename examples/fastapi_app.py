"""saga in a FastAPI app: start a checkout saga per order, answer at once, poll or wait.

    SAGA_DSN=postgresql://localhost/shop uvicorn examples.fastapi_app:app

- ``POST /orders`` validates the order, durably starts a run (idempotent on
  ``order_id``) and answers ``202 Accepted`` with the run id at once. With ``?wait=5`` it
  first waits up to 5 s for the outcome and answers ``200`` when the run ended in time.
- ``GET /orders/{run_id}`` returns the run's status and its timeline.
- ``GET /orders/{run_id}/result?timeout=10`` waits (long-poll) for the outcome: ``200``
  when the run ended, ``202`` when it is still going.
- ``POST /orders/{run_id}/cancel`` asks for a cancel: ``202``, ``409`` once it ended.

saga's errors become statuses in one place, ``ERROR_STATUS`` in
``examples/responses.py``, registered below as exception handlers so that every route
gets them: ``422`` for an order saga cannot store (NaN, Infinity), ``413`` for one above
``max_payload_bytes``, ``404`` for an unknown run, ``409`` for a cancel of an ended run,
``503`` with ``Retry-After`` while Postgres is unreachable. A malformed run id is a
``422`` (FastAPI's path validation), so is a body no JSON parser reads (a 5,000-digit
number, arrays nested 5,000 deep, bytes that are not UTF-8), and a body above
``MAX_BODY_BYTES`` a ``413`` before it is read in full (``max_body_size``, FastAPI
0.165 and later).

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

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import saga
from examples.checkout import SAGAS, Order, checkout
from examples.responses import (
    ERROR_STATUS,
    MAX_BODY_BYTES,
    MAX_WAIT,
    describe,
    error_response,
    order_run,
    outcome,
    unreadable_body,
    validation_body,
)


def get_orchestrator(request: Request) -> saga.Client:
    """The orchestrator the lifespan opened (a FastAPI dependency)."""
    orchestrator: saga.Client = request.app.state.orchestrator
    return orchestrator


# Module level: FastAPI resolves string annotations in the module's namespace.
Orch = Annotated[saga.Client, Depends(get_orchestrator)]


async def saga_error_handler(request: Request, exc: Exception) -> Response:
    """One of saga's errors as its status and ``{"error", "detail"}`` body."""
    mapped = error_response(exc)
    if mapped is None:  # registered for mapped types only
        raise exc
    status, body, headers = mapped
    return JSONResponse(body, status_code=status, headers=headers)


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 without the offending input: FastAPI's own handler echoes it, and
    answers 500 instead when it is NaN or Infinity (JSON cannot encode them)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_body(exc.errors()), status_code=422)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own refusals as FastAPI answers them, but one: a body its JSON parser
    raised on (an integer over 4,300 digits, arrays nested thousands deep, bytes that are
    not UTF-8) is an invalid body like ``not json``, a 422 ValidationError, not FastAPI's
    ``400 "There was an error parsing the body"``."""
    assert isinstance(exc, StarletteHTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, ValueError | RecursionError):
        return JSONResponse(unreadable_body(cause), status_code=422)
    return await http_exception_handler(request, exc)


def add_error_handlers(app: FastAPI) -> None:
    """saga's errors as ``ERROR_STATUS`` says, and invalid bodies as 422 ValidationError."""
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    for error_type in ERROR_STATUS:
        app.add_exception_handler(error_type, saga_error_handler)


def create_app(dsn: str | None = None, *, concurrency: int = 8, **options: Any) -> FastAPI:
    """The app. ``dsn`` defaults to ``$SAGA_DSN``, read when the app starts;
    ``options`` go to :class:`saga.Orchestrator` (``poll_interval``, ``schema`` ...).
    ``concurrency=0`` opens a :class:`saga.Client` instead: the app starts and watches
    runs while worker processes execute them (see ``examples/client_worker``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        target = dsn or os.environ["SAGA_DSN"]
        runtime = (
            saga.Orchestrator(target, sagas=SAGAS, concurrency=concurrency, **options)
            if concurrency
            else saga.Client(target, sagas=SAGAS, **options)
        )
        async with runtime as orchestrator:
            app.state.orchestrator = orchestrator
            yield

    # Starlette reads a body of any size unless told otherwise (aiohttp stops at 1 MiB).
    app = FastAPI(title="shop", lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    add_error_handlers(app)

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
        run = await order_run(orchestrator, run_id)
        return describe(await run.info(), await run.history())

    @app.get("/orders/{run_id}/result")
    async def get_result(
        run_id: uuid.UUID,
        orchestrator: Orch,
        timeout: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 10.0,
    ) -> JSONResponse:
        """Wait up to ``timeout`` seconds for the outcome (long-poll)."""
        code, body = await outcome(await order_run(orchestrator, run_id), timeout)
        return JSONResponse(body, status_code=code)

    @app.post("/orders/{run_id}/cancel", status_code=202)
    async def cancel_order(run_id: uuid.UUID, orchestrator: Orch) -> dict[str, Any]:
        """Cancel the order: what completed is compensated."""
        await (await order_run(orchestrator, run_id)).cancel()
        return {"run_id": str(run_id), "status": "cancel_requested"}

    return app


app = create_app()
