"""The dashboard's live pages in a real browser (Chromium through Playwright): several
tabs of one browser, a signal sent in a caller's transaction, a filter holding a line
break, and a token URL. README, Dashboard."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import anyio
import asyncpg
import pytest
from playwright.async_api import Page, expect

import saga
from tests._sagas import FAST, Job, small_saga
from tests._wait_sagas import Decision, approval
from tests.browser.conftest import ALICE as B_ALICE

pytestmark = pytest.mark.timeout(60)

#: Playwright's waits, in ms.
WAIT = 15_000


async def _status(orch: saga.Client, run_id: Any, status: str) -> None:
    with anyio.fail_after(10):
        while (await orch.info(run_id)).status.value != status:  # noqa: ASYNC110 - polls a run
            await anyio.sleep(0.05)


async def _live(page: Page) -> None:
    await expect(page.get_by_test_id("live-status")).to_have_class(re.compile("on"), timeout=WAIT)


#: step -> a one-day sleep -> step -> wait "decision" (no timeout) -> step.
later = saga.Saga("later", input=Job)


@later.step(retry=FAST)
async def first(ctx: saga.Context[Job]) -> int:
    return 1


later.sleep(timedelta(days=1))


@later.step(retry=FAST)
async def middle(ctx: saga.Context[Job]) -> int:
    return 2


decision = later.wait_for("decision", Decision, timeout=None)


@later.step(retry=FAST)
async def finish(ctx: saga.Context[Job]) -> str:
    return ctx.result(decision).by


async def test_six_open_dashboard_tabs_all_stay_live(
    orchestrator: Any, serve: Any, context: Any
) -> None:
    """README, Dashboard: "Live. Open pages update without a reload ... and tells the
    pages through server-sent events"; the tabs of one browser share one stream.

    Six tabs of the runs page are open in one browser; a run that ends shows on them.
    Before, each tab held a stream on one of the browser's six HTTP/1.1 connections per
    host, and the page's own refetch waited for a free one for ever."""
    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    url = await serve(orch)
    ctx = await context(B_ALICE)
    pages = []
    for _ in range(6):
        page = await ctx.new_page()
        await page.goto(f"{url}/runs")
        await _live(page)
        pages.append(page)
    run = await orch.start(s, Job())
    await run.result(timeout=10)
    await expect(pages[0].get_by_test_id("run-row")).to_have_count(1, timeout=8_000)


async def test_a_seventh_dashboard_page_loads_while_six_are_open(
    orchestrator: Any, serve: Any, context: Any
) -> None:
    """README, Dashboard: open pages update through server-sent events, and the tabs of
    one browser share one stream: with six dashboard pages open, a seventh loads.
    Before, it hung until a tab was closed (six streams held every connection)."""
    orch = await orchestrator()
    url = await serve(orch)
    ctx = await context(B_ALICE)
    for _ in range(6):
        page = await ctx.new_page()
        await page.goto(f"{url}/attention")
        await _live(page)
    seventh = await ctx.new_page()
    await seventh.goto(f"{url}/", timeout=8_000)
    await expect(seventh.get_by_test_id("census")).to_be_visible()


async def test_a_signal_sent_in_a_transaction_shows_on_the_open_run_page_at_its_commit(
    orchestrator: Any, serve: Any, context: Any, dsn: str
) -> None:
    """README, Dashboard: "Live. Open pages update without a reload: ... reads the
    history's sequence once a second"; In your transaction: `signal()` accepts `conn=`.

    A run's page is open and live; the app sends the run's signal in its own transaction,
    which commits 2.5 s later. The page shows the signal_received entry after the
    commit. Before, the sequence moved at the insert (the hub announced a change nobody
    could read yet) and nothing announced the commit: the page never showed it."""
    orch = await orchestrator(later)
    url = await serve(orch)
    run = await orch.start(later, Job())
    await _status(orch, run.id, "sleeping")
    page = await (await context(B_ALICE)).new_page()
    await page.goto(f"{url}/runs/{run.id}")
    await _live(page)
    await anyio.sleep(1)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await orch.signal(run.id, "decision", {"approved": True}, conn=conn, by="bob")
            await anyio.sleep(2.5)
    finally:
        await conn.close()
    events = len(await orch.history(run.id))
    await expect(page.get_by_test_id("history-row")).to_have_count(events, timeout=6_000)


async def test_bulk_cancel_over_a_key_holding_a_newline_counts_its_run(
    orchestrator: Any, serve: Any, context: Any
) -> None:
    """README, Dashboard: "bulk retry or cancel over the current runs filter: the first
    press shows how many runs match"; a key is any text.

    The runs page filtered by the key "order\\n42" lists one run, and pressing "Cancel
    matching runs" in Chromium counts it. Before, the filter went in hidden fields whose
    line breaks a browser sends as CRLF: "No run matches this filter"."""
    orch = await orchestrator(approval)
    url = await serve(orch)
    key = "order\n42"
    run = await orch.start(approval, Job(), key=key)
    await _status(orch, run.id, "waiting")
    page = await (await context(B_ALICE)).new_page()
    await page.goto(f"{url}/runs?key={quote(key)}")
    await expect(page.get_by_test_id("run-row")).to_have_count(1)
    await page.get_by_test_id("bulk-cancel").click()
    count = page.get_by_test_id("bulk-count")
    await expect(count).to_have_attribute("data-count", "1", timeout=5_000)


async def test_a_base64_token_with_a_plus_signs_in_through_the_token_url(
    orchestrator: Any, browser: Any
) -> None:
    """README, `saga dashboard`: visiting the token URL "sets an HttpOnly, SameSite=Strict
    cookie and drops the token from the address bar"; `--token-env VAR` takes printable
    ASCII without spaces, quotes, commas, semicolons or backslashes.

    A token made with `openssl rand -base64 18` holding "+" and "/" signs in, in
    Chromium. Before, the landing read the query as a form ("+" as a space): 401."""
    import asyncio
    import socket

    import uvicorn

    from saga.web._command import access_token, token_app

    token = "q2V+Zx9/Lm0pR7+aT4kW8nB3"  # what openssl rand -base64 18 prints, with "+"
    assert access_token("127.0.0.1", "H3_TOKEN", {"H3_TOKEN": token}) == token
    orch = await orchestrator()
    app = token_app(orch, token, operator="token", read_only=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve([sock]))
    ctx = await browser.new_context()
    try:
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag
                await anyio.sleep(0.02)
        page = await ctx.new_page()
        response = await page.goto(f"http://127.0.0.1:{port}/?token={token}")
        assert response is not None
        assert response.status == 200, await page.text_content("main")
        assert page.url == f"http://127.0.0.1:{port}/"
    finally:
        await ctx.close()
        server.should_exit = True
        server.force_exit = True
        with anyio.fail_after(10):
            await task
