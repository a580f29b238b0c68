"""The dashboard in a real browser (Debian's Chromium through Playwright) on real
PostgreSQL: pages update live without a reload, buttons act and the history says who
did it, a failed compensation is retried from the page, and people who are not signed
in, or may only read, are refused."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import anyio
from playwright.async_api import Page, expect

import saga
from tests._sagas import Fail, Gate, Job, Ledger, permanent, small_saga, transient
from tests.browser.conftest import ALICE, RITA, Context, Serve
from tests.conftest import OrchestratorFactory

NO_RETRY = saga.Retry(max_attempts=1)
#: Playwright's waits, in ms: generous for a loaded 2-core machine, never a hang.
WAIT = 15_000


async def _page(context: Context, headers: dict[str, str] = ALICE) -> Page:
    return await (await context(headers)).new_page()


async def _live(page: Page) -> None:
    """Wait until the page's event stream is connected (changes from now on show)."""
    await expect(page.get_by_test_id("live-status")).to_have_class(re.compile("on"), timeout=WAIT)


async def test_a_run_completes_on_an_open_page_without_reload(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """A run's page shows it running; when its held step is released, the status turns
    completed on the same page: no reload (a marker set in the page survives), the new
    content came through the event stream."""
    gate = Gate("pack")
    s = small_saga("shipping", ["pack", "ship"], gate=gate)
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    status = page.get_by_test_id("run-status")
    await expect(status).to_have_text(re.compile("running"))
    await page.evaluate("window.sagaMarker = 'same page'")
    await _live(page)
    gate.release.set()
    await expect(status).to_have_text(re.compile("completed"), timeout=WAIT)
    assert await page.evaluate("window.sagaMarker") == "same page"


async def test_a_new_run_appears_in_the_open_runs_list(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """The runs list is open; a run started meanwhile appears in it without a reload."""
    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    url = await serve(orch)
    first = await orch.start(s, Job())
    await first.result(timeout=10)
    page = await _page(context)
    await page.goto(f"{url}/runs")
    await expect(page.get_by_test_id("run-row")).to_have_count(1)
    await page.evaluate("window.sagaMarker = 'same page'")
    await _live(page)
    second = await orch.start(s, Job())
    await expect(page.get_by_test_id("run-row")).to_have_count(2, timeout=WAIT)
    await expect(page.get_by_test_id("run-link").first).to_have_text(str(second.id)[:8])
    assert await page.evaluate("window.sagaMarker") == "same page"


async def test_a_right_button_press_left_unfinished_does_not_stop_the_live_page(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """A press of the right button whose release never reaches the page (a context menu
    takes it) does not hold the page's updates: a run started meanwhile still appears
    without a reload. Before, any button's press held them until the next release."""
    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    url = await serve(orch)
    await (await orch.start(s, Job())).result(timeout=10)
    page = await _page(context)
    await page.goto(f"{url}/runs")
    await expect(page.get_by_test_id("run-row")).to_have_count(1)
    await _live(page)
    await page.mouse.move(5, 5)
    await page.mouse.down(button="right")  # and no release
    await orch.start(s, Job())
    await expect(page.get_by_test_id("run-row")).to_have_count(2, timeout=WAIT)


async def test_the_cancel_button_cancels_and_the_history_names_who(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """alice types a note and presses Cancel on a running run: the page answers with a
    flash message, which stays while the page refreshes itself live until the run ends
    cancelled (its completed step compensated); the page's history then shows the cancel
    with alice and her note."""
    gate = Gate("charge")
    ledger = Ledger()
    s = small_saga("order", ["reserve", "charge"], gate=gate, compensate=True, ledger=ledger)
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    form = page.locator("form", has=page.get_by_test_id("action-cancel"))
    await form.get_by_label("note").fill("customer changed their mind")
    await page.get_by_test_id("action-cancel").click()
    await expect(page.get_by_test_id("flash")).to_be_visible(timeout=WAIT)
    await page.evaluate("window.sagaMarker = 'same page'")
    await _live(page)
    gate.release.set()
    with anyio.fail_after(10):
        with contextlib.suppress(saga.RunCancelledError):
            await run.result()
    assert (await run.info()).status is saga.RunStatus.CANCELLED
    assert ledger.steps("compensation") == ["charge", "reserve"]
    status = page.get_by_test_id("run-status")
    await expect(status).to_have_text(re.compile("cancelled"), timeout=WAIT)
    assert await page.evaluate("window.sagaMarker") == "same page"  # refreshed live
    await expect(page.get_by_test_id("flash")).to_be_visible()
    await page.goto(f"{url}/runs/{run.id}")
    row = page.get_by_test_id("history-row").filter(has_text="cancel_requested")
    await expect(row.get_by_test_id("history-by")).to_have_text("alice")
    await expect(row.get_by_test_id("history-note")).to_have_text("customer changed their mind")


async def test_a_failed_compensation_is_retried_from_the_page(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """hotel's compensation gave up and the run is failed; once the hotel desk is back,
    alice presses Retry on the run's page and the page shows the run compensated."""
    desk_closed = [True]
    s = small_saga(
        "trip", ["hotel", "car"], compensate={"hotel"}, fail={"car": permanent("no cars")},
        fail_undo={"hotel": Fail(saga.PermanentError, "desk closed", None,
                                 lambda ctx: desk_closed[0])},
        undo_retry=NO_RETRY,
    )  # fmt: skip
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        with contextlib.suppress(saga.RunFailedError):
            await run.result()
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    status = page.get_by_test_id("run-status")
    await expect(status).to_have_text(re.compile("failed"))
    await expect(page.get_by_test_id("run-compensation-error")).to_contain_text("desk closed")
    desk_closed[0] = False
    await page.get_by_test_id("action-retry").click()
    await expect(status).to_have_text(re.compile("compensated"), timeout=WAIT)
    row = page.get_by_test_id("history-row").filter(has_text="run_retried")
    await expect(row.get_by_test_id("history-by")).to_have_text("alice")


async def test_nobody_gets_401_and_a_reader_cannot_act(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """Without a signed-in operator every page, asset and the event stream answer 401;
    rita (read only) sees the run but no action, and her POST is refused with 403 and
    changes nothing; alice's POST from another site is refused with 403 too."""
    gate = Gate("s1")
    s = small_saga("guarded", 1, gate=gate)
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    nobody = await _page(context, {})
    for path in ("", "/runs", f"/runs/{run.id}", "/attention", "/events", "/static/dashboard.js"):
        response = await nobody.goto(f"{url}{path}")
        assert response is not None
        assert response.status == 401, path
    reader = await _page(context, RITA)
    await reader.goto(f"{url}/runs/{run.id}")
    await expect(reader.get_by_test_id("run-status")).to_have_text(re.compile("running"))
    await expect(reader.get_by_test_id("action-cancel")).to_have_count(0)
    refused = await reader.request.post(f"{url}/runs/{run.id}/cancel", form={"note": "x"})
    assert refused.status == 403
    alice = await _page(context)
    cross = await alice.request.post(
        f"{url}/runs/{run.id}/cancel", form={"note": "x"}, headers={"Origin": "http://evil.test"}
    )
    assert cross.status == 403
    assert not (await run.info()).cancel_requested
    gate.release.set()


async def test_hostile_error_text_never_runs_as_script(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """A step's error holding markup and script (<script>, an onerror handler) shows as
    text on the run's page; nothing of it runs in the browser, there or in the list."""
    hostile = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
    s = small_saga("hostile", 1, fail={"s1": permanent(hostile)})
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        with contextlib.suppress(saga.RunCompensatedError):
            await run.result()
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    await expect(page.get_by_test_id("run-error")).to_contain_text(hostile)
    assert await page.evaluate("window.pwned") is None
    await page.goto(f"{url}/runs")
    await expect(page.get_by_test_id("run-row")).to_have_count(1)
    assert await page.evaluate("window.pwned") is None


async def test_screenshots_of_the_overview_and_a_timeline(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """The overview and the timeline of a graph run (parallel branches, a retried step,
    a failure and its compensations) render as pictures: the chart and the timeline are
    visible and the screenshots are PNGs. With SAGA_SCREENSHOTS=<folder> they are saved
    there (the README's pictures)."""
    s = small_saga(
        "fulfil", ["order", "stock", "payment", "label", "ship"], compensate=True,
        after={"stock": ["order"], "payment": ["order"], "label": ["stock", "payment"],
               "ship": ["label"]},
        fail={"payment": transient(1), "ship": permanent("carrier refused the parcel")},
        delay={"stock": 0.3, "payment": 0.2, "label": 0.1},
    )  # fmt: skip
    ok = small_saga("invoice", 2, delay=0.05)
    orch = await orchestrator(s, ok)
    url = await serve(orch)
    for _ in range(6):
        await (await orch.start(ok, Job())).result(timeout=10)
    run = await orch.start(s, Job())
    with anyio.fail_after(15):
        with contextlib.suppress(saga.RunCompensatedError):
            await run.result()
    page = await _page(context)
    await page.set_viewport_size({"width": 1280, "height": 900})
    await page.goto(f"{url}/")
    await expect(page.get_by_test_id("chart-finished")).to_be_visible()
    overview = await page.screenshot(full_page=True)
    await page.goto(f"{url}/runs/{run.id}")
    timeline = page.get_by_test_id("timeline-svg")
    await expect(timeline).to_be_visible()
    picture = await page.screenshot()  # the top: the run, its error and its timeline
    for png in (overview, picture):
        assert png.startswith(b"\x89PNG")
        assert len(png) > 10_000
    folder = os.environ.get("SAGA_SCREENSHOTS")
    if folder:
        await anyio.Path(folder, "dashboard-overview.png").write_bytes(overview)
        await anyio.Path(folder, "dashboard-run.png").write_bytes(picture)


async def test_a_change_before_the_stream_opens_still_reaches_the_page(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """A run that ends after its page was rendered but before the page's event stream
    opened (the stream is held back here) still shows completed, without reload: the
    page fetches itself once its stream is open."""
    gate = Gate("s1")
    s = small_saga("late", 1, gate=gate)
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    page = await _page(context)
    held = anyio.Event()

    async def hold(route: Any) -> None:
        await held.wait()
        await route.continue_()

    await page.route("**/events*", hold)
    await page.goto(f"{url}/runs/{run.id}")
    status = page.get_by_test_id("run-status")
    await expect(status).to_have_text(re.compile("running"))
    gate.release.set()
    await run.result(timeout=10)
    held.set()
    await _live(page)
    await expect(status).to_have_text(re.compile("completed"), timeout=WAIT)


async def test_an_attempt_waiting_for_its_rate_limit_token_is_shown_so(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """A limit of one call per 6 s: the second run's attempt waits for its token. Its
    page says "rate limited", naming the limit, not "running" (README: "The step has not
    started while it waits"); once it ran, the row says completed."""
    slow = saga.RateLimit("slow_page", per_second=1 / 6, burst=1)
    s = saga.Saga("paced_page", input=Job)

    @s.step(rate_limit=slow)
    async def call(ctx: saga.Context[Job]) -> int:
        return 1

    orch = await orchestrator(s)
    url = await serve(orch)
    assert await (await orch.start(s, Job(n=1))).result(timeout=10) == 1
    run = await orch.start(s, Job(n=2))
    with anyio.fail_after(10):
        while True:
            if any(e.kind == "rate_limited" for e in await run.history()):
                break
            await anyio.sleep(0.02)
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    row = page.get_by_test_id("attempt-row")
    await expect(row.get_by_test_id("rate-limited")).to_have_text("rate limited")
    await expect(row).to_contain_text("slow_page")
    await expect(row).not_to_contain_text("running")
    await run.result(timeout=15)
    await page.reload()
    await expect(row).to_contain_text("completed", timeout=WAIT)
