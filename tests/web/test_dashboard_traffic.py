"""The dashboard's traffic page: work due per saga and priority, runs waiting for their
concurrency key, rate limits, and schedules, which operators pause and resume from it."""

from __future__ import annotations

from datetime import timedelta

import saga
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory
from tests.web.conftest import ALICE, RITA, Browser, csrf


async def test_the_traffic_page_shows_what_waits_and_pauses_schedules(
    orchestrator: OrchestratorFactory, browse: Browser
) -> None:
    """Runs due with no worker for them, runs queued behind a key and a schedule show on
    /traffic; alice pauses the schedule (a POST with her CSRF token: the page says so,
    and saga.list_schedules agrees), then resumes it; rita (read only) gets no button
    and a 403; an unknown schedule is a 404."""
    keyed = small_saga("keyed", 1, traffic={"concurrency_key": lambda job: "acct"})
    tick = small_saga("tick", 1)
    nightly = saga.Scheduled("nightly", tick, saga.Schedule.every(timedelta(hours=1)), Job())
    orch = await orchestrator(keyed, tick, schedules=[nightly], concurrency=0)
    for _ in range(3):
        await orch.start(keyed, Job())
    http = await browse(orch)
    page = await http.get("/saga/traffic", headers=ALICE)
    assert page.status_code == 200
    assert 'data-testid="queue-row"' in page.text
    assert 'data-testid="key-row"><td>keyed</td><td>2</td><td>1</td>' in page.text
    assert 'data-schedule="nightly"' in page.text
    token = csrf(page.text)
    paused = await http.post(
        "/saga/schedules/nightly/pause", data={"csrf": token}, headers=ALICE,
        follow_redirects=True,
    )  # fmt: skip
    assert paused.status_code == 200
    assert "Schedule nightly paused by alice." in paused.text
    assert [s.paused for s in await saga.list_schedules(orch)] == [True]
    resumed = await http.post("/saga/schedules/nightly/resume", data={"csrf": token}, headers=ALICE)
    assert resumed.status_code == 303
    assert [s.paused for s in await saga.list_schedules(orch)] == [False]
    unknown = await http.post("/saga/schedules/nope/pause", data={"csrf": token}, headers=ALICE)
    assert unknown.status_code == 404
    reader = await http.get("/saga/traffic", headers=RITA)
    assert 'data-testid="schedule-pause"' not in reader.text
    refused = await http.post("/saga/schedules/nightly/pause", data={"csrf": token}, headers=RITA)
    assert refused.status_code == 403
    assert [s.paused for s in await saga.list_schedules(orch)] == [False]
