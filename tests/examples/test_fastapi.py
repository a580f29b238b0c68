"""examples/fastapi_app.py end to end: httpx over ASGI, the app's lifespan, real Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from examples.fastapi_app import create_app
from examples.responses import RETRY_AFTER
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory
from tests.examples._http import (
    INVALID_ORDERS,
    MALFORMED_RUN_IDS,
    NON_FINITE_ORDERS,
    REACHES_SAGA,
    UNREADABLE_BODIES,
    chunks,
    database_down,
    huge_order,
)

JSON = {"content-type": "application/json"}


def order(order_id: str, **fields: Any) -> dict[str, Any]:
    return {"order_id": order_id, "amount_cents": 1299, **fields}


@asynccontextmanager
async def serve(dsn: str, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The example app with its lifespan entered (the orchestrator open), over ASGI."""
    options = {"concurrency": 4, "poll_interval": 0.2, "shutdown_timeout": 2, **options}
    app = create_app(dsn, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    """The example app, serving."""
    async with serve(dsn) as client:
        yield client


async def count_runs(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM saga.runs")
    return count


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    """``response`` is saga's ``error`` as ``status`` with the shared JSON body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert "Traceback" not in response.text


async def test_post_answers_202_at_once_and_the_run_completes(client: httpx.AsyncClient) -> None:
    """POST /orders answers 202 with the run id and a Location before the steps ran (they
    take 0.5 s each); GET /orders/{id}/result then returns the typed output, and GET
    /orders/{id} the completed status and a timeline of every step."""
    with anyio.fail_after(1.2):  # under the 1.5 s the steps take: nothing ran inline
        response = await client.post("/orders", json=order("o-1", step_delay=0.5))
        assert response.status_code == 202
        body = response.json()
        run_id = body["run_id"]
        assert body["status"] == "pending"
        assert body["created"] is True
        assert response.headers["location"] == f"/orders/{run_id}"
        state = (await client.get(f"/orders/{run_id}")).json()
        assert state["status"] in ("pending", "running")

    response = await client.get(f"/orders/{run_id}/result", params={"timeout": 20})
    assert response.status_code == 200
    result = response.json()
    assert result["status"] == "completed"
    assert result["output"]["tracking"] == "trk-rsv-o-1"
    assert result["output"]["charge_id"] == "ch-o-1"

    response = await client.get(f"/orders/{run_id}")
    assert response.status_code == 200
    state = response.json()
    assert state["status"] == "completed"
    assert state["completed_steps"] == ["reserve_stock", "charge_card", "ship"]
    kinds = [(e["kind"], e["step"]) for e in state["timeline"]]
    assert kinds[0] == ("run_started", None)
    assert ("step_completed", "charge_card") in kinds
    assert kinds[-1] == ("run_completed", None)


async def test_post_with_wait_returns_the_outcome_or_202_on_timeout(
    client: httpx.AsyncClient,
) -> None:
    """POST /orders?wait=N answers 200 with the outcome when the run ends within N
    seconds (here a declined card: compensated, with the error), and 202 with the run's
    current status when it does not."""
    response = await client.post("/orders", params={"wait": 20}, json=order("o-2", card="declined"))
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "compensated"
    assert "card declined by issuer" in body["error"]

    response = await client.post("/orders", params={"wait": 0.2}, json=order("o-3", step_delay=1))
    assert response.status_code == 202
    assert response.json()["status"] in ("pending", "running")


async def test_posting_the_same_order_twice_returns_the_same_run(
    client: httpx.AsyncClient,
) -> None:
    """The order id is the idempotency key: a client retrying its POST gets the existing
    run back (created false) instead of a second checkout."""
    first = (await client.post("/orders", json=order("o-4"))).json()
    second = (await client.post("/orders", json=order("o-4"))).json()
    assert second["run_id"] == first["run_id"]
    assert (first["created"], second["created"]) == (True, False)


async def test_result_long_poll_times_out_with_202(client: httpx.AsyncClient) -> None:
    """GET /orders/{id}/result?timeout=T answers 202 with the current status after T
    seconds when the run is still going, and the run goes on."""
    run_id = (await client.post("/orders", json=order("o-5", step_delay=0.5))).json()["run_id"]
    with anyio.fail_after(5):
        response = await client.get(f"/orders/{run_id}/result", params={"timeout": 0.1})
    assert response.status_code == 202
    assert response.json()["status"] in ("pending", "running")
    response = await client.get(f"/orders/{run_id}/result", params={"timeout": 20})
    assert response.json()["status"] == "completed"


async def test_cancel_endpoint_compensates_and_refuses_an_ended_run(
    client: httpx.AsyncClient,
) -> None:
    """POST /orders/{id}/cancel on a running order answers 202 and the run ends
    cancelled; on an ended run it answers 409."""
    run_id = (await client.post("/orders", json=order("o-6", step_delay=0.3))).json()["run_id"]
    response = await client.post(f"/orders/{run_id}/cancel")
    assert response.status_code == 202
    response = await client.get(f"/orders/{run_id}/result", params={"timeout": 20})
    assert response.json()["status"] == "cancelled"
    response = await client.post(f"/orders/{run_id}/cancel")
    assert response.status_code == 409


async def test_bodies_above_the_limit_get_413(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A 5 MB order answers 413 at once, whether it declares its Content-Length or is
    sent chunked (Starlette would read either into memory whole); nothing is started."""
    body = huge_order()
    with anyio.fail_after(10):
        response = await client.post("/orders", content=body, headers=JSON)
        assert response.status_code == 413
        response = await client.post("/orders", content=chunks(body), headers=JSON)
        assert response.status_code == 413
    assert "content-length" not in response.request.headers
    assert await count_runs(db) == 0


async def test_an_input_above_max_payload_bytes_gets_413(dsn: str) -> None:
    """A body under the HTTP limit whose input is above saga's max_payload_bytes is
    saga's PayloadTooLargeError, answered 413 (not the 422 of its parent class)."""
    async with serve(dsn, max_payload_bytes=4096) as client:
        response = await client.post("/orders", json=order("o-big", destination="x" * 8000))
        assert_error(response, 413, "PayloadTooLargeError")
        assert (await client.post("/orders", json=order("o-small"))).status_code == 202


async def test_non_finite_numbers_get_422(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """NaN, Infinity and -Infinity in any numeric field answer 422, never 500: the model
    refuses most (and the 422 body does not echo them, which JSON could not encode), and
    saga's SerializationError the +Infinity that passes ``gt=0``."""
    for text in NON_FINITE_ORDERS:
        response = await client.post("/orders", content=text, headers=JSON)
        assert_error(
            response, 422, "SerializationError" if text == REACHES_SAGA else "ValidationError"
        )
    assert await count_runs(db) == 0


async def test_invalid_orders_get_422(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """Orders the model refuses, bodies that are not an order or not JSON, and a wait
    beyond the cap answer 422; nothing is started."""
    for text in INVALID_ORDERS:
        response = await client.post("/orders", content=text, headers=JSON)
        assert_error(response, 422, "ValidationError")
    for wait in ("3600", "-1", "nan", "soon"):
        response = await client.post("/orders", params={"wait": wait}, json=order("o-8"))
        assert_error(response, 422, "ValidationError")
    assert await count_runs(db) == 0


@pytest.mark.parametrize("what", sorted(UNREADABLE_BODIES))
async def test_a_body_no_json_parser_reads_is_an_invalid_order(
    client: httpx.AsyncClient, db: asyncpg.Connection, what: str
) -> None:
    """README (Web apps): "`422`: the order is invalid", validation errors answering
    {"error": "ValidationError", "detail": [...]}: a body Python's JSON parser raises on
    (a 5,000-digit number, arrays nested 5,000 deep, bytes that are not UTF-8) is one,
    and starts nothing. Before, the FastAPI app answered FastAPI's own 400 "There was an
    error parsing the body"."""
    body = UNREADABLE_BODIES[what]
    response = await client.post("/orders", content=body, headers=JSON)
    assert_error(response, 422, "ValidationError")
    assert await count_runs(db) == 0


async def test_a_run_of_another_saga_is_no_order(
    client: httpx.AsyncClient, orchestrator: OrchestratorFactory
) -> None:
    """The order routes name checkout runs only: a run of another saga sharing the
    database (the approval example's refunds, say) answers 404 on every one, as an
    unknown id (not a 500 reading its output as a shipment), and is not cancelled."""
    other = small_saga("not_an_order", ["a"], result=lambda ctx: "a string")
    orch = await orchestrator(other, concurrency=0)
    run = await orch.start(other, Job(n=1))
    assert_error(await client.get(f"/orders/{run.id}"), 404, "RunNotFoundError")
    response = await client.get(f"/orders/{run.id}/result", params={"timeout": "0"})
    assert_error(response, 404, "RunNotFoundError")
    assert_error(await client.post(f"/orders/{run.id}/cancel"), 404, "RunNotFoundError")
    assert not (await run.info()).cancel_requested


async def test_unknown_run_ids_get_404_and_malformed_ones_422(client: httpx.AsyncClient) -> None:
    """On every run route an unknown run id is saga's RunNotFoundError, answered 404,
    and an id that is not a UUID is a malformed request, answered 422."""
    unknown = uuid.uuid4()
    assert_error(await client.get(f"/orders/{unknown}"), 404, "RunNotFoundError")
    response = await client.get(f"/orders/{unknown}/result", params={"timeout": 0})
    assert_error(response, 404, "RunNotFoundError")
    assert_error(await client.post(f"/orders/{unknown}/cancel"), 404, "RunNotFoundError")
    for bad in MALFORMED_RUN_IDS:
        assert (await client.get(f"/orders/{bad}")).status_code == 422, bad
        assert (await client.get(f"/orders/{bad}/result?timeout=0")).status_code == 422, bad
        assert (await client.post(f"/orders/{bad}/cancel")).status_code == 422, bad


async def test_cancel_of_an_ended_run_gets_409(client: httpx.AsyncClient) -> None:
    """Cancelling a run that ended, whichever way (completed, compensated, cancelled),
    is saga's InvalidRunStateError, answered 409."""
    wait = {"wait": 20}
    done = (await client.post("/orders", params=wait, json=order("o-10"))).json()
    declined = order("o-11", card="declined")
    compensated = (await client.post("/orders", params=wait, json=declined)).json()
    assert (done["status"], compensated["status"]) == ("completed", "compensated")
    cancelled = (await client.post("/orders", json=order("o-12", step_delay=0.3))).json()
    assert (await client.post(f"/orders/{cancelled['run_id']}/cancel")).status_code == 202
    response = await client.get(f"/orders/{cancelled['run_id']}/result", params={"timeout": 20})
    assert response.json()["status"] == "cancelled"
    for run in (done, compensated, cancelled):
        response = await client.post(f"/orders/{run['run_id']}/cancel")
        assert_error(response, 409, "InvalidRunStateError")


@pytest.mark.timeout(60)
async def test_database_outage_gets_503_and_the_app_recovers(
    client: httpx.AsyncClient, base_dsn: str, dsn: str
) -> None:
    """While Postgres refuses connections, starting and reading orders answer 503 with
    Retry-After (no 500, no hang); once it is back the same app, never restarted,
    starts and completes orders again."""
    run_id = (await client.post("/orders", json=order("o-13"))).json()["run_id"]
    async with database_down(base_dsn, dsn):
        with anyio.fail_after(20):
            for response in (
                await client.post("/orders", json=order("o-14")),
                await client.get(f"/orders/{run_id}"),
                await client.get(f"/orders/{run_id}/result", params={"timeout": 0}),
                await client.post(f"/orders/{run_id}/cancel"),
            ):
                assert_error(response, 503, "DatabaseError")
                assert response.headers["retry-after"] == str(RETRY_AFTER)
    with anyio.fail_after(20):
        response = await client.post("/orders", json=order("o-15"))
        assert response.status_code == 202, response.text
        new_id = response.json()["run_id"]
        response = await client.get(f"/orders/{new_id}/result", params={"timeout": 15})
        assert response.json()["status"] == "completed"


async def test_a_closed_orchestrator_gets_503(dsn: str) -> None:
    """Requests that arrive once the lifespan closed the orchestrator (shutting down)
    are saga's LifecycleError, answered 503 with Retry-After."""
    app = create_app(dsn, concurrency=1, poll_interval=0.2, shutdown_timeout=2)
    async with app.router.lifespan_context(app):
        pass
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        response = await client.post("/orders", json=order("o-16"))
        assert_error(response, 503, "LifecycleError")
        assert response.headers["retry-after"] == str(RETRY_AFTER)
        assert_error(await client.get(f"/orders/{uuid.uuid4()}"), 503, "LifecycleError")
