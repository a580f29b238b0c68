# ruff: noqa: ASYNC110 - polls of a run's state
"""What the dashboard's pages say is true: a run queued behind its key, the finished runs
chart in any database time zone, the steps running in parallel, the cards of runs
waiting for an operator, a parent's child runs, a rollback's plan; and an action behind
a proxy that terminates TLS. README, Dashboard."""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Gate, Job, small_saga
from tests.web.conftest import ALICE

pytestmark = pytest.mark.timeout(60)


async def test_a_run_queued_behind_its_concurrency_key_says_it_waits_for_it(
    orchestrator: Any, browse: Any
) -> None:
    """README, Dashboard: "*One run*: its state and error, ... what it waits for"; One at a
    time per key: the others are `pending` with `RunInfo.waiting_for_key`.

    A run queued behind another holding its concurrency key "acct-7": its page names the
    key and says it waits for it. Before, it showed only "pending" at its first step,
    like a run no worker takes."""
    gate = Gate("work")
    keyed = small_saga(
        "keyed", ["work"], gate=gate, traffic={"concurrency_key": lambda j: "acct-7"}
    )
    orch = await orchestrator(keyed)
    await orch.start(keyed, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    queued = await orch.start(keyed, Job(n=1))
    try:
        assert (await orch.info(queued.id)).waiting_for_key
        http = await browse(orch)
        page = (await http.get(f"/saga/runs/{queued.id}", headers=ALICE)).text
        assert "pending" in page
        assert "acct-7" in page
        assert 'data-testid="waits-for-key"' in page
    finally:
        gate.release.set()


async def test_the_finished_runs_chart_counts_in_utc_hours_whatever_the_database_time_zone(
    orchestrator: Any, browse: Any, db: Any
) -> None:
    """README, Dashboard: "*Overview*: ... a chart of the runs finished per hour over the
    last 24 hours by outcome" (labelled UTC).

    On a database whose time zone is Asia/Kolkata (+05:30), a run that just completed is
    counted in its UTC hour. Before, the hours were truncated in the session's time zone
    (at :30 UTC there), matched none of the chart's slots: "0 in all", no bar."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'Asia/Kolkata'")
    s = small_saga("billing", 1)
    orch = await orchestrator(s)
    await (await orch.start(s, Job())).result(timeout=10)
    http = await browse(orch)
    page = (await http.get("/saga/", headers=ALICE)).text
    assert "(1 in all" in page
    assert 'class="c-completed"' in page


async def test_a_graph_run_page_names_the_steps_running(orchestrator: Any, browse: Any) -> None:
    """README, Dashboard: "*One run*: its state and error, its timeline ..."; Steps in
    parallel: branches run at once.

    a, then b and c in parallel; b is held running, c completed. The run's summary names
    the step running, b. Before, it said "Step: c", the step that completed last."""
    gate = Gate("b")
    graph = small_saga("graph", ["a", "b", "c"], after={"b": ["a"], "c": ["a"]}, gate=gate)
    orch = await orchestrator(graph)
    run = await orch.start(graph, Job())
    try:
        with anyio.fail_after(10):
            await gate.entered.wait()
            while "c" not in (await orch.info(run.id)).completed_steps:
                await anyio.sleep(0.05)
        http = await browse(orch)
        page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
        step = re.search(r'data-testid="run-step">(.*?)</dd>', page, re.S)
        assert step is not None
        assert re.sub(r"<[^>]+>", "", step[1]).split()[0] == "b"
    finally:
        gate.release.set()


async def test_the_overview_cards_of_runs_waiting_for_an_operator_link_to_them(
    orchestrator: Any, browse: Any
) -> None:
    """README, Dashboard: "*Overview*: runs by state now" and "*Needs attention*: failed
    runs and runs stopped for an operator". The failed and stopped cards count the runs
    waiting for an operator (not resolved): they say so and link to Needs attention,
    which lists the same runs. Before, the failed card said 0 for a resolved failed run
    while linking to a list of failed runs that showed it."""
    from tests._sagas import ONCE, permanent

    bad = small_saga(
        "bad", ["a", "b"], compensate=True, fail={"b": permanent("no")},
        fail_undo={"a": permanent("undo no")}, retry=ONCE, undo_retry=ONCE,
    )  # fmt: skip
    orch = await orchestrator(bad)
    runs = [await orch.start(bad, Job(n=n)) for n in range(2)]
    for run in runs:
        with pytest.raises(saga.SagaError):
            await run.result(timeout=10)
    await orch.resolve(runs[0].id, note="refunded by hand", by="alice")
    http = await browse(orch)
    overview = (await http.get("/saga/", headers=ALICE)).text
    card = re.search(
        r'<a class="card s-failed" href="([^"]+)" data-testid="census-failed"[^>]*>\s*'
        r'<span class="n">(\d+)</span><span class="l">([^<]+)</span>',
        overview,
    )
    assert card is not None
    assert (card[1], card[2], card[3]) == ("/saga/attention", "1", "failed, unresolved")
    attention = (await http.get("/saga/attention", headers=ALICE)).text
    assert attention.count('data-testid="run-row"') == 1
    assert str(runs[1].id) in attention


async def test_a_same_origin_action_behind_a_tls_proxy_is_accepted(
    orchestrator: Any, browse: Any
) -> None:
    """README, Dashboard: operators with `can_act` act; "cross-site requests (`Origin` /
    `Sec-Fetch-Site`) are 403".

    Behind a proxy that terminates TLS (the app sees http://, the browser is on
    https://), alice's Cancel carries `Sec-Fetch-Site: same-origin` and `Origin:
    https://<host>`: it is accepted, the browser's own verdict. A cross-site one is
    still refused. Before, the Origin was compared with the scheme the app saw: 403 for
    every action behind such a proxy."""
    from tests.web.conftest import csrf

    gate = Gate("s1")
    s = small_saga("held", ["s1"], gate=gate)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    try:
        with anyio.fail_after(10):
            await gate.entered.wait()
        http = await browse(orch)
        page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
        headers = {**ALICE, "Sec-Fetch-Site": "same-origin", "Origin": "https://testserver"}
        answer = await http.post(
            f"/saga/runs/{run.id}/cancel", data={"csrf": csrf(page)}, headers=headers
        )
        assert answer.status_code == 303, answer.text[-300:]
        page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
        attacker = {**ALICE, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
        refused = await http.post(
            f"/saga/runs/{run.id}/retry", data={"csrf": csrf(page)}, headers=attacker
        )
        assert refused.status_code == 403
    finally:
        gate.release.set()


async def test_a_parent_run_page_lists_and_links_its_child_runs(
    orchestrator: Any, browse: Any
) -> None:
    """README, Dashboard: "*One run*: ... its timeline as a picture (... sleeps, waits and
    child runs visible)".

    A run whose step started two child runs: its page lists both, linked. Before, it
    only drew a gap titled "waiting for child runs", and an operator could not get from
    a parent to the child holding it up."""
    from tests._sagas import Ledger
    from tests.test_children import chunk_saga, import_saga

    ledger = Ledger()
    child = chunk_saga(ledger)
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=2))
    await run.result(timeout=20)
    kids = (await saga.list_runs(orch, saga="chunk")).runs
    assert len(kids) == 2
    http = await browse(orch)
    page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
    assert "waiting for child runs" in page
    for kid in kids:
        assert f'href="/saga/runs/{kid.id}"' in page, f"child run {kid.id} is not linked"
    assert page.count('data-testid="child-run"') == 2


async def test_the_compensation_plan_shows_a_branch_that_completed_during_the_rollback(
    orchestrator: Any, browse: Any
) -> None:
    """README, Dashboard: "*One run*: ... the compensation plan and how far it got"; Steps
    in parallel: branches already running "if they complete ... are compensated too".

    a, then b and c in parallel; b fails for good while c runs; c then completes and is
    compensated, then a. The Compensation section shows c and a, compensated, in that
    order. Before, it showed the plan recorded when the rollback began: a alone."""
    from tests._sagas import ONCE, permanent

    gate = Gate("c")
    graph = small_saga(
        "graph", ["a", "b", "c"], after={"b": ["a"], "c": ["a"]}, gate=gate, compensate=True,
        fail={"b": permanent("no")}, retry=ONCE,
    )  # fmt: skip
    orch = await orchestrator(graph)
    run = await orch.start(graph, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
        while not any(e.kind == "run_compensating" for e in await orch.history(run.id)):
            await anyio.sleep(0.05)
    gate.release.set()
    with pytest.raises(saga.SagaError):
        await run.result(timeout=10)
    undone = [e.step for e in await orch.history(run.id) if e.kind == "compensation_completed"]
    assert undone == ["c", "a"]
    http = await browse(orch)
    page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
    plan = re.findall(r'<li data-testid="plan-step" data-done="(\w+)">(\w+):', page)
    assert plan == [("yes", "c"), ("yes", "a")]
