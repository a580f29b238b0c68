"""Framework-neutral pieces of the web examples: saga's errors as HTTP statuses, and JSON
bodies for a run's outcome and timeline.

Both apps map saga's errors through :data:`ERROR_STATUS` (FastAPI with exception
handlers, aiohttp with a middleware), so every route answers the same status for the
same error and no handler needs its own ``try``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import saga
from examples.checkout import checkout

#: The longest a request may wait for a run's outcome, in seconds.
MAX_WAIT = 30.0

#: The largest request body the apps read, in bytes: aiohttp's default
#: ``client_max_size`` and saga's default ``max_payload_bytes``. Starlette reads a body
#: of any size unless FastAPI's ``max_body_size`` is set, so the FastAPI app sets it.
MAX_BODY_BYTES = 1024 * 1024

#: What a client should wait before retrying a 503, in seconds (``Retry-After``).
RETRY_AFTER = 5
#: The detail of a 503, instead of the error's message (see :func:`error_response`).
UNAVAILABLE = f"temporarily unavailable, retry in {RETRY_AFTER} s"

#: saga's errors as HTTP statuses. The most specific class listed wins, whatever the
#: order here (``PayloadTooLargeError`` is a ``SerializationError``); a subclass of a
#: listed error gets its status. Any other error stays a 500: it is a bug to fix.
ERROR_STATUS: dict[type[saga.SagaError], int] = {
    saga.InvalidInputError: 422,  # the input failed the saga's validation
    saga.SerializationError: 422,  # the input has no lossless JSON form (NaN, Infinity)
    saga.PayloadTooLargeError: 413,  # the input is above max_payload_bytes
    saga.RunNotFoundError: 404,
    saga.InvalidRunStateError: 409,  # e.g. cancelling a run that ended
    saga.IdempotencyConflictError: 409,  # an order id reused with another order
    saga.DatabaseError: 503,  # Postgres unreachable: retry later
    saga.LifecycleError: 503,  # the orchestrator is not open (starting or stopping)
}


def error_response(exc: BaseException) -> tuple[int, dict[str, str], dict[str, str]] | None:
    """(HTTP status, JSON body, headers) for one of saga's errors; ``None`` if unmapped.

    The body is ``{"error": <type name>, "detail": <message>}``. A 503 carries
    ``Retry-After`` and a fixed detail: the database's own message describes the server
    (host, database name), not the request.
    """
    status = next((ERROR_STATUS[c] for c in type(exc).__mro__ if c in ERROR_STATUS), None)
    if status is None:
        return None
    name = type(exc).__name__
    if status == 503:
        return status, {"error": name, "detail": UNAVAILABLE}, {"Retry-After": str(RETRY_AFTER)}
    return status, {"error": name, "detail": str(exc)}, {}


def validation_body(errors: Sequence[Any]) -> dict[str, Any]:
    """A 422 body for pydantic's errors: where and what, not the input itself (which
    may be large, private, or NaN, which JSON cannot encode)."""
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return {"error": "ValidationError", "detail": detail}


def unreadable_body(cause: BaseException) -> dict[str, Any]:
    """The 422 body for a request body whose JSON cannot be read (``cause``: the parser's
    error), in the form of :func:`validation_body`."""
    msg = f"the body is not JSON this app can read ({type(cause).__name__})"
    return validation_body([{"loc": ("body",), "msg": msg, "type": "json_invalid"}])


async def order_run(client: saga.Client, run_id: uuid.UUID) -> saga.RunHandle:
    """The checkout run an order's URL names. A run of another saga sharing the database
    (the approval example's refunds, say) is no order: 404, as an unknown id, so that no
    order route reads its output as a shipment or cancels it."""
    run = client.get_run(run_id)
    if (await run.info()).saga != checkout.name:
        raise saga.RunNotFoundError(run_id)
    return run


async def outcome(run: saga.RunHandle, timeout: float) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for a run's outcome: 200 once it ended, 202 while it runs."""
    try:
        output = await run.result(timeout=timeout)
    except saga.RunTimeoutError:
        return 202, {"run_id": str(run.id), "status": str(await run.status())}
    except saga.RunError as exc:
        return 200, {
            "run_id": str(run.id),
            "status": exc.status,
            "error": str(exc.error) if exc.error else None,
            "compensation_error": str(exc.compensation_error) if exc.compensation_error else None,
        }
    return 200, {"run_id": str(run.id), "status": "completed", "output": output.model_dump()}


def describe(info: saga.RunInfo, history: list[saga.HistoryEvent]) -> dict[str, Any]:
    """A run as JSON: state, error, and the timeline (one entry per history event)."""
    return {
        "run_id": str(info.id),
        "status": str(info.status),
        "step": info.step,
        "completed_steps": list(info.completed_steps),
        "error": str(info.error) if info.error else None,
        "compensation_error": str(info.compensation_error) if info.compensation_error else None,
        "created_at": info.created_at.isoformat(),
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "timeline": [
            {
                "at": event.at.isoformat(),
                "kind": event.kind,
                "step": event.step,
                "attempt": event.attempt,
                "worker": event.worker,
                "error": str(event.error) if event.error else None,
            }
            for event in history
        ],
    }
