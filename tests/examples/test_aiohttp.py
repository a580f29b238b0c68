"""examples/aiohttp_app.py end to end: aiohttp's test server and client, real Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from aiohttp.test_utils import TestClient, TestServer

from examples.aiohttp_app import ORCHESTRATOR, create_app


def order(order_id: str, **fields: Any) -> dict[str, Any]:
    return {"order_id": order_id, "amount_cents": 500, **fields}


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[TestClient[Any, Any]]:
    """The example app on a real (local) test server: startup opens the orchestrator
    through the cleanup context, teardown closes it."""
    app = create_app(dsn, concurrency=4, poll_interval=0.2, shutdown_timeout=2)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_cleanup_ctx_opens_and_closes_the_orchestrator(dsn: str) -> None:
    """The orchestrator is open while the app serves and closed once it shut down."""
    app = create_app(dsn, concurrency=1, poll_interval=0.2, shutdown_timeout=2)
    async with TestClient(TestServer(app)):
        orchestrator = app[ORCHESTRATOR]
        assert orchestrator.is_open
    assert not orchestrator.is_open


async def test_post_answers_202_at_once_then_result_and_timeline(
    client: TestClient[Any, Any],
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


async def test_post_with_wait_returns_the_outcome(client: TestClient[Any, Any]) -> None:
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


async def test_cancel_and_bad_requests(client: TestClient[Any, Any]) -> None:
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
