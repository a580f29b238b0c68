"""The dashboard's forms in a real browser (Debian's Chromium through Playwright): a
live refresh never takes what an operator typed or the button they are pressing, and
an action that changes nothing, or is refused, says why."""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest
from playwright.async_api import Page, expect

import saga
from tests._sagas import Gate, Job, small_saga, until_status
from tests._wait_sagas import approval
from tests.browser.conftest import ALICE, Context, Serve
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(90)
#: Playwright's waits, in ms.
WAIT = 15_000


async def _page(context: Context, headers: dict[str, str] = ALICE) -> Page:
    return await (await context(headers)).new_page()


async def _live(page: Page) -> None:
    """Wait until the page's event stream is connected (changes from now on show)."""
    await expect(page.get_by_test_id("live-status")).to_have_class(re.compile("on"), timeout=WAIT)


async def _change_elsewhere(orch: saga.Orchestrator) -> None:
    """Something changes in the database (another run starts and parks), which the hub
    announces to the open pages; then give the announcement time to arrive."""
    other = await orch.start(approval, Job(n=99))
    await until_status(other, saga.RunStatus.WAITING)
    await anyio.sleep(2)


async def test_a_press_of_cancel_after_typing_a_note_lands_while_a_change_is_pending(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """README, Dashboard: "Open pages update without a reload ... a page does not refresh
    under a user typing into a form", and "Actions ... cancel ...".

    alice types a note into the Cancel form of a waiting run (meanwhile another run
    starts: a change is announced and held back because she is typing), then presses
    "Cancel run" as a person does (button down, 150 ms, button up): the refresh waits
    for the press, and the run is cancelled with her note."""
    orch = await orchestrator(approval)
    url = await serve(orch)
    run = await orch.start(approval, Job())
    await until_status(run, saga.RunStatus.WAITING)
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    await _live(page)
    await anyio.sleep(0.5)  # the refresh the stream's opening triggers is over
    await page.get_by_test_id("note-cancel").click()
    await page.keyboard.type("customer called")
    await _change_elsewhere(orch)
    box = await page.get_by_test_id("action-cancel").bounding_box()
    assert box is not None
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.down()
    await anyio.sleep(0.15)
    await page.mouse.up()
    with anyio.move_on_after(5):
        while not (await run.info()).cancel_requested:  # noqa: ASYNC110 - polled
            await anyio.sleep(0.1)
    info = await run.info()
    flashes = await page.get_by_test_id("flash").count()
    assert info.cancel_requested, (
        "expected alice's press of 'Cancel run' (after typing a note) to cancel the run; "
        f"observed: not cancelled (status {info.status}), {flashes} flash message(s), the "
        "live refresh replaced the form between button-down and button-up"
    )


async def test_an_unsent_form_keeps_what_was_typed_after_the_field_loses_focus(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """README, Dashboard: "a page does not refresh under a user typing into a form".

    alice fills the Send signal form of a waiting run (a JSON payload and a note), then
    clicks on the page's heading (to read the run before sending) while another run
    starts: what she typed stays in the form she has not sent (the refresh waits)."""
    orch = await orchestrator(approval)
    url = await serve(orch)
    run = await orch.start(approval, Job())
    await until_status(run, saga.RunStatus.WAITING)
    page = await _page(context)
    await page.goto(f"{url}/runs/{run.id}")
    await _live(page)
    payload = '{"approved": true, "by": "ana"}'
    await page.get_by_test_id("signal-payload").fill(payload)
    await page.get_by_test_id("note-signal").fill("checked with finance")
    await page.locator("h1").click()  # done typing for now: reading the page
    await _change_elsewhere(orch)
    typed = await page.get_by_test_id("signal-payload").input_value()
    note = await page.get_by_test_id("note-signal").input_value()
    assert (typed, note) == (payload, "checked with finance"), (
        "expected the unsent signal form to keep what alice typed; observed after a live "
        f"refresh: payload {typed!r}, note {note!r}"
    )


async def test_a_cancel_of_a_run_already_cancelling_says_nothing_changed(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context
) -> None:
    """README, Dashboard, Actions: "Each is the Python API's action with `by=` the
    operator's name and the note: the run's history records it." and "Wrong state ...
    with the reason on the page, and nothing changes."

    A running run's page is open (Cancel is offered, and stays offered while the run is
    cancelling); carol cancels the run from elsewhere; alice then presses Cancel with
    her note: the page says a cancel was requested before and nothing changed, and the
    history holds carol's cancel only."""
    gate = Gate("s1")
    s = small_saga("order", ["s1", "s2"], gate=gate, compensate=True)
    orch = await orchestrator(s)
    url = await serve(orch)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    try:
        page = await _page(context)
        await page.goto(f"{url}/runs/{run.id}")
        await orch.cancel(run.id, by="carol", note="first")
        await page.get_by_test_id("note-cancel").fill("alice's reason")
        await page.get_by_test_id("action-cancel").click()
        flash = page.get_by_test_id("flash")
        await expect(flash).to_be_visible(timeout=WAIT)
        said = await flash.inner_text()
        history = await orch.history(run.id)
        assert "nothing changed" in said, said
        assert [e.data.get("by") for e in history if e.kind == "cancel_requested"] == ["carol"]
    finally:
        gate.release.set()


async def test_a_signal_to_a_run_that_ended_since_the_page_loaded_is_409_with_that_reason(
    orchestrator: OrchestratorFactory, serve: Serve, context: Context, open_client: Any
) -> None:
    """README, Dashboard, Actions: "send a signal with a JSON payload (... otherwise only
    the signal the run waits for now ...)" and "Wrong state answers 409, unknown run 404,
    bad input 400, with the reason on the page".

    A dashboard whose client does not register the saga (`saga dashboard` without
    --target) shows a run waiting for `decision`; the run gets its signal elsewhere and
    completes; alice, on the page loaded before, sends `decision`: 409 saying the run
    has ended (as a dashboard that registers the saga answers)."""
    worker = await orchestrator(approval)
    bare = await open_client()
    url = await serve(bare)
    run = await worker.start(approval, Job())
    await until_status(run, saga.RunStatus.WAITING)
    page = await _page(context)
    await page.route("**/events*", lambda route: route.abort())  # the page as loaded
    await page.goto(f"{url}/runs/{run.id}")
    await worker.signal(run.id, "decision", {"approved": True, "by": "carol"})
    assert await run.result(timeout=10) == "carol"
    await page.get_by_test_id("signal-payload").fill('{"approved": true, "by": "ana"}')
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.get_by_test_id("action-signal").click()
    status = (await answer.value).status
    message = await page.get_by_test_id("error-message").inner_text()
    assert status == 409, (status, message)
    assert "ended" in message, message
