"""Group commit: transitions of runs finishing together share one statement and commit.

The first half drives :class:`saga._group.GroupCommit` with scripted writes (no database)
to cover its interleavings, cancellations and failures as a class; the second half runs
the store's real batch statement on PostgreSQL: fencing per row, a bad row failing alone,
and an uncertain batch commit resolved per run from the history.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any
from uuid import UUID

import anyio
import anyio.lowlevel
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saga
from saga._group import GroupCommit
from saga._held import Lease
from saga._hooks import Hooks
from saga._lease import Leases
from saga._log import Outage, logger
from saga._model import EventKind, RunStatus
from saga._rows import events_json
from saga._store import Store
from saga._store_batch import transition_args
from saga._transition import ClaimedItem, Event, Transition
from saga._write import COMMITTED, Writer
from tests._sagas import Job, small_saga

pytestmark = pytest.mark.timeout(60)


class Script:
    """Writes of keys: ``refuse`` keys come back None; a batch raises ``batch_error``
    (once); a key in ``bad`` fails its own single write. Every write is logged."""

    def __init__(
        self,
        refuse: frozenset[int] = frozenset(),
        bad: frozenset[int] = frozenset(),
        batch_error: Exception | None = None,
    ) -> None:
        self.refuse, self.bad, self.batch_error = refuse, bad, batch_error
        self.singles: list[int] = []
        self.batches: list[list[int]] = []
        self.gate = anyio.Event()
        self.gate.set()

    async def single(self, key: int) -> str | None:
        self.singles.append(key)
        await self.gate.wait()
        await anyio.lowlevel.checkpoint()
        if key in self.bad:
            raise asyncpg.DataError(f"bad row {key}")
        return None if key in self.refuse else f"row {key}"

    async def batch(self, keys: Sequence[int]) -> dict[Hashable, str]:
        self.batches.append(list(keys))
        await anyio.lowlevel.checkpoint()
        if self.batch_error is not None:
            exc, self.batch_error = self.batch_error, None
            raise exc
        if self.bad & set(keys):
            raise asyncpg.DataError("a bad row in the batch")
        return {k: f"row {k}" for k in keys if k not in self.refuse}


def group(script: Script, **options: Any) -> GroupCommit[int, str]:
    return GroupCommit(script.single, script.batch, lambda k: k, **options)


async def held_then(
    write: Callable[[int], Awaitable[None]], script: Script, later: Iterable[int]
) -> None:
    """Write 0 (held at the script's gate, so it stays in flight), then the writes of
    ``later`` while it is held, then let it go; return once all are done."""
    script.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(write, 0)
        await anyio.sleep(0.01)
        for k in later:
            tg.start_soon(write, k)
        await anyio.sleep(0.01)
        script.gate.set()


class InFlight:
    """Counts the writes in flight through its wrappers, and the most at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def wrap(
        self, write: Callable[[Any], Awaitable[Any]], hold: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[Any]]:
        """``write``, counted in flight from its call until it returns, after ``hold``."""

        async def wrapped(arg: Any) -> Any:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await hold(arg)
                return await write(arg)
            finally:
                self.now -= 1

        return wrapped


async def test_a_lone_write_goes_at_once_and_alone() -> None:
    """With nothing in flight a write is one single statement, no batch, no waiting."""
    script = Script()
    g = group(script)
    assert await g.write(7) == "row 7"
    assert script.singles == [7]
    assert script.batches == []
    assert g.batches == 0


async def test_writes_arriving_during_a_write_share_the_next_batch() -> None:
    """While one write is in flight, the writers that arrive queue, and all of them go
    in one batch when it ends; each gets its own row back (or None: refused)."""
    script = Script(refuse=frozenset({3}))
    g = group(script)
    results: dict[int, str | None] = {}

    async def write(k: int) -> None:
        results[k] = await g.write(k)

    await held_then(write, script, range(1, 6))
    assert script.singles == [0]
    assert script.batches == [[1, 2, 3, 4, 5]]
    assert results == {0: "row 0", 1: "row 1", 2: "row 2", 3: None, 4: "row 4", 5: "row 5"}


async def test_with_two_leaders_two_batches_are_in_flight_at_once() -> None:
    """With two leaders and batches of at most two, five writers made ready together go
    as two batches of two in flight at the same time (not one after the other), and the
    fifth once one of them ended; each writer gets its own row. (An executing
    orchestrator writes its steps so: two statements at a time, two backends.)"""
    script = Script()
    flight = InFlight()
    release = anyio.Event()

    async def hold(_keys: Sequence[int]) -> None:
        if len(script.batches) < 2:
            await release.wait()

    g: GroupCommit[int, str] = GroupCommit(
        script.single, flight.wrap(script.batch, hold), lambda k: k, leaders=2, max_batch=2
    )
    results: dict[int, str | None] = {}

    async def write(k: int) -> None:
        results[k] = await g.write(k)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for k in range(1, 6):
                tg.start_soon(write, k)
            while flight.peak < 2:
                await anyio.lowlevel.checkpoint()
            release.set()
    assert sorted(sorted(b) for b in script.batches) == [[1, 3], [2, 4]]
    assert flight.peak == 2
    assert script.singles == [5]
    assert results == {k: f"row {k}" for k in range(1, 6)}
    assert g._leaders == 0


async def test_a_batch_the_server_refused_is_written_run_by_run() -> None:
    """A batch the database answered with an error (nothing committed) is written again
    one write at a time: the bad row fails alone, the others are written."""
    script = Script(bad=frozenset({2}))
    g = group(script)
    results: dict[int, Any] = {}

    async def write(k: int) -> None:
        try:
            results[k] = await g.write(k)
        except asyncpg.DataError as exc:
            results[k] = exc

    await held_then(write, script, (1, 2, 3))
    assert results[1] == "row 1"
    assert results[3] == "row 3"
    assert isinstance(results[2], asyncpg.DataError)
    assert sorted(script.singles) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed"),
        OSError("broken pipe"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
    ],
)
async def test_a_batch_that_may_have_committed_fails_every_writer(error: Exception) -> None:
    """A batch whose connection broke may have committed: nothing is written again
    behind the writers' backs; every writer in it gets the error (and resolves its run
    from the history, see saga._write)."""
    script = Script(batch_error=error)
    g = group(script)
    raised: list[int] = []

    async def write(k: int) -> None:
        try:
            await g.write(k)
        except type(error):
            raised.append(k)

    await held_then(write, script, (1, 2, 3))
    assert sorted(raised) == [1, 2, 3]
    assert script.singles == [0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    leaders=st.integers(1, 3),
    max_batch=st.integers(1, 8),
    cancel=st.sets(st.integers(0, 39), max_size=10),
    refuse=st.frozensets(st.integers(0, 39), max_size=10),
    delays=st.lists(st.sampled_from([0, 0, 1, 2]), min_size=40, max_size=40),
    batch_error=st.sampled_from([None, "uncertain", "refused"]),
    flying=st.booleans(),
    resizes=st.dictionaries(
        st.integers(0, 39), st.tuples(st.integers(1, 3), st.integers(1, 8)), max_size=3
    ),
)
def test_every_writer_gets_its_own_outcome_whatever_the_interleaving(
    n: int,
    leaders: int,
    max_batch: int,
    cancel: set[int],
    refuse: frozenset[int],
    delays: list[int],
    batch_error: str | None,
    flying: bool,
    resizes: dict[int, tuple[int, int]],
) -> None:
    """Property: writers arriving at random moments, some cancelled at random moments,
    some refused by their fence, with a batch failing once or not, and the limits of
    writes in flight and of a batch changed as writers arrive (an orchestrator's peers
    come and go): every writer not cancelled gets exactly its own outcome (or, its
    batch's leader cancelled mid-write, an error that makes it resolve its run from the
    history); no batch exceeds the limit it was led under; nothing stays queued, no lead
    is lost (a later write still goes), and no write is left waiting. With ``flights``
    (an executing orchestrator's leasing writes: see saga._group), a leader cancelled
    mid-write leaves its statement to finish: every writer of its batch gets its own
    outcome, never that error, and the flight is known until it ends."""
    error: Exception | None = {
        None: None,
        "uncertain": asyncpg.ConnectionDoesNotExistError("gone"),
        "refused": asyncpg.DataError("refused"),
    }[batch_error]

    async def main() -> None:
        script = Script(refuse=refuse, batch_error=error)
        flights: set[asyncio.Future[Any]] = set()
        g = group(script, leaders=leaders, max_batch=max_batch, flights=flights if flying else None)
        outcomes: dict[int, Any] = {}

        largest = max([max_batch] + [b for _, b in resizes.values()])

        async def write(k: int) -> None:
            for _ in range(delays[k]):
                await asyncio.sleep(0)
            if k in resizes:
                g.resize(*resizes[k])
            try:
                outcomes[k] = await g.write(k)
            except Exception as exc:
                outcomes[k] = exc

        tasks = [asyncio.ensure_future(write(k)) for k in range(n)]
        for k in sorted(cancel):
            if k < n:
                for _ in range(delays[k]):
                    await asyncio.sleep(0)
                tasks[k].cancel()
        with anyio.fail_after(5):
            await asyncio.gather(*tasks, return_exceptions=True)
            if flights:  # (a flight whose writer alone was cancelled may still be going)
                await asyncio.wait(flights)
        assert not flights
        for k in range(n):
            if tasks[k].cancelled():
                continue
            got = outcomes[k]
            if isinstance(got, ConnectionAbortedError):
                assert not flying, (k, got)
                # Its batch's leader was cancelled mid-write: the outcome is unknown,
                # resolved from the history by the writer (see saga._write).
                assert cancel & set(range(n)), (k, got)
            elif isinstance(got, Exception):
                assert got is error, (k, got)
            else:
                assert got == (None if k in refuse else f"row {k}"), (k, got)
        assert not g._queue
        assert g._leaders == 0
        assert all(len(b) <= largest for b in script.batches)
        with anyio.fail_after(1):
            assert await g.write(99) == "row 99"

    asyncio.run(main())


async def test_fewer_writes_in_flight_take_effect_as_the_writes_in_flight_end() -> None:
    """Two writes in flight, then the limit drops to one: the writers queued meanwhile
    wait while both are in flight and while the second still is after the first ended
    (one in flight: the new limit), then go in one batch, alone in flight."""
    script = Script()
    release = [anyio.Event(), anyio.Event()]
    flight = InFlight()

    async def hold_first_two(k: int) -> None:
        if k < 2:
            await release[k].wait()

    async def go(_keys: Sequence[int]) -> None:
        pass

    single = flight.wrap(script.single, hold_first_two)
    batch = flight.wrap(script.batch, go)
    g: GroupCommit[int, str] = GroupCommit(single, batch, lambda k: k, leaders=2, max_batch=8)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(g.write, 0)
            await anyio.sleep(0.01)
            tg.start_soon(g.write, 1)  # the second write in flight, beside the first
            await anyio.sleep(0.01)
            assert flight.now == 2
            g.resize(1, 8)
            flight.peak = 0  # from now on
            for k in range(2, 6):
                tg.start_soon(g.write, k)
            await anyio.sleep(0.01)
            assert script.batches == []  # no third write while two are in flight
            release[0].set()
            await anyio.sleep(0.01)
            assert script.batches == []  # one still in flight: the new limit
            release[1].set()
    assert script.batches == [[2, 3, 4, 5]]
    assert flight.peak == 1
    assert g._leaders == 0


async def test_more_writes_in_flight_lead_the_queue_at_the_next_hand_over() -> None:
    """One write in flight with writers queued, then the limit grows to two with
    batches of two: when the write ends, two of the queued writers lead a batch each,
    in flight at the same time."""
    script = Script()
    flight = InFlight()
    both = anyio.Event()

    async def hold(_keys: Sequence[int]) -> None:
        if flight.peak == 2:
            both.set()
        with anyio.move_on_after(1):
            await both.wait()

    g: GroupCommit[int, str] = GroupCommit(
        script.single, flight.wrap(script.batch, hold), lambda k: k
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            script.gate = anyio.Event()
            tg.start_soon(g.write, 0)
            await anyio.sleep(0.01)
            for k in range(1, 5):
                tg.start_soon(g.write, k)
            await anyio.sleep(0.01)
            g.resize(2, 2)
            script.gate.set()
    assert flight.peak == 2
    assert sorted(sorted(b) for b in script.batches) == [[1, 3], [2, 4]]
    assert g._leaders == 0


# -- the real statement ------------------------------------------------------------------


async def leased_runs(
    store: Store, orchestrator: Any, n: int, worker: str = "w1"
) -> list[tuple[UUID, int]]:
    """``n`` runs of a 2-step saga, started, then claimed by ``worker``: (id, token)."""
    chain = small_saga("grouped", ["first", "second"])
    orch = await orchestrator(chain, concurrency=0)
    for i in range(n):
        await orch.start(chain, Job(n=i))
    items = await store.claim(worker, n, 30.0, [(chain.name, chain.version, chain.fingerprint)])
    assert len(items) == n
    return [(item.run_id, item.lease_token) for item in items]


def first_step_done() -> Transition:
    """The first step completed; the second leased on to the same worker."""
    return Transition(
        status=RunStatus.RUNNING,
        step="second",
        attempt=1,
        events=(
            Event(EventKind.STEP_COMPLETED, "first", 1),
            Event(EventKind.STEP_STARTED, "second", 1, unless_cancelled=True),
        ),
        completed_step="first",
        result_json='"first"',
        due_in=30.0,
        leased=True,
    )


def slow_first_write(group: GroupCommit[Any, Any], hold: anyio.Event) -> None:
    """Make the group's first lone write wait for ``hold``, so the next writers queue up."""
    single = group._single
    first = True

    async def held(args: Any) -> Any:
        nonlocal first
        if first:
            first = False
            await hold.wait()
        return await single(args)

    group._single = held


def lose_first_answer(group: GroupCommit[Any, Any]) -> anyio.Event:
    """The group's first batch commits, then its answer is lost (the connection breaks
    as the reply comes): the event is set once that happened."""
    batch = group._batch
    lost = anyio.Event()

    async def committed_then_lost(args: Sequence[Any]) -> Any:
        found = await batch(args)
        if not lost.is_set():
            lost.set()
            raise asyncpg.ConnectionDoesNotExistError("connection lost after commit")
        return found

    group._batch = committed_then_lost
    return lost


async def test_a_batch_fences_each_run_by_its_own_token(
    store: Store, orchestrator: Any, db: asyncpg.Connection
) -> None:
    """Runs finishing together are written in one batch; a run whose token is stale is
    refused alone, the others move on, each with its history in order."""
    runs = await leased_runs(store, orchestrator, 12)
    hold = anyio.Event()
    slow_first_write(store._group, hold)
    stale = {runs[3][0], runs[7][0]}
    results: dict[UUID, Any] = {}

    async def write(run_id: UUID, token: int) -> None:
        token = token - 1 if run_id in stale else token
        results[run_id] = await store.transition("w1", run_id, token, first_step_done())

    async with anyio.create_task_group() as tg:
        for run_id, token in runs:
            tg.start_soon(write, run_id, token)
        await anyio.sleep(0.05)
        hold.set()
    assert store._group.batches >= 1
    assert store._group.batched >= 11  # all but at most the first, in one batch
    for run_id, token in runs:
        row = await db.fetchrow(
            "SELECT step_name, lease_token, completed_steps FROM saga.runs WHERE id = $1",
            run_id,
        )
        kinds = await db.fetch("SELECT kind FROM saga.events WHERE run_id = $1 ORDER BY id", run_id)
        if run_id in stale:
            assert results[run_id] is None
            assert row["step_name"] == "first"
            assert row["lease_token"] == token
            continue
        assert results[run_id].lease_token == token + 1 == row["lease_token"]
        assert row["step_name"] == "second"
        assert row["completed_steps"] == ["first"]
        assert [k["kind"] for k in kinds][-2:] == ["step_completed", "step_started"]


async def test_a_bad_row_fails_its_run_alone(store: Store, orchestrator: Any) -> None:
    """A row the database refuses (here: error JSON that does not parse) fails only
    its own write; the rest of its batch is written."""
    runs = await leased_runs(store, orchestrator, 4)
    hold = anyio.Event()
    slow_first_write(store._group, hold)
    done = first_step_done()
    outcomes: dict[UUID, Any] = {}

    async def write(i: int, run_id: UUID, token: int) -> None:
        args = list(transition_args("w1", run_id, token, done, "[]", 30.0, store.done_channel))
        if i == 2:
            args[8] = "{not json"
        try:
            outcomes[run_id] = await store._group.write((tuple(args), None))
        except asyncpg.PostgresError as exc:
            outcomes[run_id] = exc

    async with anyio.create_task_group() as tg:
        for i, (run_id, token) in enumerate(runs):
            tg.start_soon(write, i, run_id, token)
        await anyio.sleep(0.05)
        hold.set()
    assert isinstance(outcomes[runs[2][0]], asyncpg.PostgresError)
    for i, (run_id, _) in enumerate(runs):
        if i != 2:
            assert outcomes[run_id] is not None
            assert not isinstance(outcomes[run_id], Exception)


async def test_an_uncertain_batch_commit_is_resolved_per_run(
    store: Store, orchestrator: Any, db: asyncpg.Connection
) -> None:
    """A batch that committed but whose answer was lost: every writer replays its own
    write (refused by the fence, as it is applied already), reads its run's history,
    finds its outcome there, and goes on holding the next step's lease."""
    runs = await leased_runs(store, orchestrator, 6)
    hold = anyio.Event()
    slow_first_write(store._group, hold)
    lost = lose_first_answer(store._group)
    writer = Writer(store, "w1", Hooks(), Outage("w1"))
    written: dict[UUID, Any] = {}

    async def write(run_id: UUID, token: int) -> None:
        lease = Lease(run_id, token, 30.0)
        written[run_id] = await writer.write(run_id, lease, first_step_done(), None, log())

    async with anyio.create_task_group() as tg:
        for run_id, token in runs:
            tg.start_soon(write, run_id, token)
        await anyio.sleep(0.05)
        hold.set()
    assert lost.is_set()  # the batch's answer was lost once
    for run_id, token in runs:
        assert written[run_id] is not None
        assert written[run_id] is not COMMITTED
        assert written[run_id].lease_token == token + 1
        assert (
            await db.fetchval(
                "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'step_completed'",
                run_id,
            )
            == 1
        )


def log() -> Any:
    return logger.bind(test="group")


# -- claiming with the transition that frees a slot ---------------------------------------


async def _drain(
    orchestrator: Any, chain: saga.Saga[Any], db: asyncpg.Connection, n: int, **options: Any
) -> tuple[int, list[Any]]:
    """Start ``n`` runs with nobody executing them, then drain them with one worker:
    the write transactions (transaction ids assigned, cluster-wide) the drain took, and
    the runs' ends."""
    starter = await orchestrator(chain, concurrency=0)
    for i in range(n):
        await starter.start(chain, Job(n=i))
    next_xid = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    before = await db.fetchval(next_xid)
    await orchestrator(chain, **options)
    # Polled (result() would write a watch per run: a write transaction of its own).
    with anyio.fail_after(20):
        while await db.fetchval("SELECT count(*) FROM saga.runs WHERE finished_at IS NULL"):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    writes = int(await db.fetchval(next_xid) - before)
    ends = await db.fetch("SELECT status, output FROM saga.runs")
    return writes, [(r["status"], r["output"]) for r in ends]


async def test_one_commit_per_step_at_concurrency_one(
    orchestrator: Any, db: asyncpg.Connection
) -> None:
    """A worker of concurrency 1 draining 60 three-step runs commits about once per step:
    each run's final transition claims the next due run in its own statement, so the
    claims cost no commits of their own (one per run without this: 240, not 180)."""
    chain = small_saga("along", 3)
    writes, ends = await _drain(orchestrator, chain, db, 60, concurrency=1)
    assert ends == [("completed", '"s3"')] * 60
    # 180 transitions; the first claim, and a few of the database's own, on top.
    assert writes <= 180 + 12, writes


async def test_claims_along_never_run_more_steps_at_once_than_concurrency(
    orchestrator: Any,
) -> None:
    """Runs claimed with a final transition start while the finishing run's task ends:
    the orchestrator still never runs more steps at once than its concurrency."""
    running = peak = 0

    def enter() -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        return 0.002

    def leave(ctx: saga.Context[Any]) -> str:
        nonlocal running
        running -= 1
        return ctx.step

    chain = small_saga("peak", 2, delay=enter, result=leave)
    starter = await orchestrator(chain, concurrency=0)
    runs = [await starter.start(chain, Job(n=i)) for i in range(80)]
    await orchestrator(chain, concurrency=3)
    for run in runs:
        assert await run.result(timeout=20) == "s2"
    assert 1 <= peak <= 3


async def test_runs_claimed_along_go_on_in_the_tasks_of_the_runs_that_ended(
    orchestrator: Any,
) -> None:
    """A run claimed by the final transition of another goes on in that run's task (no
    task per run): 60 three-step runs drained at concurrency 4 run their steps in a
    handful of tasks, not 60."""
    tasks: set[asyncio.Task[Any]] = set()  # strong references: no id is reused

    def note(ctx: saga.Context[Any]) -> str:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        return ctx.step

    chain = small_saga("handoff", 3, result=note)
    starter = await orchestrator(chain, concurrency=0)
    runs = [await starter.start(chain, Job(n=i)) for i in range(60)]
    await orchestrator(chain, concurrency=4)
    for run in runs:
        assert await run.result(timeout=20) == "s3"
    # One task per run would be 60; a few runs are started by the claim loop when it
    # runs before the task that would have taken them.
    assert 1 <= len(tasks) <= 20, len(tasks)


def _claimed(n: int) -> ClaimedItem:
    return ClaimedItem(
        run_id=UUID(int=n),
        saga_name="x",
        saga_version=1,
        status=RunStatus.RUNNING,
        step_name="s1",
        attempt=1,
        lease_token=1,
        input="{}",
        results={},
        completed_steps=(),
        cancel_requested=False,
        has_error=False,
        trace_context=None,
        age=0.0,
        expired_owner=None,
    )


async def test_runs_claimed_along_that_no_ending_run_took_still_run(store: Store) -> None:
    """A run claimed along that no ending run's task took (its task was gone) is started
    by the claim loop as soon as a run ends, and at shutdown by the drain, which then
    waits for it like any other (it does not sit leased until the drain's timeout).
    (Private: the lease bookkeeping itself.)"""
    started: list[UUID] = []
    second = anyio.Event()

    async def handler(item: ClaimedItem, lease: Lease) -> None:
        started.append(item.run_id)
        second.set()
        await anyio.sleep(0.05)
        leases.finished(item, lease)

    leases = Leases(
        store,
        worker_id="w",
        concurrency=4,
        lease_seconds=30,
        heartbeat_every=10,
        poll_interval=60,  # the claim loop sleeps until something wakes it
        definitions=[("x", 1, "-")],
        outage=Outage("w"),
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(leases.claim_loop, tg, handler)
            leases._claimed_along([_claimed(1), _claimed(2)], 2)
            taken = leases.take_over()  # the one task whose run ended takes one
            assert taken is not None
            assert taken[0].run_id == UUID(int=1)
            leases.finished(*taken)
            await second.wait()
            leases._claimed_along([_claimed(3)], 1)  # then the orchestrator stops
            before = anyio.current_time()
            await leases.drain(5)
            assert started == [UUID(int=2), UUID(int=3)]
            assert not leases.inflight
            assert anyio.current_time() - before < 2
            tg.cancel_scope.cancel()


# -- the events' JSON, written by hand ------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    worker=st.text(),
    events=st.lists(
        st.builds(
            Event,
            kind=st.sampled_from(list(EventKind)),
            step=st.none() | st.text(),
            attempt=st.none() | st.integers(0, 2**31 - 1),
            data=st.none() | st.dictionaries(st.text(), _json_values, max_size=4),
            unless_cancelled=st.booleans(),
        ),
        max_size=4,
    ),
)
def test_events_json_is_what_json_dumps_writes(worker: str, events: list[Event]) -> None:
    """Property: the hand-written JSON of a transition's events (it runs every step)
    parses to exactly what json.dumps of the same events gives, whatever the step
    names, worker ids and data hold (quotes, backslashes, control and non-ASCII
    characters, nesting)."""
    expected = [
        {
            "kind": str(e.kind),
            "step": e.step,
            "attempt": e.attempt,
            "worker": worker,
            "data": e.data,
            "unless_cancelled": e.unless_cancelled,
        }
        for e in events
    ]
    assert json.loads(events_json(worker, events)) == expected


# -- starts ----------------------------------------------------------------------------------


async def test_concurrent_starts_share_statements_and_keep_idempotency(
    orchestrator: Any, db: asyncpg.Connection
) -> None:
    """80 starts at once from one process go in batches; each idempotency key still
    makes exactly one run (the starts that repeat a key, in the same batch or not, get
    that run back, not created), and every run has its run_started event."""
    chain = small_saga("starts", 1)
    orch = await orchestrator(chain, concurrency=0)
    handles: dict[int, Any] = {}

    async def start(i: int) -> None:
        key = None if i % 4 else f"k{i % 12}"  # 20 keyed starts over 3 keys
        handles[i] = await orch.start(chain, Job(n=i % 12 if key else i), key=key)

    async with anyio.create_task_group() as tg:
        for i in range(80):
            tg.start_soon(start, i)
    assert orch._store._starts.batches >= 1
    by_key: dict[str, set[UUID]] = {}
    for i, handle in handles.items():
        if i % 4 == 0:
            by_key.setdefault(f"k{i % 12}", set()).add(handle.id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert sum(h.created for h in handles.values()) == 60 + len(by_key)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 60 + len(by_key)
    assert await db.fetchval(
        "SELECT count(*) FROM saga.events WHERE kind = 'run_started'"
    ) == 60 + len(by_key)
