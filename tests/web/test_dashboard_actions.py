"""Operators acting through the dashboard: every action is a POST that calls the core
API with the operator's name and note, redirects back with a flash message, and
changes nothing when refused (400 bad input, 404 unknown run, 409 wrong state)."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import anyio
import httpx
import pytest

import saga
from saga.testing import advance
from tests._sagas import ONCE, Fail, Job, permanent, small_saga, until_status
from tests._wait_sagas import SAGAS as WAIT_SAGAS
from tests._wait_sagas import approval, napping
from tests.web.conftest import ALICE, Browser, csrf


async def _token(http: httpx.AsyncClient) -> str:
    """Alice's CSRF token, from a page with a form (the runs page's bulk forms)."""
    return csrf((await http.get("/saga/runs", headers=ALICE)).text)


async def _status(client: saga.Client, run_id: uuid.UUID, want: str) -> None:
    with anyio.fail_after(10):
        while True:
            if (await client.info(run_id)).status.value == want:
                return
            await anyio.sleep(0.05)


async def _parked(orch: saga.Orchestrator, n: int = 1) -> list[uuid.UUID]:
    """Start ``n`` approval runs and wait until each waits for its signal."""
    ids = [(await orch.start(approval, {"n": i})).id for i in range(n)]
    for run_id in ids:
        await _status(orch, run_id, "waiting")
    return ids


async def test_cancel_records_the_operator_and_note(orchestrator: Any, browse: Browser) -> None:
    """POST cancel with a note: 303 back to the run's page, which shows a flash once;
    the run's history records data.by = the operator and data.note; the run rolls back."""
    orch = await orchestrator(approval)
    (run_id,) = await _parked(orch)
    http = await browse(orch)
    response = await http.post(
        f"/saga/runs/{run_id}/cancel",
        data={"csrf": await _token(http), "note": "customer asked"},
        headers=ALICE,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/saga/runs/{run_id}"
    page = await http.get(response.headers["location"], headers=ALICE)
    assert 'data-testid="flash"' in page.text
    assert "Cancel requested by alice" in page.text
    again = await http.get(f"/saga/runs/{run_id}", headers=ALICE)
    assert 'data-testid="flash"' not in again.text  # shown once
    await _status(orch, run_id, "cancelled")
    history = await orch.history(run_id)
    acted = [e for e in history if e.data.get("by") == "alice"]
    assert acted, [e.kind for e in history]
    assert acted[0].data.get("note") == "customer asked"
    page = (await http.get(f"/saga/runs/{run_id}", headers=ALICE)).text
    assert re.search(r'data-testid="history-by">alice<', page)
    assert 'data-testid="history-note">customer asked<' in page


async def test_a_wrong_state_action_is_409_and_changes_nothing(
    orchestrator: Any, browse: Browser
) -> None:
    """Cancelling a completed run, or retrying it, answers 409 with the reason, and the
    run and its history are unchanged."""
    s = small_saga("done", ["s1"])
    orch = await orchestrator(s)
    handle = await orch.start(s, {})
    await handle.result(timeout=10)
    before = await orch.history(handle.id)
    http = await browse(orch)
    token = await _token(http)
    for action in ("cancel", "retry"):
        response = await http.post(
            f"/saga/runs/{handle.id}/{action}", data={"csrf": token}, headers=ALICE
        )
        assert response.status_code == 409, action
        assert "completed" in response.text
    assert (await orch.info(handle.id)).status is saga.RunStatus.COMPLETED
    assert await orch.history(handle.id) == before


async def test_actions_on_an_unknown_run_are_404(orchestrator: Any, browse: Browser) -> None:
    """Acting on a run nobody started answers 404; on text that is no run id, 400;
    an unknown action, 404."""
    orch = await orchestrator()
    http = await browse(orch)
    token = await _token(http)
    unknown = uuid.uuid4()
    for action in ("cancel", "retry"):
        response = await http.post(
            f"/saga/runs/{unknown}/{action}", data={"csrf": token}, headers=ALICE
        )
        assert response.status_code == 404, action
    bad = await http.post("/saga/runs/nope/cancel", data={"csrf": token}, headers=ALICE)
    assert bad.status_code == 400
    odd = await http.post(f"/saga/runs/{unknown}/explode", data={"csrf": token}, headers=ALICE)
    assert odd.status_code == 404


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"approved": "perhaps"}', "invalid payload"),
    ],
)
async def test_a_bad_signal_payload_is_400_and_changes_nothing(
    orchestrator: Any, browse: Browser, payload: str, message: str
) -> None:
    """A signal whose payload is not JSON, not an object, or refused by the wait's
    model answers 400; the run still waits."""
    orch = await orchestrator(approval)
    (run_id,) = await _parked(orch)
    http = await browse(orch)
    response = await http.post(
        f"/saga/runs/{run_id}/signal",
        data={"csrf": await _token(http), "name": "decision", "payload": payload},
        headers=ALICE,
    )
    assert response.status_code == 400
    assert message in response.text
    assert (await orch.info(run_id)).status is saga.RunStatus.WAITING


async def test_a_signal_from_the_dashboard_resumes_the_run(
    orchestrator: Any, browse: Browser
) -> None:
    """A valid signal is recorded with the operator's name and the run goes on."""
    orch = await orchestrator(approval)
    (run_id,) = await _parked(orch)
    http = await browse(orch)
    response = await http.post(
        f"/saga/runs/{run_id}/signal",
        data={
            "csrf": await _token(http),
            "name": "decision",
            "payload": '{"approved": true, "by": "boss"}',
            "note": "approved on the phone",
        },
        headers=ALICE,
    )
    assert response.status_code == 303
    assert await orch.get_run(run_id).result(timeout=10) == "boss"
    assert any(e.data.get("by") == "alice" for e in await orch.history(run_id))


async def test_a_run_stopped_at_its_timed_out_wait_offers_the_signal(
    orchestrator: Any, browse: Browser
) -> None:
    """README (Waits): on_timeout="stop" stops the run for an operator, "who sends the
    awaited signal (the run goes on) or retries it ... or cancels it". The run's page
    offers all three: the signal form beside retry and cancel."""
    orch = await orchestrator(*WAIT_SAGAS)
    run = await orch.start(approval, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, timedelta(hours=49))
    info = await until_status(run, saga.RunStatus.STOPPED)
    assert info.wait == "decision"
    http = await browse(orch)
    page = await http.get(f"/saga/runs/{run.id}", headers=ALICE)
    assert page.status_code == 200
    for action in ("retry", "cancel", "signal"):
        assert f'data-testid="action-{action}"' in page.text


async def test_a_dashboard_without_the_saga_sends_no_signal_to_a_sleeping_run(
    orchestrator: Any, open_client: Any, browse: Browser, db: Any
) -> None:
    """README (Dashboard): a signal is "checked against the wait's model when the client
    registered the saga; otherwise only the signal the run waits for now, stored as
    given". A sleeping run waits for no signal: a dashboard that does not know its saga
    refuses one named after the sleep (400) and stores nothing."""
    orch = await orchestrator(napping)
    run = await orch.start(napping, Job(n=1))
    info = await until_status(run, saga.RunStatus.SLEEPING)
    assert info.wait is not None
    http = await browse(await open_client())  # napping is not registered there
    response = await http.post(
        f"/saga/runs/{run.id}/signal",
        data={"csrf": await _token(http), "name": info.wait, "payload": '{"x": 1}'},
        headers=ALICE,
    )
    assert response.status_code == 400
    assert "signal_received" not in [e.kind for e in await run.history()]
    assert await db.fetchval("SELECT count(*) FROM saga.signals WHERE run_id = $1", run.id) == 0


async def test_the_signal_form_of_a_run_is_filled_with_its_signal_never_a_sleep(
    orchestrator: Any, browse: Browser
) -> None:
    """The run page's signal form is filled with the signal the run waits for; a
    sleeping run waits for none, so the form is empty (a signal for a later wait is kept
    by the run). Before, it was filled with the sleep's name, which the button then
    sent and the dashboard refused."""
    orch = await orchestrator(napping, approval)
    sleeping = await orch.start(napping, Job(n=1))
    waiting = await orch.start(approval, Job(n=1))
    await until_status(sleeping, saga.RunStatus.SLEEPING)
    await until_status(waiting, saga.RunStatus.WAITING)
    http = await browse(orch)

    async def filled(run: saga.RunHandle[Any]) -> str:
        page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
        match = re.search(r'name="name"[^>]*value="([^"]*)"[^>]*data-testid="signal-name"', page)
        assert match is not None
        return match[1]

    assert await filled(sleeping) == ""
    assert await filled(waiting) == "decision"


async def test_retry_resolve_and_skip_of_a_failed_run(orchestrator: Any, browse: Browser) -> None:
    """A failed run (its compensation gave up) shows on the attention page; resolve and
    skip need a note (400 without); retry runs the compensation again, and the run ends
    compensated."""
    down = [True]  # the ledger is down for the first call only
    s = small_saga(
        "undo",
        ["a", "b"],
        compensate=True,
        fail={"b": permanent("no")},
        fail_undo={
            "a": Fail(RuntimeError, "ledger down", when=lambda ctx: bool(down and down.pop()))
        },
        retry=ONCE,
        undo_retry=ONCE,
    )
    orch = await orchestrator(s)
    handle = await orch.start(s, {})
    with pytest.raises(saga.RunFailedError):
        await handle.result(timeout=10)
    http = await browse(orch)
    attention = (await http.get("/saga/attention", headers=ALICE)).text
    assert str(handle.id) in attention
    page = (await http.get(f"/saga/runs/{handle.id}", headers=ALICE)).text
    for testid in ("action-retry", "action-resolve", "action-skip"):
        assert f'data-testid="{testid}"' in page
    token = csrf(page)
    for action in ("resolve", "skip"):
        response = await http.post(
            f"/saga/runs/{handle.id}/{action}", data={"csrf": token, "note": ""}, headers=ALICE
        )
        assert response.status_code == 400, action
        assert "note is required" in response.text
    response = await http.post(
        f"/saga/runs/{handle.id}/retry",
        data={"csrf": token, "note": "ledger is back"},
        headers=ALICE,
    )
    assert response.status_code == 303
    await _status(orch, handle.id, "compensated")


async def test_resolve_takes_a_run_off_the_attention_page(
    orchestrator: Any, browse: Browser
) -> None:
    """Marking a failed run resolved (with a note) removes it from the attention page
    and records who and why."""
    s = small_saga(
        "stuck",
        ["a", "b"],
        compensate=True,
        fail={"b": permanent("no")},
        fail_undo={"a": permanent("gone")},
        retry=ONCE,
        undo_retry=ONCE,
    )
    orch = await orchestrator(s)
    handle = await orch.start(s, {})
    with pytest.raises(saga.RunFailedError):
        await handle.result(timeout=10)
    http = await browse(orch)
    response = await http.post(
        f"/saga/runs/{handle.id}/resolve",
        data={"csrf": await _token(http), "note": "refunded by hand"},
        headers=ALICE,
    )
    assert response.status_code == 303
    assert str(handle.id) not in (await http.get("/saga/attention", headers=ALICE)).text
    notes = [e.data.get("note") for e in await orch.history(handle.id)]
    assert "refunded by hand" in notes


async def test_bulk_cancel_asks_to_confirm_the_count(orchestrator: Any, browse: Browser) -> None:
    """The first POST only counts ("this will cancel 3 runs") and changes nothing; a
    confirmation carrying a stale count is 409 and changes nothing; the confirmation
    with the right count cancels exactly the runs the filter matches."""
    orch = await orchestrator(approval)
    ids = await _parked(orch, 3)
    http = await browse(orch)
    token = await _token(http)
    form = {"csrf": token, "action": "cancel", "saga": "approval", "status": "waiting"}
    first = await http.post("/saga/runs/bulk", data=form, headers=ALICE)
    assert first.status_code == 200
    assert 'data-count="3"' in first.text
    assert "This will cancel 3 runs" in first.text
    for run_id in ids:
        assert not (await orch.info(run_id)).cancel_requested
    stale = await http.post(
        "/saga/runs/bulk", data={**form, "confirm": "yes", "expect": "2"}, headers=ALICE
    )
    assert stale.status_code == 409
    for run_id in ids:
        assert not (await orch.info(run_id)).cancel_requested
    done = await http.post(
        "/saga/runs/bulk",
        data={**form, "confirm": "yes", "expect": "3", "note": "bad batch"},
        headers=ALICE,
    )
    assert done.status_code == 303
    assert done.headers["location"].startswith("/saga/runs?")
    page = await http.get(done.headers["location"], headers=ALICE)
    assert "Cancelled 3 runs" in page.text
    for run_id in ids:
        await _status(orch, run_id, "cancelled")


async def test_bulk_is_bounded_by_bulk_limit(orchestrator: Any, browse: Browser) -> None:
    """More matching runs than bulk_limit: the confirmation page says so and offers no
    button, and a forged confirmation is refused (409) without acting."""
    orch = await orchestrator(approval)
    ids = await _parked(orch, 3)
    http = await browse(orch, bulk_limit=2)
    form = {"csrf": await _token(http), "action": "cancel", "saga": "approval"}
    first = await http.post("/saga/runs/bulk", data=form, headers=ALICE)
    assert "More than 2 runs match" in first.text
    assert 'data-testid="bulk-confirm-button"' not in first.text
    forged = await http.post(
        "/saga/runs/bulk", data={**form, "confirm": "yes", "expect": "2"}, headers=ALICE
    )
    assert forged.status_code == 409
    for run_id in ids:
        assert not (await orch.info(run_id)).cancel_requested


async def test_bulk_with_a_malformed_filter_is_400(orchestrator: Any, browse: Browser) -> None:
    """A bulk form with a bad status or action answers 400 and acts on nothing."""
    orch = await orchestrator()
    http = await browse(orch)
    token = await _token(http)
    bad_status = {"csrf": token, "action": "cancel", "status": "bogus"}
    assert (await http.post("/saga/runs/bulk", data=bad_status, headers=ALICE)).status_code == 400
    bad_action = {"csrf": token, "action": "explode"}
    assert (await http.post("/saga/runs/bulk", data=bad_action, headers=ALICE)).status_code == 400


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ({"note": "n" * 4001}, "note must be at most 4000 characters"),
        ({"note": "bad\x00note"}, "NUL"),
        ({"expect": "-1"}, "carries no count"),
        ({"expect": "two"}, "carries no count"),
    ],
    ids=["long note", "NUL in note", "negative count", "no count"],
)
async def test_bad_input_in_a_bulk_confirmation_is_400_and_acts_on_nothing(
    open_client: Any, browse: Browser, extra: dict[str, str], what: str
) -> None:
    """README (Dashboard): "Wrong state answers 409, unknown run 404, bad input 400,
    with the reason on the page, and nothing changes." A bulk confirmation with a bad
    note or count is bad input: 400 with the reason, no run cancelled. Before, a bad
    note or a negative count answered 409, the status of runs that moved meanwhile."""
    s = small_saga("bulky", 1)
    client = await open_client(s)  # executes nothing: the runs stay pending
    ids = [(await client.start(s, Job(n=i))).id for i in range(2)]
    http = await browse(client)
    form = {
        "csrf": await _token(http),
        "action": "cancel",
        "filter": "saga=bulky",
        "confirm": "yes",
        "expect": "2",
        **extra,
    }
    with anyio.fail_after(20):
        response = await http.post("/saga/runs/bulk", data=form, headers=ALICE)
    message = " ".join(re.findall(r'data-testid="error-message">(.*?)</p>', response.text, re.S))
    assert response.status_code == 400
    assert what in message
    for run_id in ids:
        assert not (await client.info(run_id)).cancel_requested


async def test_a_live_refresh_leaves_the_flash_to_the_page_it_answers(
    orchestrator: Any, browse: Browser
) -> None:
    """The page an action leaves may refresh itself live (its event stream heard the
    action's change) while the browser follows the redirect: that refresh (it says
    X-Saga-Refresh) shows no flash and leaves it, so the page the redirect leads to
    still shows "Cancel requested by alice", once."""
    orch = await orchestrator(approval)
    (run_id,) = await _parked(orch)
    http = await browse(orch)
    response = await http.post(
        f"/saga/runs/{run_id}/cancel",
        data={"csrf": await _token(http), "note": "customer asked"},
        headers=ALICE,
    )
    assert response.status_code == 303
    leaving = await http.get(f"/saga/runs/{run_id}", headers={**ALICE, "X-Saga-Refresh": "1"})
    assert leaving.status_code == 200
    assert 'data-testid="flash"' not in leaving.text
    page = await http.get(response.headers["location"], headers=ALICE)
    assert "Cancel requested by alice" in page.text
    again = await http.get(f"/saga/runs/{run_id}", headers=ALICE)
    assert 'data-testid="flash"' not in again.text  # shown once
