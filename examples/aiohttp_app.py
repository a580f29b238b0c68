"""saga in an aiohttp app: the FastAPI example's API, with a cleanup context.

    SAGA_DSN=postgresql://localhost/shop python -m aiohttp.web -P 8080 \\
        examples.aiohttp_app:init_app

``create_app()`` appends a cleanup context that opens the orchestrator on startup and
closes it on shutdown (leases of unfinished steps are handed back to other workers). The
routes are those of ``examples/fastapi_app.py``: ``POST /orders[?wait=5]`` answers
``202`` with the run id at once (``200`` when it waited for the outcome),
``GET /orders/{run_id}`` returns status and timeline, ``GET
/orders/{run_id}/result?timeout=10`` long-polls, ``POST /orders/{run_id}/cancel``
cancels. ``create_app(concurrency=0)`` is a client that executes nothing.

The ``saga_errors`` middleware maps saga's errors for every route through
``ERROR_STATUS`` in ``examples/responses.py``, the table the FastAPI app uses: same
statuses, same ``{"error", "detail"}`` bodies. aiohttp itself refuses a body above
``client_max_size`` (``MAX_BODY_BYTES``) with ``413`` when it is read.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pydantic
from aiohttp import web

import saga
from examples.checkout import SAGAS, Order, checkout
from examples.responses import (
    MAX_BODY_BYTES,
    MAX_WAIT,
    describe,
    error_response,
    order_run,
    outcome,
    validation_body,
)

ORCHESTRATOR = web.AppKey("orchestrator", saga.Client)


def create_app(dsn: str | None = None, *, concurrency: int = 8, **options: Any) -> web.Application:
    """The app. ``dsn`` defaults to ``$SAGA_DSN``, read on startup; ``options`` go to
    :class:`saga.Orchestrator`."""

    async def orchestrator_ctx(app: web.Application) -> AsyncIterator[None]:
        async with saga.Orchestrator(
            dsn or os.environ["SAGA_DSN"], sagas=SAGAS, concurrency=concurrency, **options
        ) as orchestrator:
            app[ORCHESTRATOR] = orchestrator
            yield

    app = web.Application(middlewares=[saga_errors], client_max_size=MAX_BODY_BYTES)
    app.cleanup_ctx.append(orchestrator_ctx)
    app.add_routes(routes)
    return app


def init_app(argv: list[str]) -> web.Application:
    """Entry point for ``python -m aiohttp.web examples.aiohttp_app:init_app``."""
    return create_app()


@web.middleware
async def saga_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One of saga's errors, raised by any route, as its status and JSON body."""
    try:
        return await handler(request)
    except saga.SagaError as exc:
        mapped = error_response(exc)
        if mapped is None:  # not a client's or the database's problem: a 500
            raise
        status, body, headers = mapped
        return web.json_response(body, status=status, headers=headers)


routes = web.RouteTableDef()


def _seconds(request: web.Request, name: str, default: float | None) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT:
        raise web.HTTPUnprocessableEntity(
            text=f"{name} must be a number of seconds from 0 to {MAX_WAIT:g}"
        )
    return value


async def _run(request: web.Request) -> saga.RunHandle:
    try:
        run_id = uuid.UUID(request.match_info["run_id"])
    except ValueError:
        raise web.HTTPUnprocessableEntity(text="run_id must be a UUID") from None
    return await order_run(request.app[ORCHESTRATOR], run_id)


@routes.post("/orders")
async def create_order(request: web.Request) -> web.Response:
    """Start the checkout saga for this order; answer at once, or after ``wait`` s."""
    wait = _seconds(request, "wait", None)
    try:
        order = Order.model_validate_json(await request.read())
    except pydantic.ValidationError as exc:
        return web.json_response(validation_body(exc.errors()), status=422)
    run = await request.app[ORCHESTRATOR].start(checkout, order, key=order.order_id)
    headers = {"Location": f"/orders/{run.id}"}
    if wait is None:
        body = {"run_id": str(run.id), "status": "pending", "created": run.created}
        return web.json_response(body, status=202, headers=headers)
    code, body = await outcome(run, wait)
    return web.json_response({**body, "created": run.created}, status=code, headers=headers)


@routes.get("/orders/{run_id}")
async def get_order(request: web.Request) -> web.Response:
    """The run's state and timeline."""
    run = await _run(request)
    return web.json_response(describe(await run.info(), await run.history()))


@routes.get("/orders/{run_id}/result")
async def get_result(request: web.Request) -> web.Response:
    """Wait up to ``timeout`` seconds for the outcome (long-poll)."""
    run = await _run(request)
    timeout = _seconds(request, "timeout", 10.0)
    assert timeout is not None
    code, body = await outcome(run, timeout)
    return web.json_response(body, status=code)


@routes.post("/orders/{run_id}/cancel")
async def cancel_order(request: web.Request) -> web.Response:
    """Cancel the order: what completed is compensated."""
    run = await _run(request)
    await run.cancel()
    return web.json_response({"run_id": str(run.id), "status": "cancel_requested"}, status=202)
