"""The operator's surface at its edges: page cursors naming no run, the token landing's
headers, exact key filters, a dashboard on a pool of 2, `saga dashboard` on a busy port,
and signals from a dashboard that does not know the saga."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

import saga
from saga.web._auth import CSP
from saga.web._command import token_app
from tests import _harness
from tests._sagas import Job, parked_saga
from tests._wait_sagas import approval, trip
from tests.web.conftest import ALICE, Browser, csrf, mounted
from tests.web.test_dashboard_actions import _parked
from tests.web.test_dashboard_live import Stream, _eventually, _hub

TOKEN = "t" * 32


async def _failed(orch: saga.Orchestrator) -> saga.RunHandle:
    """A `trip` run that ends failed (its hotel compensation gave up): it needs
    attention."""
    run = await orch.start(trip, Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.RunFailedError):
        await run.result(timeout=10)
    return run


@pytest.mark.timeout(60)
async def test_the_attention_page_never_says_no_run_needs_attention_when_runs_do(
    orchestrator: Any, browse: Browser
) -> None:
    """A page cursor naming no run (mistyped, or pruned between two pages) is a 404 on
    the attention page, as on the runs page, never an empty page while a failed run
    needs attention."""
    orch = await orchestrator(trip)
    run = await _failed(orch)
    http = await browse(orch)
    stray = uuid.uuid4()
    runs = await http.get(f"/saga/runs?cursor={stray}", headers=ALICE)
    assert runs.status_code == 404  # the runs page's behaviour, for comparison
    page = await http.get(f"/saga/attention?after={stray}", headers=ALICE)
    assert page.status_code == 404 or str(run.id) in page.text, (
        page.status_code,
        "the attention page claims no run needs attention while a failed run does",
    )


@pytest.mark.timeout(60)
async def test_the_token_landing_redirect_carries_the_security_headers(open_client: Any) -> None:
    """The `saga dashboard` landing (`?token=...`, the redirect that sets the token
    cookie) sends the strict Content-Security-Policy, nosniff and Referrer-Policy every
    other response sends."""
    client = await open_client()
    app = token_app(client, TOKEN, operator="ops", read_only=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        landing = await http.get(f"/runs?token={TOKEN}")
        assert landing.status_code == 303
        assert "saga_dashboard_token" in landing.headers["set-cookie"]
        assert landing.headers.get("content-security-policy") == CSP
        assert landing.headers.get("x-content-type-options") == "nosniff"
        assert landing.headers.get("referrer-policy") == "same-origin"


@pytest.mark.timeout(60)
async def test_the_key_filter_is_exact_and_a_bulk_cancel_spares_other_keys(
    open_client: Any, browse: Browser
) -> None:
    """The key filter is exact, as list_runs' is: "acct-7 " and "acct-7" are two
    business ids; filtering by "acct-7 " lists only its run, and a bulk cancel over that
    filter cancels it and spares the run of "acct-7"."""
    s = parked_saga("keyed")
    client = await open_client(s)
    other = await client.start(s, {"n": 1}, key="acct-7")
    mine = await client.start(s, {"n": 2}, key="acct-7 ")
    http = await browse(client)
    page = await http.get("/saga/runs", params={"key": "acct-7 "}, headers=ALICE)
    assert page.status_code == 200
    token = csrf(page.text)
    form = {"csrf": token, "action": "cancel", "key": "acct-7 "}
    first = await http.post("/saga/runs/bulk", data=form, headers=ALICE)
    assert first.status_code == 200
    assert 'data-count="1"' in first.text
    done = await http.post(
        "/saga/runs/bulk", data={**form, "confirm": "yes", "expect": "1"}, headers=ALICE
    )
    assert done.status_code == 303
    assert not (await client.info(other.id)).cancel_requested, (
        "a bulk cancel filtered on key 'acct-7 ' cancelled the run of key 'acct-7'"
    )
    assert (await client.info(mine.id)).cancel_requested
    assert str(mine.id) in page.text
    assert str(other.id) not in page.text


@pytest.mark.timeout(60)
async def test_an_open_page_does_not_starve_a_client_on_a_two_connection_pool(dsn: str) -> None:
    """A dashboard on a client whose pool has 2 connections (the least Client takes,
    the LISTEN holding one): with a page open (its event stream live), other pages
    still answer, since the hub then holds no connection of the pool."""
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    try:
        async with saga.Client(pool) as client:
            app = mounted(client)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/saga/runs", headers=ALICE)).status_code == 200
                stream = Stream(app)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream.run)
                    await stream.until("retry:")
                    await _eventually(lambda: _hub(app).connected)
                    status = None
                    with anyio.move_on_after(5):
                        status = (await http.get("/saga/runs", headers=ALICE)).status_code
                    stream.close()
                assert status is not None, "the runs page hung while another page was open"
                assert status == 200
    finally:
        pool.terminate()


@pytest.mark.timeout(60)
async def test_saga_dashboard_on_a_busy_port_exits_1_without_a_traceback_or_a_url(
    dsn: str,
) -> None:
    """`saga dashboard` on a port in use exits 1 with a one-line error naming it, no
    traceback, and prints no token URL for a server that never served."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = await _harness.run(
            "-m", "saga", "--dsn", dsn, "dashboard", "--port", str(port), timeout=30
        )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "token=" not in done.stdout, "a token URL was printed for a server that never served"


@pytest.mark.timeout(60)
async def test_a_dashboard_without_the_sagas_registered_still_sends_signals(
    orchestrator: Any, open_client: Any, browse: Browser
) -> None:
    """A dashboard whose client did not register the run's saga (`saga dashboard`
    without --target) sends the signal the run waits for, unchecked: the run goes on
    with it. Another name is a 400 naming the wait, and nothing is sent."""
    worker = await orchestrator(approval)
    (run_id,) = await _parked(worker)
    bare = await open_client()  # what `saga dashboard` opens without --target
    http = await browse(bare)
    page = (await http.get(f"/saga/runs/{run_id}", headers=ALICE)).text
    assert 'data-testid="action-signal"' in page  # the form is offered
    response = await http.post(
        f"/saga/runs/{run_id}/signal",
        data={
            "csrf": csrf(page),
            "name": "decision",
            "payload": '{"approved": true, "by": "boss"}',
        },
        headers=ALICE,
    )
    assert response.status_code == 303, (response.status_code, response.text[-600:])
    assert await worker.get_run(run_id).result(timeout=10) == "boss"
    (other,) = await _parked(worker)
    page = (await http.get(f"/saga/runs/{other}", headers=ALICE)).text
    wrong = await http.post(
        f"/saga/runs/{other}/signal",
        data={"csrf": csrf(page), "name": "nope", "payload": "{}"},
        headers=ALICE,
    )
    assert wrong.status_code == 400
    assert "only the signal the run waits for" in wrong.text
    assert "decision" in wrong.text
    assert (await worker.info(other)).status is saga.RunStatus.WAITING


@pytest.mark.timeout(60)
async def test_an_unchecked_signal_the_wait_refuses_fails_the_step_with_the_reason(
    orchestrator: Any, open_client: Any, browse: Browser
) -> None:
    """A signal sent unchecked (the dashboard did not register the saga) whose payload
    the wait's model refuses: the step reading it fails with a SerializationError
    saying the stored payload does not read as its type (not an AttributeError about
    saga's internals), and the run rolls back, never stuck."""
    worker = await orchestrator(approval)
    (run_id,) = await _parked(worker)
    http = await browse(await open_client())
    page = (await http.get(f"/saga/runs/{run_id}", headers=ALICE)).text
    response = await http.post(
        f"/saga/runs/{run_id}/signal",
        data={"csrf": csrf(page), "name": "decision", "payload": '{"approved": "perhaps"}'},
        headers=ALICE,
    )
    assert response.status_code == 303
    with pytest.raises(saga.RunCompensatedError) as ended:
        await worker.get_run(run_id).result(timeout=20)
    error = ended.value.error
    assert error is not None
    assert error.type == "saga.SerializationError"
    assert "decision" in error.message
