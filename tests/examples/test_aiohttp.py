"""examples/aiohttp_app.py end to end: aiohttp's test server and client, real Postgres."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from examples.aiohttp_app import ORCHESTRATOR, create_app
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

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


def order(order_id: str, **fields: Any) -> dict[str, Any]:
    return {"order_id": order_id, "amount_cents": 500, **fields}


@asynccontextmanager
async def serve(dsn: str, **options: Any) -> AsyncIterator[Client]:
    """The example app on a real (local) test server: startup opens the orchestrator
    through the cleanup context, teardown closes it."""
    options = {"concurrency": 4, "poll_interval": 0.2, "shutdown_timeout": 2, **options}
    async with TestClient(TestServer(create_app(dsn, **options))) as client:
        yield client


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[Client]:
    """The example app, serving."""
    async with serve(dsn) as client:
        yield client


async def count_runs(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM saga.runs")
    return count


async def assert_error(response: aiohttp.ClientResponse, status: int, error: str) -> None:
    """``response`` is ``error`` as ``status`` with the shared JSON body."""
    text = await response.text()
    assert response.status == status, text
    body = await response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert "Traceback" not in text


async def test_cleanup_ctx_opens_and_closes_the_orchestrator(dsn: str) -> None:
    """The orchestrator is open while the app serves and closed once it shut down."""
    app = create_app(dsn, concurrency=1, poll_interval=0.2, shutdown_timeout=2)
    async with TestClient(TestServer(app)):
        orchestrator = app[ORCHESTRATOR]
        assert orchestrator.is_open
    assert not orchestrator.is_open


async def test_post_answers_202_at_once_then_result_and_timeline(
    client: Client,
) -> None:
    """POST /orders answers 202 with the run id before any step ran; the result
    long-poll returns the output and GET /orders/{id} the completed timeline."""
    with anyio.fail_after(1.2):  # the steps take 1.5 s: nothing ran inline
        response = await client.post("/orders", json=order("a-1", step_delay=0.5))
        assert response.status == 202
        body = await response.json()
        run_id = body["run_id"]
        assert body["status"] == "pending"
        assert response.headers["Location"] == f"/orders/{run_id}"
        state = await (await client.get(f"/orders/{run_id}")).json()
        assert state["status"] in ("pending", "running")

    response = await client.get(f"/orders/{run_id}/result", params={"timeout": "20"})
    assert response.status == 200
    result = await response.json()
    assert result["status"] == "completed"
    assert result["output"]["tracking"] == "trk-rsv-a-1"

    response = await client.get(f"/orders/{run_id}")
    state = await response.json()
    assert state["status"] == "completed"
    assert [e["kind"] for e in state["timeline"]][-1] == "run_completed"


async def test_post_with_wait_returns_the_outcome(client: Client) -> None:
    """POST /orders?wait=N answers 200 with the outcome when the run ends in time (a
    failed shipment: compensated, with its error) and 202 when it does not."""
    response = await client.post(
        "/orders", params={"wait": "20"}, json=order("a-2", destination="nowhere")
    )
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "compensated"
    assert "no courier delivers there" in body["error"]

    response = await client.post("/orders", params={"wait": "0.1"}, json=order("a-3", step_delay=1))
    assert response.status == 202


async def test_cancel_and_bad_requests(client: Client) -> None:
    """Cancel answers 202 then 409 once the run ended cancelled; unknown ids answer 404,
    malformed ids, invalid orders and out-of-range waits 422."""
    response = await client.post("/orders", json=order("a-4", step_delay=0.3))
    run_id = (await response.json())["run_id"]
    assert (await client.post(f"/orders/{run_id}/cancel")).status == 202
    response = await client.get(f"/orders/{run_id}/result", params={"timeout": "20"})
    assert (await response.json())["status"] == "cancelled"
    assert (await client.post(f"/orders/{run_id}/cancel")).status == 409

    unknown = uuid.uuid4()
    assert (await client.get(f"/orders/{unknown}")).status == 404
    assert (await client.get(f"/orders/{unknown}/result?timeout=0")).status == 404
    assert (await client.get("/orders/not-a-uuid")).status == 422
    assert (await client.post("/orders", json={"order_id": "", "amount_cents": 1})).status == 422
    assert (await client.post("/orders", data=b"not json")).status == 422
    response = await client.post("/orders", params={"wait": "nan"}, json=order("a-5"))
    assert response.status == 422


async def test_bodies_above_the_limit_get_413(client: Client, db: asyncpg.Connection) -> None:
    """A 5 MB order answers 413 (aiohttp's client_max_size) without hanging, whether it
    declares its Content-Length or is sent chunked; nothing is started, and the server
    still answers afterwards."""
    body = huge_order()
    with anyio.fail_after(20):
        # A BytesIO, not bytes: aiohttp's client warns about sending large bytes inline.
        response = await client.post("/orders", data=io.BytesIO(body), headers=JSON)
        assert response.status == 413
        assert response.request_info.headers["Content-Length"] == str(len(body))
        response = await client.post("/orders", data=chunks(body), headers=JSON)
        assert response.status == 413
        assert "Content-Length" not in response.request_info.headers
        assert (await client.post("/orders", json=order("a-6"))).status == 202
    assert await count_runs(db) == 1


async def test_an_input_above_max_payload_bytes_gets_413(dsn: str) -> None:
    """A body under the HTTP limit whose input is above saga's max_payload_bytes is
    saga's PayloadTooLargeError, answered 413 (not the 422 of its parent class)."""
    async with serve(dsn, max_payload_bytes=4096) as client:
        response = await client.post("/orders", json=order("a-big", destination="x" * 8000))
        await assert_error(response, 413, "PayloadTooLargeError")
        assert (await client.post("/orders", json=order("a-small"))).status == 202


async def test_non_finite_numbers_get_422(client: Client, db: asyncpg.Connection) -> None:
    """NaN, Infinity and -Infinity in any numeric field answer 422: the model refuses
    most, and saga's SerializationError the +Infinity that passes ``gt=0``."""
    for text in NON_FINITE_ORDERS:
        response = await client.post("/orders", data=text, headers=JSON)
        error = "SerializationError" if text == REACHES_SAGA else "ValidationError"
        await assert_error(response, 422, error)
    assert await count_runs(db) == 0


async def test_invalid_orders_get_422(client: Client, db: asyncpg.Connection) -> None:
    """Orders the model refuses, bodies that are not an order or not JSON, and a wait
    beyond the cap answer 422; nothing is started."""
    for text in INVALID_ORDERS:
        response = await client.post("/orders", data=text, headers=JSON)
        await assert_error(response, 422, "ValidationError")
    for wait in ("3600", "-1", "nan", "soon"):
        response = await client.post("/orders", params={"wait": wait}, json=order("a-8"))
        assert response.status == 422
    assert await count_runs(db) == 0


@pytest.mark.parametrize("what", sorted(UNREADABLE_BODIES))
async def test_a_body_no_json_parser_reads_is_an_invalid_order(
    client: Client, db: asyncpg.Connection, what: str
) -> None:
    """README (Web apps): "`422`: the order is invalid", validation errors answering
    {"error": "ValidationError", "detail": [...]}: a body Python's JSON parser raises on
    (a 5,000-digit number, arrays nested 5,000 deep, bytes that are not UTF-8) is one,
    and starts nothing. Before, the FastAPI app answered FastAPI's own 400 "There was an
    error parsing the body"."""
    body = UNREADABLE_BODIES[what]
    response = await client.post("/orders", data=body, headers=JSON)
    await assert_error(response, 422, "ValidationError")
    assert await count_runs(db) == 0


async def test_a_run_of_another_saga_is_no_order(
    client: Client, orchestrator: OrchestratorFactory
) -> None:
    """The order routes name checkout runs only: a run of another saga sharing the
    database (the approval example's refunds, say) answers 404 on every one, as an
    unknown id (not a 500 reading its output as a shipment), and is not cancelled."""
    other = small_saga("not_an_order", ["a"], result=lambda ctx: "a string")
    orch = await orchestrator(other, concurrency=0)
    run = await orch.start(other, Job(n=1))
    await assert_error(await client.get(f"/orders/{run.id}"), 404, "RunNotFoundError")
    response = await client.get(f"/orders/{run.id}/result", params={"timeout": "0"})
    await assert_error(response, 404, "RunNotFoundError")
    await assert_error(await client.post(f"/orders/{run.id}/cancel"), 404, "RunNotFoundError")
    assert not (await run.info()).cancel_requested


async def test_unknown_run_ids_get_404_and_malformed_ones_422(client: Client) -> None:
    """On every run route an unknown run id is saga's RunNotFoundError, answered 404,
    and an id that is not a UUID is a malformed request, answered 422."""
    unknown = uuid.uuid4()
    await assert_error(await client.get(f"/orders/{unknown}"), 404, "RunNotFoundError")
    response = await client.get(f"/orders/{unknown}/result", params={"timeout": "0"})
    await assert_error(response, 404, "RunNotFoundError")
    await assert_error(await client.post(f"/orders/{unknown}/cancel"), 404, "RunNotFoundError")
    for bad in MALFORMED_RUN_IDS:
        assert (await client.get(f"/orders/{bad}")).status == 422, bad
        assert (await client.get(f"/orders/{bad}/result?timeout=0")).status == 422, bad
        assert (await client.post(f"/orders/{bad}/cancel")).status == 422, bad


async def test_cancel_of_an_ended_run_gets_409(client: Client) -> None:
    """Cancelling a run that ended, whichever way (completed, compensated, cancelled),
    is saga's InvalidRunStateError, answered 409."""
    wait = {"wait": "20"}
    done = await (await client.post("/orders", params=wait, json=order("a-10"))).json()
    declined = order("a-11", card="declined")
    compensated = await (await client.post("/orders", params=wait, json=declined)).json()
    assert (done["status"], compensated["status"]) == ("completed", "compensated")
    response = await client.post("/orders", json=order("a-12", step_delay=0.3))
    cancelled = await response.json()
    assert (await client.post(f"/orders/{cancelled['run_id']}/cancel")).status == 202
    response = await client.get(f"/orders/{cancelled['run_id']}/result", params={"timeout": "20"})
    assert (await response.json())["status"] == "cancelled"
    for run in (done, compensated, cancelled):
        response = await client.post(f"/orders/{run['run_id']}/cancel")
        await assert_error(response, 409, "InvalidRunStateError")


@pytest.mark.timeout(60)
async def test_database_outage_gets_503_and_the_app_recovers(
    client: Client, base_dsn: str, dsn: str
) -> None:
    """While Postgres refuses connections, starting and reading orders answer 503 with
    Retry-After (no 500, no hang); once it is back the same app, never restarted,
    starts and completes orders again."""
    run_id = (await (await client.post("/orders", json=order("a-13"))).json())["run_id"]
    async with database_down(base_dsn, dsn):
        with anyio.fail_after(20):
            for response in (
                await client.post("/orders", json=order("a-14")),
                await client.get(f"/orders/{run_id}"),
                await client.get(f"/orders/{run_id}/result", params={"timeout": "0"}),
                await client.post(f"/orders/{run_id}/cancel"),
            ):
                await assert_error(response, 503, "DatabaseError")
                assert response.headers["Retry-After"] == str(RETRY_AFTER)
    with anyio.fail_after(20):
        response = await client.post("/orders", json=order("a-15"))
        assert response.status == 202, await response.text()
        new_id = (await response.json())["run_id"]
        response = await client.get(f"/orders/{new_id}/result", params={"timeout": "15"})
        assert (await response.json())["status"] == "completed"


async def test_a_closed_orchestrator_gets_503(dsn: str) -> None:
    """Requests that arrive once the orchestrator closed (the app shutting down) are
    saga's LifecycleError, answered 503 with Retry-After."""
    async with serve(dsn, concurrency=1) as client:
        await client.app[ORCHESTRATOR].aclose()
        response = await client.post("/orders", json=order("a-16"))
        await assert_error(response, 503, "LifecycleError")
        assert response.headers["Retry-After"] == str(RETRY_AFTER)
        await assert_error(await client.get(f"/orders/{uuid.uuid4()}"), 503, "LifecycleError")
