"""The operator API at its edges: skipping a compensation after a resolve freed the key,
what bulk actions count as acted, status filters of odd types and iterators, paging
past a pruned run, and prune's flags."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Gate, Job, Ledger, parked_saga, permanent, small_saga
from tests.conftest import ClientFactory

NO_RETRY = saga.Retry(max_attempts=1)


def _acts(history: list[saga.HistoryEvent], kind: str) -> list[dict[str, Any]]:
    return [dict(e.data or {}) for e in history if e.kind == kind]


# --- skip_compensation on a resolved run whose resolve freed its concurrency key -------


def _keyed_trip(ledger: Ledger, gate: Gate | None = None) -> saga.Saga[Any]:
    """hotel -> flight -> car (fails for good for n == 0); flight's compensation gives
    up for n == 0, hotel's works. All runs share the concurrency key "acct" (limit 1)."""
    return small_saga(
        "keyed_trip", ["hotel", "flight", "car"], compensate={"hotel", "flight"},
        ledger=ledger, gate=gate,
        fail={"car": permanent("no cars", when=lambda c: c.input.n == 0)},
        fail_undo={"flight": permanent("airline down", when=lambda c: c.input.n == 0)},
        undo_retry=NO_RETRY,
        traffic={"concurrency_key": lambda j: "acct", "concurrency_limit": 1},
    )  # fmt: skip


async def test_skip_compensation_after_a_resolve_that_freed_the_key_keeps_the_limit(
    dsn: str, open_client: ClientFactory
) -> None:
    """Promise (README, "One at a time per key"): "at most that many runs with the same
    key ... are active at once, across every worker and process, for their whole life,
    compensation included"; and (Runtime, resolve) "resolving it freed the key for the
    next run, so its retry() and cancel() raise InvalidRunStateError".

    A keyed run failed at a compensation is resolved (its key goes to the next run,
    which is admitted); skip_compensation() on it is accepted anyway: the resolved run
    turns compensating again, without its key, while the admitted run holds it. Two runs
    of the key (limit 1) are then active at once, and with workers both execute."""
    ledger = Ledger()
    gate = Gate("hotel", compensation=True)  # holds the resolved run's remaining undo
    s = _keyed_trip(ledger, gate)
    with anyio.fail_after(60):
        async with saga.Orchestrator(dsn, sagas=[s], poll_interval=0.2) as orch:
            first = await orch.start(s, Job(n=0))
            with pytest.raises(saga.RunFailedError, match="airline down"):
                await first.result(timeout=15)
        client = await open_client(s)  # executes nothing
        second = client.get_run((await client.start(s, Job(n=1))).id)
        assert (await second.info()).waiting_for_key
        first = client.get_run(first.id)
        await first.resolve(note="refunded by hand", by="ana")
        admitted = await second.info()
        assert not admitted.waiting_for_key  # the key went to the next run
        refused = None
        try:
            await first.skip_compensation(note="flight cancelled by phone", by="ana")
        except saga.InvalidRunStateError as e:  # what retry() and cancel() do
            refused = e
        holders = [
            info
            for info in (await first.info(), await second.info())
            if not info.status.is_terminal and not info.waiting_for_key
        ]
        overlap = ""
        if refused is None:
            # With a worker: the resolved run's hotel undo is held in the gate while the
            # admitted run executes its steps, both under the key at once.
            async with saga.Orchestrator(dsn, sagas=[s], poll_interval=0.2) as orch:
                await gate.entered.wait()
                await second.result(timeout=15)  # runs to its end meanwhile
                overlap = (
                    f"; with a worker, run {second.id} ran {ledger.steps('step', second.id)}"
                    f" to completion while run {first.id} was compensating (its undo of "
                    "'hotel' held)"
                )
                gate.release.set()
                with pytest.raises(saga.RunCompensatedError):
                    await first.result(timeout=15)
        assert refused is not None, (
            "skip_compensation was accepted on a resolved run whose key was freed: "
            f"{[(str(i.id), i.status.value) for i in holders]} are active at once under "
            f"the key 'acct' (concurrency_limit=1){overlap}"
        )


# --- a bulk cancel reports runs it did not change as acted on ---------------------------


async def test_bulk_cancel_reports_as_acted_only_runs_it_changed(
    open_client: ClientFactory,
) -> None:
    """Promise (README, Runtime): "Every action appends its event to the run's history
    (`cancel_requested`, ...) with data["by"] (who) and data["note"] (why) when given";
    saga/_bulk.py: "Each run is then acted on by itself, exactly as the single action
    would (one fenced statement, its own history event with by and note)"; BulkResult:
    "acted (run ids), refused (run id -> the reason its state refused)".

    Two operators cancel the same runs (pending, no worker), one after the other. The
    second cancel_runs reports every run in `acted`, though it changed nothing and
    recorded nothing: no cancel_requested event carries its `by`/`note`. An operator's
    script cannot tell its action from a no-op, and the audit trail misses it."""
    s = parked_saga("held")
    client = await open_client(s)
    runs = [await client.start(s, Job(n=i)) for i in range(3)]
    with anyio.fail_after(30):
        first = await saga.cancel_runs(client, saga="held", limit=10, expect=3, by="ana")
        assert len(first.acted) == 3
        second = await saga.cancel_runs(
            client, saga="held", limit=10, expect=3, by="bob", note="second look"
        )
        recorded_by_bob = [
            run.id
            for run in runs
            if {"by": "bob", "note": "second look"}
            in _acts(await run.history(), "cancel_requested")
        ]
    assert sorted(second.acted) == sorted(recorded_by_bob), (
        f"cancel_runs(by='bob') reported {len(second.acted)} runs acted on, refused "
        f"{len(second.refused)}, but recorded bob's cancel on {len(recorded_by_bob)}: "
        "the runs were already cancelling and nothing changed"
    )


# --- argument checks -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, 1.5, object()], ids=["int", "float", "object"])
async def test_a_status_filter_of_the_wrong_type_is_a_configuration_error(
    open_client: ClientFactory, bad: Any
) -> None:
    """Promise (list_runs docstring): "Raises ConfigurationError for a bad argument"
    (and count_matching / cancel_runs take "the filters of list_runs"); README:
    "Settings that cannot work are refused when given, naming the setting".

    A status that is neither a status, a str nor an iterable of them escapes as a bare
    TypeError ("'int' object is not iterable") from saga._operator._statuses."""
    client = await open_client()
    with anyio.fail_after(20):
        for call in (
            lambda: saga.list_runs(client, status=bad),
            lambda: saga.count_matching(client, status=bad),
            lambda: saga.cancel_runs(client, limit=10, status=bad),
            lambda: saga.prune(client, older_than=timedelta(days=1), status=bad),
        ):
            with pytest.raises(saga.ConfigurationError, match="status"):
                await call()


# --- bulk counts over more than one page --------------------------------------------


async def _many_pending(client: saga.Client, s: saga.Saga[Any], count: int) -> None:
    for i in range(count):
        await client.start(s, Job(n=i))


async def test_count_matching_takes_any_iterable_of_statuses_over_many_pages(
    open_client: ClientFactory,
) -> None:
    """Promise (README): count_matching/cancel_runs/retry_runs take "the filters of
    list_runs", whose `status` is "Iterable[RunStatus | str] | RunStatus | str | None";
    count_matching returns "how many runs the filters of list_runs match".

    With 1,001 pending runs (two pages of saga._bulk._matching) and the statuses given
    as a generator, the first page consumes it and the second page's list_runs sees an
    empty filter: count_matching raises ConfigurationError "status filter is empty"
    instead of returning 1001 (saga/_bulk.py:_matching passes where.status to every
    page)."""
    s = parked_saga("many")
    client = await open_client(s)
    with anyio.fail_after(120):
        await _many_pending(client, s, 1001)
        assert await saga.count_matching(client, status=["pending"]) == 1001
        statuses = (st for st in ["pending"])
        assert await saga.count_matching(client, status=statuses) == 1001


@pytest.mark.parametrize("pruned", ["last_run", "whole_page"])
async def test_count_matching_survives_runs_pruned_between_its_pages(
    open_client: ClientFactory,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    pruned: str,
) -> None:
    """README: `count_matching` counts the runs "the filters of list_runs" match, whose
    keyset pages "stay correct while runs are being added or pruned"; a bulk action
    reports a run deleted meanwhile in `refused`, so a prune running meanwhile is normal.

    1,001 finished runs take two pages. Right after the first page is read, a prune
    deletes the run it ended on, or every run of it (a prune of a day deletes whole
    pages). The count goes on from where the page ended and leaves the pruned runs out
    (1,000 or 1 left), instead of failing with RunNotFoundError (a whole page), which
    left an operator unable to act while a prune ran."""
    s = parked_saga(f"pruned_{pruned}")
    client = await open_client(s)
    import saga._bulk as bulk

    real = bulk.runs_page
    pages = 0

    async def page_then_prune(*args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        page = await real(*args, **kwargs)
        pages += 1
        if pages == 1 and page.next_before is not None:  # a prune deletes them now
            gone = [page.next_before] if pruned == "last_run" else [r.id for r in page.runs]
            await db.execute("DELETE FROM saga.events WHERE run_id = ANY($1)", gone)
            await db.execute("DELETE FROM saga.runs WHERE id = ANY($1)", gone)
        return page

    with anyio.fail_after(120):
        await _many_pending(client, s, 1001)
        # They finished (what a prune deletes): marked so directly, no worker needed.
        await db.execute(
            "UPDATE saga.runs SET status = 'completed', due_at = NULL, finished_at = now()"
        )
        monkeypatch.setattr(bulk, "runs_page", page_then_prune)
        expected = 1000 if pruned == "last_run" else 1
        assert await saga.count_matching(client, saga=f"pruned_{pruned}") == expected
        assert pages == 2


# --- prune's flags ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["false", None, 0], ids=["str", "none", "int"])
async def test_prune_dry_run_refuses_truthy_stand_ins(open_client: ClientFactory, bad: Any) -> None:
    """Promise (README): "Settings that cannot work are refused when given, naming the
    setting"; prune checks `whole_days` ("whole_days must be a bool") and saga's own
    rule (saga/_checks.py:flag) is that "a truthy stand-in ("false", 0, None) must not
    silently turn a setting on or off".

    `dry_run` is not checked: prune(dry_run="false") silently counts only, and
    prune(dry_run=None) or 0 deletes, where whole_days="false" is refused."""
    client = await open_client()
    with anyio.fail_after(20):  # whole_days is checked
        with pytest.raises(saga.ConfigurationError, match="whole_days"):
            await saga.prune(client, older_than=timedelta(days=30), whole_days=bad)
        with pytest.raises(saga.ConfigurationError, match="dry_run"):
            await saga.prune(client, older_than=timedelta(days=30), dry_run=bad)


async def test_cancel_runs_over_its_limit_changes_nothing_even_when_a_prune_ran_between_pages(
    open_client: ClientFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Operator API): more than `limit` matching runs "raise `ConfigurationError`
    and change nothing", and "A run pruned between two of its pages is left out; the
    paging goes on."

    Six runs match; one of the first page is pruned right after that page is read, so
    five match: more than limit=4. cancel_runs refuses and changes nothing. Before, the
    paging stopped at limit + 1 ids (the pruned one counted), then left it out: four,
    within the limit, cancelled while a fifth matching run was left running. (Pages of 2
    stand for pages of 1,000: the same code.)"""
    s = parked_saga("bulk_cap")
    client = await open_client(s)
    import saga._bulk as bulk

    for n in range(6):
        await s.start(Job(n=n))
    real = bulk.runs_page
    pages = 0

    async def page_then_prune(*args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        page = await real(*args, **kwargs)
        pages += 1
        if pages == 1:  # a prune deletes the newest run (of the first page) now
            gone = page.runs[0].id
            await db.execute("DELETE FROM saga.events WHERE run_id = $1", gone)
            await db.execute("DELETE FROM saga.runs WHERE id = $1", gone)
        return page

    monkeypatch.setattr(bulk, "MAX_PAGE_SIZE", 2)
    monkeypatch.setattr(bulk, "runs_page", page_then_prune)
    with anyio.fail_after(30), pytest.raises(saga.ConfigurationError, match="limit=4"):
        await saga.cancel_runs(client, saga="bulk_cap", limit=4)
    assert not await db.fetchval("SELECT count(*) FROM saga.runs WHERE cancel_requested")
