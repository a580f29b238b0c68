"""examples/fastapi_app.py end to end: httpx over ASGI, the app's lifespan, real Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from examples.fastapi_app import create_app


def order(order_id: str, **fields: Any) -> dict[str, Any]:
    return {"order_id": order_id, "amount_cents": 1299, **fields}


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    """The example app with its lifespan entered (the orchestrator open), over ASGI."""
    app = create_app(dsn, concurrency=4, poll_interval=0.2, shutdown_timeout=2)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client


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


async def test_bad_requests_get_clear_4xx(client: httpx.AsyncClient) -> None:
    """Unknown run ids answer 404, malformed ids and invalid orders 422, a wait beyond
    the cap 422; nothing is started for a rejected order."""
    unknown = uuid.uuid4()
    assert (await client.get(f"/orders/{unknown}")).status_code == 404
    assert (await client.get(f"/orders/{unknown}/result?timeout=0")).status_code == 404
    assert (await client.post(f"/orders/{unknown}/cancel")).status_code == 404
    assert (await client.get("/orders/not-a-uuid")).status_code == 422
    response = await client.post("/orders", json={"order_id": "o-7", "amount_cents": -1})
    assert response.status_code == 422
    response = await client.post("/orders", params={"wait": 3600}, json=order("o-8"))
    assert response.status_code == 422
