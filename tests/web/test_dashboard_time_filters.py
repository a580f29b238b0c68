"""The runs filter's creation times are times: the page lists, counts and acts on the
runs created on the right side of them, to the microsecond, whatever the app's clock."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import anyio
import pytest

from tests._sagas import Job, small_saga
from tests.web.conftest import ALICE, Browser, csrf

pytestmark = pytest.mark.timeout(60)


def _listed(html: str) -> list[str]:
    return re.findall(r'data-run-id="([0-9a-f-]+)"', html)


async def test_a_run_created_just_after_created_after_is_listed(
    open_client: Any, browse: Browser
) -> None:
    """README (Dashboard): "*Runs*: filter by ... creation time". A run created 1 µs
    after the "created after" time is listed. Before, the time became an age by the
    app's clock and a time again by the database's (later): the bound moved forward and
    the run was left out."""
    s = small_saga("stamped", 1)
    client = await open_client(s)
    run = await client.start(s, Job(n=1))
    created = (await client.info(run.id)).created_at
    http = await browse(client)
    with anyio.fail_after(20):
        page = await http.get(
            "/saga/runs",
            params={"after": (created - timedelta(microseconds=1)).isoformat()},
            headers=ALICE,
        )
        exact = await http.get("/saga/runs", params={"after": created.isoformat()}, headers=ALICE)
        later = await http.get(
            "/saga/runs",
            params={"after": (created + timedelta(microseconds=1)).isoformat()},
            headers=ALICE,
        )
    assert page.status_code == 200
    assert _listed(page.text) == [str(run.id)]
    assert _listed(exact.text) == [str(run.id)]  # at or after
    assert _listed(later.text) == []


async def test_a_bulk_cancel_before_a_time_spares_the_run_created_just_after_it(
    open_client: Any, browse: Browser
) -> None:
    """README (Dashboard): "bulk retry or cancel over the current runs filter". With
    "created before" 1 µs before a run's creation, the page lists no run, the bulk
    cancel counts 0, and the run is not cancelled. Before, the bound moved by the time
    between the app's clock and the database's: the run was listed, counted (1) and
    cancelled."""
    s = small_saga("stamped", 1)
    client = await open_client(s)
    run = await client.start(s, Job(n=1))
    created = (await client.info(run.id)).created_at
    http = await browse(client)
    bound = (created - timedelta(microseconds=1)).isoformat()
    with anyio.fail_after(20):
        listed = await http.get("/saga/runs", params={"before": bound}, headers=ALICE)
        token = csrf((await http.get("/saga/runs", headers=ALICE)).text)
        form = {"csrf": token, "action": "cancel", "before": bound}
        first = await http.post("/saga/runs/bulk", data=form, headers=ALICE)
        count = re.search(r'data-count="(\d+)"', first.text)
        assert count is not None
        if count[1] != "0":
            await http.post(
                "/saga/runs/bulk",
                data={**form, "confirm": "yes", "expect": count[1]},
                headers=ALICE,
            )
    assert _listed(listed.text) == []
    assert count[1] == "0"
    assert not (await client.info(run.id)).cancel_requested


@pytest.mark.parametrize(
    "query", ["after=0900-01-01T00:00:00", "before=2999-01-01T00:00", "after=0001-01-01T00:00Z"]
)
async def test_a_creation_time_far_away_is_a_filter_like_any(
    open_client: Any, browse: Browser, query: str
) -> None:
    """A time a thousand years ago or in the future is a plain bound: the page lists the
    runs on its side (here, all). Before, a time over 1,000 years ago was refused with
    an error naming `newer_than`, a parameter the operator never saw (the time had been
    turned into an age), and one in the future was refused."""
    s = small_saga("stamped", 1)
    client = await open_client(s)
    run = await client.start(s, Job(n=1))
    http = await browse(client)
    with anyio.fail_after(20):
        page = await http.get(f"/saga/runs?{query}", headers=ALICE)
    assert page.status_code == 200, page.text[:500]
    assert _listed(page.text) == [str(run.id)]
