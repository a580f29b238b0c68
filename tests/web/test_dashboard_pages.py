"""The dashboard's pages over real runs: what they show, what they hide, and the
answers to malformed requests."""

from __future__ import annotations

import re
import uuid
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import ONCE, permanent, small_saga
from tests._wait_sagas import approval
from tests.web.conftest import ALICE, Browser, csrf

HOSTILE = "<script>alert(1)</script>"


async def test_overview_shows_the_census_chart_and_failures(
    orchestrator: Any, browse: Browser
) -> None:
    """The overview counts runs by state, draws the finished-runs chart as inline SVG,
    and lists failed attempts by saga and error type."""
    ok = small_saga("ok", 2)
    bad = small_saga("bad", ["s1"], fail={"s1": permanent("declined")}, retry=ONCE)
    orch = await orchestrator(ok, bad)
    await (await orch.start(ok, {})).result(timeout=10)
    with pytest.raises(saga.RunCompensatedError):
        await (await orch.start(bad, {})).result(timeout=10)
    http = await browse(orch)
    response = await http.get("/saga/", headers=ALICE)
    assert response.status_code == 200
    html = response.text
    assert 'data-testid="chart-finished"' in html
    assert 'data-testid="census-failed"' in html
    assert "saga.PermanentError" in html or "PermanentError" in html
    assert "<svg" in html
    assert "<script>" not in html.replace(
        '<script src="/saga/static/dashboard.js" defer></script>', ""
    )


async def test_run_page_shows_timeline_attempts_and_history(
    orchestrator: Any, browse: Browser
) -> None:
    """One run's page draws its attempts as an SVG timeline, tables every attempt and
    every history event, and shows its error."""
    bad = small_saga(
        "bad", ["a", "b"], compensate=True, fail={"b": permanent("no stock")}, retry=ONCE
    )
    orch = await orchestrator(bad)
    handle = await orch.start(bad, {})
    with pytest.raises(saga.RunCompensatedError):
        await handle.result(timeout=10)
    http = await browse(orch)
    response = await http.get(f"/saga/runs/{handle.id}", headers=ALICE)
    assert response.status_code == 200
    html = response.text
    assert 'data-testid="timeline-svg"' in html
    assert html.count('data-testid="attempt-row"') == 3  # a, b, undo a
    assert 'data-kind="run_compensated"' in html
    assert "no stock" in html
    assert 'data-done="yes"' in html  # a was compensated


async def test_hostile_names_keys_and_errors_render_as_text(
    orchestrator: Any, browse: Browser, db: asyncpg.Connection
) -> None:
    """A saga name, an idempotency key and an error message holding markup are shown
    escaped on every page: no script element reaches the browser."""
    bad = small_saga("bad", ["s1"], fail={"s1": permanent(HOSTILE)}, retry=ONCE)
    orch = await orchestrator(bad)
    handle = await orch.start(bad, {}, key=HOSTILE)
    with pytest.raises(saga.RunCompensatedError):
        await handle.result(timeout=10)
    await db.execute("UPDATE saga.runs SET saga_name = $1 WHERE id = $2", HOSTILE, handle.id)
    http = await browse(orch)
    for path in ("/saga/", f"/saga/runs/{handle.id}", "/saga/runs", "/saga/runs?key=" + HOSTILE):
        response = await http.get(path, headers=ALICE)
        assert response.status_code == 200, path
        assert HOSTILE not in response.text, path
    page = (await http.get(f"/saga/runs/{handle.id}", headers=ALICE)).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_payloads_are_hidden_by_default_and_redacted_when_shown(
    orchestrator: Any, browse: Browser
) -> None:
    """Without show_payloads no input or result appears; with it, each payload passes
    through redact(path, value) first, and error messages through redact("error")."""
    s = small_saga("pay", ["s1"], result={"s1": lambda ctx: {"card": "4111-secret"}})
    orch = await orchestrator(s)
    handle = await orch.start(s, {"n": 424242})
    await handle.result(timeout=10)
    hidden = await browse(orch)
    page = (await hidden.get(f"/saga/runs/{handle.id}", headers=ALICE)).text
    assert "424242" not in page
    assert "4111-secret" not in page

    seen: list[str] = []

    def redact(path: str, value: Any) -> Any:
        seen.append(path)
        if path.startswith("result.") or path == "output":
            return {"card": "****"}
        return value

    shown = await browse(orch, show_payloads=True, redact=redact)
    page = (await shown.get(f"/saga/runs/{handle.id}", headers=ALICE)).text
    assert "424242" in page
    assert "4111-secret" not in page
    assert "****" in page
    assert {"input", "result.s1", "output"} <= set(seen)


async def test_unknown_run_is_404_and_a_bad_id_is_400(orchestrator: Any, browse: Browser) -> None:
    """A run id nobody started answers 404; text that is not a UUID answers 400."""
    orch = await orchestrator()
    http = await browse(orch)
    assert (await http.get(f"/saga/runs/{uuid.uuid4()}", headers=ALICE)).status_code == 404
    response = await http.get("/saga/runs/not-a-uuid", headers=ALICE)
    assert response.status_code == 400
    assert "not a run id" in response.text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=bogus", "unknown status"),
        ("after=yesterday", "created after must be a date"),
        ("before=0001-01-01T00:00%2B14:00", "created before is out of range"),
        ("cursor=xyz", "bad page cursor"),
    ],
)
async def test_malformed_filters_answer_400(
    orchestrator: Any, browse: Browser, query: str, message: str
) -> None:
    """A bad status, time or cursor in the runs filter is a 400 page saying what is
    wrong."""
    orch = await orchestrator()
    http = await browse(orch)
    response = await http.get(f"/saga/runs?{query}", headers=ALICE)
    assert response.status_code == 400
    assert message in response.text


async def test_unknown_cursor_is_404(orchestrator: Any, browse: Browser) -> None:
    """A cursor naming no run (pruned meanwhile) is a 404 page."""
    orch = await orchestrator()
    http = await browse(orch)
    response = await http.get(f"/saga/runs?cursor={uuid.uuid4()}", headers=ALICE)
    assert response.status_code == 404


async def test_runs_are_keyset_paged_newest_first(open_client: Any, browse: Browser) -> None:
    """The runs list pages through list_runs' cursor: 120 runs show as 50, 50, 20,
    newest first, each run once, filters kept across pages."""
    s = small_saga("many", ["s1"])
    client = await open_client(s)  # a client executes nothing: the runs stay pending
    ids = [(await client.start(s, {})).id for _ in range(120)]
    http = await browse(client)
    seen: list[str] = []
    url = "/saga/runs?saga=many&status=pending"
    pages = 0
    while url:
        response = await http.get(url, headers=ALICE)
        assert response.status_code == 200
        html = response.text
        seen += _run_ids(html)
        pages += 1
        next_link = _next(html)
        url = next_link.replace("&amp;", "&") if next_link else ""
    assert pages == 3
    assert seen == [str(i) for i in reversed(ids)]


def _run_ids(html: str) -> list[str]:
    return re.findall(r'data-testid="run-row" data-run-id="([0-9a-f-]+)"', html)


def _next(html: str) -> str | None:
    match = re.search(r'href="([^"]+)" data-testid="next-page"', html)
    return match[1] if match else None


async def test_forms_carry_a_csrf_token(orchestrator: Any, browse: Browser) -> None:
    """Pages with forms carry the operator's CSRF token (for the action tests)."""
    orch = await orchestrator()
    http = await browse(orch)
    assert csrf((await http.get("/saga/runs", headers=ALICE)).text)


async def test_overview_shows_work_nobody_runs_and_parked_runs(
    orchestrator: Any, open_client: Any, browse: Browser, db: asyncpg.Connection
) -> None:
    """Runs of a definition no worker has, due more than a minute ago, show under "work
    nobody runs" with their saga, version and fingerprint; runs waiting for a signal
    are counted per saga."""
    orphan = small_saga("orphan", ["s1"], version=7)
    client = await open_client(orphan)  # executes nothing
    handle = await client.start(orphan, {})
    await db.execute(
        "UPDATE saga.runs SET due_at = now() - interval '5 minutes' WHERE id = $1", handle.id
    )
    orch = await orchestrator(approval)
    waiting = await orch.start(approval, {})
    await _until_status(orch, waiting.id, "waiting")
    http = await browse(orch)
    html = (await http.get("/saga/", headers=ALICE)).text
    overdue = html.split('data-testid="overdue-table"')[1].split("</table>")[0]
    assert "orphan" in overdue
    assert orphan.fingerprint in overdue
    assert "<td>7</td>" in overdue
    parked = html.split('data-testid="parked-table"')[1].split("</table>")[0]
    assert "approval" in parked
    assert "waiting" in parked


async def _until_status(client: saga.Client, run_id: uuid.UUID, want: str) -> None:
    with anyio.fail_after(10):
        while True:
            if (await client.info(run_id)).status.value == want:
                return
            await anyio.sleep(0.05)


async def test_a_creation_time_filter_with_an_offset_shows_in_utc(
    open_client: Any, browse: Browser
) -> None:
    """README (Dashboard): the runs page filters by creation time, in fields labelled
    UTC. A filter given with an offset (13:30+02:00) shows as 11:30 in them, so that
    submitting the form again keeps the same window."""
    http = await browse(await open_client())
    page = await http.get(
        "/saga/runs",
        params={"after": "2024-05-01T13:30:00+02:00", "before": "2024-05-02T01:00:00-03:00"},
        headers=ALICE,
    )
    assert page.status_code == 200
    after = re.search(r'<input name="after"[^>]*data-testid="filter-after"', page.text)
    before = re.search(r'<input name="before"[^>]*data-testid="filter-before"', page.text)
    assert after is not None
    assert before is not None
    assert 'value="2024-05-01T11:30:00"' in after[0]
    assert 'value="2024-05-02T04:00:00"' in before[0]
