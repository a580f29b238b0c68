"""examples/approval.py end to end: the refund that waits up to 48 h for a manager's
decision, over ASGI with the app's lifespan, on real Postgres; the 48 h pass through
saga.testing.advance, not real time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from examples.approval import create_app, payments
from saga.testing import advance

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    """The example app, serving (its orchestrator open, executing runs)."""
    app = create_app(dsn, concurrency=4, poll_interval=0.2, shutdown_timeout=2)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


def request(refund_id: str, amount: int = 2500) -> dict[str, Any]:
    return {"refund_id": refund_id, "order_id": f"o-{refund_id}", "amount_cents": amount}


async def until(http: httpx.AsyncClient, refund_id: str, *statuses: str) -> dict[str, Any]:
    with anyio.fail_after(15):
        while True:
            body: dict[str, Any] = (await http.get(f"/refunds/{refund_id}")).json()
            if body.get("status") in statuses:
                return body
            await anyio.sleep(0.05)


async def test_an_approved_refund_waits_then_pays(client: httpx.AsyncClient) -> None:
    """The run waits (48 h timeout shown) holding the funds; the manager's approval, one
    POST, resumes it and the refund is paid."""
    created = await client.post("/refunds", json=request("r1"))
    assert created.status_code == 202, created.text
    shown = await until(client, "r1", "waiting")
    times_out = datetime.fromisoformat(shown["times_out_at"])
    assert timedelta(hours=47) < times_out - datetime.now(UTC) <= timedelta(hours=48)
    decided = await client.post("/refunds/r1/decision", json={"approved": True, "manager": "ana"})
    assert decided.status_code == 202
    assert decided.json()["accepted"] is True
    await until(client, "r1", "completed")
    assert "hold-o-r1" in payments.paid


async def test_a_rejected_refund_releases_the_hold(client: httpx.AsyncClient) -> None:
    """A rejection compensates: the hold is released and the run ends compensated; a
    second decision is reported as not accepted (the first stands) or refused (ended)."""
    await client.post("/refunds", json=request("r2"))
    await until(client, "r2", "waiting")
    no = await client.post("/refunds/r2/decision", json={"approved": False, "manager": "bo"})
    assert no.status_code == 202
    again = await client.post("/refunds/r2/decision", json={"approved": True, "manager": "cy"})
    assert again.status_code in (200, 409)
    shown = await until(client, "r2", "compensated")
    assert "rejected by bo" in shown["error"]
    assert "hold-o-r2" in payments.released
    assert "hold-o-r2" not in payments.paid


async def test_no_decision_within_48_hours_releases_the_hold(
    client: httpx.AsyncClient, dsn: str
) -> None:
    """48 h without a decision (moved by saga.testing.advance) compensate; a decision
    sent afterwards is refused with 409."""
    body = (await client.post("/refunds", json=request("r3"))).json()
    await until(client, "r3", "waiting")
    orchestrator = client.app.state.orchestrator  # type: ignore[attr-defined]
    await advance(orchestrator, body["run_id"], timedelta(hours=48))
    shown = await until(client, "r3", "compensated")
    assert "no signal 'decision'" in shown["error"]
    assert "hold-o-r3" in payments.released
    late = await client.post("/refunds/r3/decision", json={"approved": True, "manager": "ana"})
    assert late.status_code == 409


async def test_a_repeated_decision_changes_nothing(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two decisions in a row: the first wins (202), the second is answered 200 with
    accepted false; once the refund has completed, a decision is 409. (The payment is
    held until the repeat was answered: a run that ended first would turn it into a
    409, which the test must not leave to timing.)"""
    paying, paid = anyio.Event(), anyio.Event()
    pay = payments.refund

    async def held_refund(hold_id: str, *, key: str) -> str:
        paying.set()
        await paid.wait()
        return await pay(hold_id, key=key)

    monkeypatch.setattr(payments, "refund", held_refund)
    await client.post("/refunds", json=request("r4"))
    first = await client.post("/refunds/r4/decision", json={"approved": True, "manager": "a"})
    second = await client.post("/refunds/r4/decision", json={"approved": False, "manager": "b"})
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["accepted"] is False
    with anyio.fail_after(15):
        await paying.wait()  # the first decision was consumed: it approved
    paid.set()
    await until(client, "r4", "completed")
    late = await client.post("/refunds/r4/decision", json={"approved": False, "manager": "c"})
    assert late.status_code == 409


async def test_bad_requests(client: httpx.AsyncClient) -> None:
    """An unknown refund is 404, a malformed decision 422, and nothing is started for a
    malformed request."""
    assert (
        await client.post("/refunds/none/decision", json={"approved": True, "manager": "a"})
    ).status_code == 404
    await client.post("/refunds", json=request("r5"))
    for bad in ({}, {"approved": "maybe", "manager": "a"}, {"approved": True, "manager": ""}):
        assert (await client.post("/refunds/r5/decision", json=bad)).status_code == 422
    assert (await client.post("/refunds", json={"refund_id": "r6"})).status_code == 422
    assert (await client.get("/refunds/r6")).status_code == 404


async def test_the_request_row_and_the_run_commit_together(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The refund row and its run are one transaction: a replay returns the same run
    (created false) and writes nothing new; when the app's insert fails the run's
    insert is rolled back with it, so no run exists without its request row."""
    first = (await client.post("/refunds", json=request("r7"))).json()
    replay = (await client.post("/refunds", json=request("r7"))).json()
    assert replay["run_id"] == first["run_id"]
    assert replay["created"] is False
    runs = await db.fetchval("SELECT count(*) FROM saga.runs")
    await db.execute("ALTER TABLE refunds ADD CONSTRAINT small CHECK (amount_cents < 100000)")
    failed = await client.post("/refunds", json=request("r8", amount=500000))
    assert failed.status_code == 500
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == runs
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE refund_id = 'r8'") == 0
