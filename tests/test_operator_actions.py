"""Operators act on runs from Python: every action records who did it and why in the
run's history; a failed run can be marked resolved or have the compensation that gave up
skipped; bulk actions are bounded and confirmed; the runs that need attention are listed
oldest first."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import saga
from tests._sagas import Job, Ledger, permanent, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory

NO_RETRY = saga.Retry(max_attempts=1)


def _failing_rollback(name: str = "trip", after: dict[str, list[str]] | None = None) -> Any:
    """hotel -> flight -> car (fails for good); flight's compensation gives up, hotel's
    works: the run ends failed at flight's compensation."""
    ledger = Ledger()
    s = small_saga(
        name, ["hotel", "flight", "car"], compensate={"hotel", "flight"}, ledger=ledger,
        fail={"car": permanent("no cars")}, fail_undo={"flight": permanent("airline down")},
        undo_retry=NO_RETRY, after=after,
    )  # fmt: skip
    return s, ledger


async def _failed(orch: saga.Orchestrator, s: saga.Saga[Any]) -> saga.RunHandle:
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunFailedError, match="airline down"):
        await run.result(timeout=10)
    return run


def _acts(history: list[saga.HistoryEvent], kind: str) -> list[dict[str, Any]]:
    return [dict(e.data or {}) for e in history if e.kind == kind]


async def test_cancel_and_retry_record_who_and_why(orchestrator: OrchestratorFactory) -> None:
    """cancel(by=, note=) and retry(by=, note=) put the operator and the note into the
    cancel_requested and run_retried events; without them the events carry neither."""
    s, _ = _failing_rollback()
    orch = await orchestrator(s)
    run = await _failed(orch, s)
    await run.retry(by="alice", note="airline is back")
    with pytest.raises(saga.RunFailedError):  # still down: fails again
        await run.result(timeout=10)
    await run.retry()
    history = await run.history()
    assert _acts(history, "run_retried") == [{"by": "alice", "note": "airline is back"}, {}]
    gate = small_saga("slow", 2, delay={"s1": 0.5}, compensate=True)
    orch2 = await orchestrator(gate)
    slow = await orch2.start(gate, Job())
    await slow.cancel(by="bob", note="customer asked")
    with pytest.raises(saga.RunCancelledError):
        await slow.result(timeout=10)
    assert _acts(await slow.history(), "cancel_requested") == [
        {"by": "bob", "note": "customer asked"}
    ]


@pytest.mark.parametrize("graph", [False, True], ids=["linear", "graph"])
async def test_skip_compensation_goes_on_with_the_rollback(
    orchestrator: OrchestratorFactory, graph: bool
) -> None:
    """flight's compensation gave up; the operator skips it with a note: it is recorded
    as compensation_skipped (never completed), hotel's compensation then runs, and the
    run ends compensated with the step's error. Linear and graph runs alike."""
    after = {"flight": ["hotel"], "car": ["flight"]} if graph else None
    s, ledger = _failing_rollback(after=after)
    orch = await orchestrator(s)
    run = await _failed(orch, s)
    assert ledger.steps("compensation") == ["flight"]
    await run.skip_compensation(note="refunded by phone", by="carol")
    with pytest.raises(saga.RunCompensatedError, match="no cars"):
        await run.result(timeout=10)
    assert ledger.steps("compensation") == ["flight", "hotel"]
    history = await run.history()
    skipped = [e for e in history if e.kind == "compensation_skipped"]
    assert [(e.step, e.data) for e in skipped] == [
        ("flight", {"by": "carol", "note": "refunded by phone"})
    ]
    done = [e.step for e in history if e.kind == "compensation_completed"]
    assert done == ["hotel"]
    assert (await run.info()).compensation_error is None


async def test_skipping_the_last_compensation_ends_the_run(
    orchestrator: OrchestratorFactory,
) -> None:
    """When the compensation skipped is the last one left, the run ends at once:
    compensated after a failure, with run_compensated after compensation_skipped."""
    ledger = Ledger()
    s = small_saga(
        "one", ["hotel", "car"], compensate={"hotel"}, ledger=ledger,
        fail={"car": permanent("no cars")}, fail_undo={"hotel": permanent("hotel down")},
        undo_retry=NO_RETRY,
    )  # fmt: skip
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=10)
    await run.skip_compensation(note="cancelled with the hotel by mail")
    info = await run.info()
    assert info.status is saga.RunStatus.COMPENSATED
    kinds = [e.kind for e in await run.history()]
    assert kinds[-2:] == ["compensation_skipped", "run_compensated"]
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=5)


async def test_skip_is_refused_where_it_does_not_apply(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """Skipping needs a failed run stopped at a compensation (a completed run is an
    InvalidRunStateError), a note, and the saga's definition (a client without it says
    so); twice in a row, the second is refused; an unknown run is RunNotFoundError.
    Nothing changes on a refusal."""
    s, _ = _failing_rollback()
    orch = await orchestrator(s)
    run = await _failed(orch, s)
    bare = await open_client()  # no definitions
    with pytest.raises(saga.ConfigurationError, match="definition of saga 'trip'"):
        await bare.get_run(run.id).skip_compensation(note="x")
    with pytest.raises(saga.ConfigurationError, match="note is required"):
        await run.skip_compensation(note="   ")
    assert (await run.info()).status is saga.RunStatus.FAILED
    await run.skip_compensation(note="done by hand")
    with pytest.raises(saga.InvalidRunStateError):
        await run.skip_compensation(note="again")
    with pytest.raises(saga.RunNotFoundError):
        await orch.get_run(uuid.uuid4()).skip_compensation(note="x")
    ok = small_saga("fine", 1)
    orch2 = await orchestrator(ok)
    done = await orch2.start(ok, Job())
    await done.result(timeout=10)
    with pytest.raises(saga.InvalidRunStateError, match="completed"):
        await done.skip_compensation(note="x")


async def test_resolve_takes_a_run_out_of_needs_attention(
    orchestrator: OrchestratorFactory,
) -> None:
    """needs_attention lists failed and stopped runs oldest first; resolve(note=) marks
    one resolved (RunInfo.resolved, a run_resolved event with who and why) and it
    leaves the list; a retry makes it unresolved again. Resolving twice, or a run that
    is neither failed nor stopped, is an InvalidRunStateError."""
    s, _ = _failing_rollback()
    orch = await orchestrator(s)
    runs = [await _failed(orch, s) for _ in range(3)]
    page = await saga.needs_attention(orch)
    assert [r.id for r in page.runs] == [r.id for r in runs]
    await runs[1].resolve(note="customer refunded", by="dave")
    info = await runs[1].info()
    assert info.resolved
    assert info.status is saga.RunStatus.FAILED
    assert _acts(await runs[1].history(), "run_resolved") == [
        {"by": "dave", "note": "customer refunded"}
    ]
    page = await saga.needs_attention(orch)
    assert [r.id for r in page.runs] == [runs[0].id, runs[2].id]
    with pytest.raises(saga.InvalidRunStateError, match="resolved already"):
        await runs[1].resolve(note="again")
    await runs[1].retry(note="try once more")
    assert not (await runs[1].info()).resolved
    with pytest.raises(saga.RunFailedError):
        await runs[1].result(timeout=10)
    assert runs[1].id in [r.id for r in (await saga.needs_attention(orch)).runs]
    ok = small_saga("fine", 1)
    orch2 = await orchestrator(ok)
    done = await orch2.start(ok, Job())
    await done.result(timeout=10)
    with pytest.raises(saga.InvalidRunStateError, match="completed"):
        await done.resolve(note="x")


async def test_needs_attention_pages_oldest_first(orchestrator: OrchestratorFactory) -> None:
    """Pages of 2 over 5 failed runs: each page continues where the last ended, with no
    run twice or missing, and the last page has no cursor."""
    s, _ = _failing_rollback()
    orch = await orchestrator(s)
    runs = [await _failed(orch, s) for _ in range(5)]
    seen: list[uuid.UUID] = []
    after = None
    while True:
        page = await saga.needs_attention(orch, limit=2, after=after)
        seen += [r.id for r in page.runs]
        if page.next_before is None:
            break
        after = page.next_before
    assert seen == [r.id for r in runs]
    with pytest.raises(saga.ConfigurationError, match="limit"):
        await saga.needs_attention(orch, limit=0)


async def test_bulk_actions_are_bounded_and_confirmed(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """cancel_runs/retry_runs refuse, changing nothing, when more runs match than the
    limit or another count than the one confirmed; otherwise each matching run is acted
    on (with who and why in its history) and runs whose state refuses are reported."""
    s, _ = _failing_rollback()
    orch = await orchestrator(s)
    failed = [await _failed(orch, s) for _ in range(3)]
    events = await db.fetchval("SELECT count(*) FROM saga.events")
    assert await saga.count_matching(orch, saga="trip", status="failed") == 3
    with pytest.raises(saga.ConfigurationError, match="more than limit=2"):
        await saga.retry_runs(orch, saga="trip", status="failed", limit=2)
    with pytest.raises(saga.ConfigurationError, match="3 runs match now, not the 4"):
        await saga.retry_runs(orch, saga="trip", status="failed", limit=10, expect=4)
    assert await db.fetchval("SELECT count(*) FROM saga.events") == events
    result = await saga.retry_runs(
        orch, saga="trip", status="failed", limit=10, expect=3, by="erin", note="bulk"
    )
    assert sorted(result.acted) == sorted(r.id for r in failed)
    assert result.refused == {}
    assert result.matched == 3
    for run in failed:
        assert _acts(await run.history(), "run_retried") == [{"by": "erin", "note": "bulk"}]
        with pytest.raises(saga.RunFailedError):
            await run.result(timeout=10)
    # A cancel over every run of the saga: the failed ones have ended, so it is refused.
    result = await saga.cancel_runs(orch, saga="trip", limit=10, by="erin")
    assert result.acted == []
    assert sorted(result.refused) == sorted(r.id for r in failed)
    assert all("already ended failed" in why for why in result.refused.values())


async def test_bulk_cancel_cancels_active_runs(orchestrator: OrchestratorFactory) -> None:
    """Runs held at a slow step are all cancelled by one cancel_runs over their saga and
    end cancelled, each with its own cancel_requested event."""
    s = small_saga("slow", 2, delay={"s1": 0.3}, compensate=True)
    orch = await orchestrator(s, concurrency=4)
    runs = [await orch.start(s, Job()) for _ in range(4)]
    result = await saga.cancel_runs(orch, saga="slow", limit=4, expect=4, note="stop all")
    assert len(result.acted) == 4
    for run in runs:
        with pytest.raises(saga.RunCancelledError):
            await run.result(timeout=10)
        assert _acts(await run.history(), "cancel_requested") == [{"note": "stop all"}]


class Approval(BaseModel):
    ok: bool


async def test_a_signal_sent_by_an_operator_records_who(
    orchestrator: OrchestratorFactory,
) -> None:
    """signal(by=, note=) puts the sender into the signal_received event next to the
    signal's name."""
    s = saga.Saga("approve", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> int:
        return 1

    go = s.wait_for("go", Approval, timeout=60)

    @s.step()
    async def done(ctx: saga.Context[Job]) -> int:
        return 2

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    assert await run.signal(go, Approval(ok=True), by="frank", note="approved by phone")
    await run.result(timeout=10)
    assert _acts(await run.history(), "signal_received") == [
        {"signal": "go", "by": "frank", "note": "approved by phone"}
    ]


_BAD_TEXTS = ["", "ab\x00c", "\ud800", 42, b"bytes", "x" * 5000]


@pytest.mark.parametrize(
    "bad", _BAD_TEXTS, ids=["empty", "nul", "surrogate", "int", "bytes", "long"]
)
@pytest.mark.parametrize("field", ["by", "note"])
async def test_bad_operator_or_note_is_refused_before_anything_is_written(
    open_client: ClientFactory, db: asyncpg.Connection, bad: Any, field: str
) -> None:
    """An empty, NUL-holding, invalid-Unicode, too long or non-str operator name or
    note is a ConfigurationError naming it, for every action (bulk ones included), and
    nothing is written."""
    before = await db.fetchval("SELECT count(*) FROM saga.events")
    client = await open_client()
    handle = client.get_run(uuid.uuid4())
    kwargs: dict[str, Any] = {"by": "ops", "note": "why", field: bad}
    for action in (handle.cancel, handle.retry, handle.resolve, handle.skip_compensation):
        with pytest.raises(saga.ConfigurationError, match=field):
            await action(**kwargs)
    with pytest.raises(saga.ConfigurationError, match=field):
        await handle.signal("go", {}, **kwargs)
    for bulk in (saga.cancel_runs, saga.retry_runs):
        with pytest.raises(saga.ConfigurationError, match=field):
            await bulk(client, limit=10, **kwargs)
    assert await db.fetchval("SELECT count(*) FROM saga.events") == before


@settings(max_examples=200, deadline=None)
@given(by=st.text(max_size=300), note=st.text(max_size=300))
def test_operator_data_accepts_exactly_what_postgres_stores(by: str, note: str) -> None:
    """Any str without NUL or lone surrogates, within the bounds (and, for `by`, not
    blank), is recorded as given (round-trips through JSON); anything else is refused
    naming the field."""
    from saga._acting import operator_data

    def ok(text: str, bound: int) -> bool:
        return bool(text) and len(text) <= bound and "\x00" not in text and _utf8(text)

    expect_ok = ok(by, 200) and bool(by.strip()) and ok(note, 4000)  # by names someone
    if expect_ok:
        data = operator_data(by, note)
        assert data is not None
        assert json.loads(data) == {"by": by, "note": note}
    else:
        with pytest.raises(saga.ConfigurationError):
            operator_data(by, note)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def test_a_refused_retry_or_resolve_never_contradicts_itself(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry (or resolve) refused because the run was elsewhere when it was made (a
    concurrent retry was running it), and read back once the run is failed again, says
    that it changed meanwhile; it used to say "is failed; only failed and stopped runs
    can be retried". The race is staged through the private store: its guarded updates
    refuse, as they do while another retry runs the rollback."""
    s, _ = _failing_rollback("raced")
    orch = await orchestrator(s)
    run = await _failed(orch, s)
    store = orch._store_or_raise()

    async def refused(*args: Any, **kwargs: Any) -> bool:
        return False

    for name in ("retry_run", "rewait_run", "resolve_run"):
        monkeypatch.setattr(store, name, refused)
    with pytest.raises(saga.InvalidRunStateError, match="changed meanwhile") as raised:
        await run.retry()
    assert "only failed and stopped runs" not in str(raised.value)
    with pytest.raises(saga.InvalidRunStateError, match="changed meanwhile"):
        await run.resolve(note="fixed by hand")
