"""Live pages that must not go stale, in a real browser (Chromium through Playwright):
a filter the browser normalizes (a whole minute, a key with a line break), figures that
time alone changes (work overdue), a stream a proxy refused while the server restarted,
and two `saga dashboard` commands signed into from one browser. README, Dashboard."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from playwright.async_api import Page, expect

from tests._sagas import Job, small_saga
from tests.browser.conftest import ALICE

pytestmark = pytest.mark.timeout(60)

#: Playwright's waits, in ms.
WAIT = 15_000


async def _live(page: Page) -> None:
    await expect(page.get_by_test_id("live-status")).to_have_class(re.compile("on"), timeout=WAIT)


async def test_runs_page_filtered_by_a_whole_minute_stays_live(
    orchestrator: Any, serve: Any, context: Any
) -> None:
    """README, Dashboard: "*Runs*: filter by saga, status, idempotency key ... and
    creation time" and "Live. Open pages update without a reload ... a page does not
    refresh under a user using a form: while a field has focus, while a form holds what
    they typed and have not sent (the live dot turns amber)".

    The runs page filtered by "created after 10 minutes ago", rounded to the minute as an
    operator picks it (seconds :00), is open and idle; a run starts and ends. Instead the
    new run shows. Before, it never did: Chromium normalizes the datetime-local field's
    value to "...T13:30" while its default is "...T13:30:00", so the page believed the
    operator typed something and held every refresh for ever (the dot turned amber)."""
    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    url = await serve(orch)
    after = (datetime.now(UTC) - timedelta(minutes=10)).replace(second=0, microsecond=0)
    page = await (await context(ALICE)).new_page()
    await page.goto(f"{url}/runs?after={after.strftime('%Y-%m-%dT%H:%M:%S')}")
    await _live(page)
    await expect(page.get_by_test_id("runs-empty")).to_have_count(1)
    await anyio.sleep(1)
    run = await orch.start(s, Job())
    await run.result(timeout=10)
    await expect(page.get_by_test_id("run-row")).to_have_count(1, timeout=8_000)


async def test_runs_page_filtered_by_a_key_with_a_line_break_stays_live(
    orchestrator: Any, serve: Any, context: Any
) -> None:
    """README, Dashboard: "*Runs*: filter by ... idempotency key (the business id in
    hand)" and "Live. Open pages update without a reload ... a page does not refresh under
    a user using a form: ... while a form holds what they typed and have not sent".

    The runs page filtered by the key "order\\n42" (a key is any text; the bulk form was
    fixed for it) is open, empty and idle; the run with that key starts and ends, and
    shows. Before, it never did: the key field's value loses its line break (a text
    input strips them) while its default keeps it, so the page believed the operator
    typed something and held every refresh for ever."""
    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    url = await serve(orch)
    key = "order\n42"
    page = await (await context(ALICE)).new_page()
    await page.goto(f"{url}/runs?key={quote(key)}")
    await _live(page)
    await expect(page.get_by_test_id("runs-empty")).to_have_count(1)
    await anyio.sleep(1)
    run = await orch.start(s, Job(), key=key)
    await run.result(timeout=10)
    await expect(page.get_by_test_id("run-row")).to_have_count(1, timeout=8_000)


async def test_overview_shows_work_nobody_runs_once_it_is_overdue_without_a_reload(
    open_client: Any, orchestrator: Any, serve: Any, context: Any, db: Any
) -> None:
    """README, Dashboard: the overview shows "*work nobody runs* (runs due for over a
    minute that no worker took: usually a definition version no live worker has)", and
    "Live. Open pages update without a reload ... counts by state, lags and overdue work
    are live."

    A worker is live (saga "other"); a run of "orphan" v7, which no worker has, is due
    55 s ago. The overview is open and live and shows no overdue work (right: not a
    minute yet). Ten seconds later the run is due for over a minute and a fresh page
    shows it under "work nobody runs", and so does the open page within 15 s. Before,
    the open page kept "None.": it refreshed only when the history's sequence or the
    transactions moved, and a system where nobody runs the work writes nothing (the
    operator watching the overview during a bad deploy was told all is well)."""
    orphan = small_saga("orphan", ["s1"], version=7)
    client = await open_client(orphan)  # executes nothing
    orch = await orchestrator(small_saga("other", 1))  # a live worker, without "orphan"
    run = await client.start(orphan, Job())
    await db.execute(
        "UPDATE saga.runs SET due_at = now() - interval '55 seconds' WHERE id = $1", run.id
    )
    url = await serve(orch)
    page = await (await context(ALICE)).new_page()
    await page.goto(f"{url}/")
    await _live(page)
    table = page.get_by_test_id("overdue-table")
    await expect(table).to_contain_text("None.")
    await anyio.sleep(10)
    fresh = await (await context(ALICE)).new_page()
    await fresh.goto(f"{url}/")
    await expect(fresh.get_by_test_id("overdue-table")).to_contain_text("orphan")
    await expect(table).to_contain_text("orphan", timeout=15_000)


async def _serve_app(app: Any) -> tuple[str, Any, Any]:
    """Serve an ASGI app on a free loopback port: (url, server, task)."""
    import asyncio
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve([sock]))
    with anyio.fail_after(10):
        while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag
            await anyio.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, task


async def test_two_saga_dashboard_commands_on_one_machine_keep_their_visitor_signed_in(
    orchestrator: Any, open_client: Any, browser: Any
) -> None:
    """README, `saga dashboard`: "Without an auth option it listens on 127.0.0.1 only and
    prints, once, a URL holding a random token; visiting it sets an HttpOnly,
    SameSite=Strict cookie".

    Two `saga dashboard` commands run on one machine (two databases, `--port 8080` and
    `--port 8081`); the operator visits each printed URL in one browser; both stay
    signed in. Before, the first answered 401 "Sign in to use this dashboard.": cookies
    are not kept apart by port, both commands set one cookie name on path "/" of
    127.0.0.1, and the second visit replaced the first's token (printed once)."""
    from saga.web._command import token_app

    first = token_app(await orchestrator(), "A" * 32, operator="token", read_only=False)
    second = token_app(await open_client(), "B" * 32, operator="token", read_only=False)
    served = [await _serve_app(first), await _serve_app(second)]
    ctx = await browser.new_context()
    try:
        page = await ctx.new_page()
        response = await page.goto(f"{served[0][0]}/?token={'A' * 32}")
        assert response is not None
        assert response.status == 200
        response = await page.goto(f"{served[1][0]}/?token={'B' * 32}")
        assert response is not None
        assert response.status == 200
        response = await page.goto(f"{served[0][0]}/runs")
        assert response is not None
        assert response.status == 200, await page.text_content("main")
    finally:
        await ctx.close()
        for _, server, _ in served:
            server.should_exit = True
            server.force_exit = True
        for _, _, task in served:
            with anyio.fail_after(10):
                await task


async def test_a_tab_opened_after_a_proxy_error_on_the_stream_still_goes_live(
    orchestrator: Any, browser: Any
) -> None:
    """README, Dashboard: "Live. Open pages update without a reload ... The tabs of one
    browser share one stream (one tab listens and tells the others, over a
    `BroadcastChannel` and a Web Lock)"; `app.close_streams()` ends the open pages'
    streams "(pages reconnect by themselves)".

    The dashboard sits behind a proxy (as README's TLS proxy); the server restarts: its
    streams end (close_streams), and for a few seconds the proxy answers the stream's
    reconnection with 502. The server is back; the operator opens a NEW tab of the runs
    page, and a run starts and ends: the new tab shows it, as a tab of another browser
    does. Before, neither tab of this browser ever did: the first tab's EventSource gave
    up for good on the 502 (a browser does not retry an HTTP error), yet that tab kept
    the Web Lock until closed, so no tab of this browser listened again."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount

    from saga.web import dashboard
    from tests.browser.conftest import authorize

    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    inner = Starlette(routes=[Mount("/saga", app=dashboard(orch, authorize=authorize))])
    proxy: dict[str, Any] = {"down": False, "streams": set()}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        """The proxy: 502 for the stream while the server is down; a restart ends the
        open streams cleanly (as close_streams does)."""
        if scope["type"] != "http" or not scope["path"].endswith("/events"):
            await inner(scope, receive, send)
            return
        if proxy["down"]:
            await PlainTextResponse("Bad Gateway", status_code=502)(scope, receive, send)
            return
        with anyio.CancelScope() as stream:
            proxy["streams"].add(stream)
            try:
                await inner(scope, receive, send)
            finally:
                proxy["streams"].discard(stream)
        if stream.cancel_called:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    url, server, task = await _serve_app(app)
    ctx = await browser.new_context(extra_http_headers=ALICE)
    other = await browser.new_context(extra_http_headers=ALICE)
    try:
        first = await ctx.new_page()
        await first.goto(f"{url}/saga/runs")
        await _live(first)
        proxy["down"] = True  # the restart: streams end, reconnections get 502
        for stream in list(proxy["streams"]):
            stream.cancel()
        await expect(first.get_by_test_id("live-status")).not_to_have_class(
            re.compile("on"), timeout=WAIT
        )
        await anyio.sleep(5)  # the browser's reconnection (retry: 3000) met the 502
        proxy["down"] = False  # back
        new_tab = await ctx.new_page()
        await new_tab.goto(f"{url}/saga/runs")
        elsewhere = await other.new_page()
        await elsewhere.goto(f"{url}/saga/runs")
        await _live(elsewhere)
        await anyio.sleep(1)
        run = await orch.start(s, Job())
        await run.result(timeout=10)
        await expect(elsewhere.get_by_test_id("run-row")).to_have_count(1, timeout=8_000)
        await expect(new_tab.get_by_test_id("run-row")).to_have_count(1, timeout=8_000)
    finally:
        await ctx.close()
        await other.close()
        server.should_exit = True
        server.force_exit = True
        with anyio.fail_after(10):
            await task
