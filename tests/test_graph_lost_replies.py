# ruff: noqa: ASYNC110, PT018

"""Graph runs whose writes committed but whose replies were lost (the connection broke
after the commit): nothing is lost, run twice, or counted twice, and what the write
recorded is logged, traced and counted as if the reply had come. Each test but
`test_lost_replies_of_two_concurrent_compensations` failed before (found by review)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

import saga
from saga.testing import Faults
from tests._sagas import Job
from tests.conftest import OrchestratorFactory
from tests.test_telemetry import Tracing, points, total


class Barrier:
    """Holds each arriving call until ``n`` arrived, then lets them all go at once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.go = anyio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.n:
            self.go.set()
        await self.go.wait()


def fan(name: str, n: int, free: set[int], barrier: Barrier, calls: Counter[str]) -> saga.Saga[Any]:
    """a, then b0..b<n-1> at once (all final); those not in ``free`` finish in the same
    instant (a barrier), so their writes share one transaction (group commit)."""
    s = saga.Saga(name, input=Job)

    @s.step()
    async def a(ctx: saga.Context[Job]) -> str:
        calls["a"] += 1
        return "a"

    for i in range(n):

        async def branch(ctx: saga.Context[Job], i: int = i) -> int:
            calls[ctx.step] += 1
            if i not in free:
                await barrier.wait()
            return i

        s.step(name=f"b{i}", after=[a])(branch)
    return s


class OrderedFaults(Faults):
    """Faults whose ``first`` step's write reaches the group commit before ``then``'s
    (so, with one write in flight, as with peers, ``then`` queues into its batch)."""

    def __init__(self, first: str, then: str) -> None:
        super().__init__()
        self.first, self.then = first, then
        self.first_writing = anyio.Event()

    async def write(self, ctx: Any, write: Any) -> Any:
        if ctx.step == self.first and not ctx.is_compensation:
            self.first_writing.set()
        elif ctx.step == self.then and not ctx.is_compensation:
            await self.first_writing.wait()
        return await super().write(ctx, write)


def one_write_in_flight(orch: saga.Orchestrator) -> None:
    """The write pace of an orchestrator with peers (README "Costs": steps that finish
    at about the same time share a transaction): one batch in flight at a time."""
    from saga._client import store_of

    store_of(orch).pace(orch.concurrency, alone=False)


async def _xmins(orch: saga.Orchestrator, run_id: Any) -> list[tuple[str, Any, int]]:
    from saga._client import store_of

    store = store_of(orch)
    rows = await store.pool.fetch(
        f"SELECT kind, step, xmin::text::bigint AS x FROM {store.schema}.events"
        " WHERE run_id = $1 ORDER BY id",
        run_id,
    )
    return [(r["kind"], r["step"], r["x"]) for r in rows]


@pytest.mark.timeout(60)
async def test_lost_reply_sharing_a_commit_with_the_runs_end_counts_it_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Tracing and metrics"): "A run's end is counted once however it ends: by
    a worker, after a write whose reply was lost"; README ("Steps in parallel"): "Graph
    steps that finish at about the same time ... share a transaction and its commit".

    Final branches b0 and b2 finish together (b1 before them); their writes share one
    transaction, and b2's (its reply received) ends the run. b0's reply is lost after
    the commit. Observed: b0's worker reads back every event of that transaction
    (write_events selects by xmin), so b2's `step_completed` and the run's
    `run_completed` are logged twice and `saga.runs.completed` counts 2 for one run."""
    calls: Counter[str] = Counter()
    s = fan("twins", 3, {1}, Barrier(2), calls)
    reader = InMemoryMetricReader()
    faults = OrderedFaults("b0", "b2")
    faults.drop_connection_at_commit("b0", committed=True)
    with capture_logs() as logs:
        orch = await orchestrator(s, meter_provider=MeterProvider([reader]))
        one_write_in_flight(orch)
        faults.attach(orch)
        run = await s.start(Job())
        assert await run.result(timeout=30) == {"b0": 0, "b1": 1, "b2": 2}
        await anyio.sleep(1.0)  # (a worker counts and logs after its write)
    assert faults.fired["drop_connection_at_commit"] == 1
    events = await _xmins(orch, run.id)
    xb = next(x for k, st, x in events if k == "step_completed" and st == "b0")
    xend = next(x for k, st, x in events if k == "run_completed")
    assert xb == xend, events  # premise: b0's write shares the run end's commit
    ended = [line for line in logs if line["event"] == "run_completed"]
    done = total(points(reader), "saga.runs.completed")
    completed_lines = Counter(
        line.get("step") for line in logs if line["event"] == "step_completed"
    )
    assert {
        "saga.runs.completed": done,
        "run_completed lines": len(ended),
        "step_completed lines": dict(completed_lines),
    } == {
        "saga.runs.completed": 1,
        "run_completed lines": 1,
        "step_completed lines": {"a": 1, "b0": 1, "b1": 1, "b2": 1},
    }


class DropWhen(Faults):
    """Loses the reply of ``step``'s next forward write once ``armed`` is set (the
    write commits, then the connection breaks), once."""

    def __init__(self, step: str) -> None:
        super().__init__()
        self.step = step
        self.armed = False

    async def write(self, ctx: Any, write: Any) -> Any:
        if ctx.step == self.step and not ctx.is_compensation and self.armed:
            self.armed = False
            self.fired["lost_reply"] += 1
            await write()
            raise saga.DatabaseError("injected: connection lost at commit") from (
                ConnectionResetError()
            )
        return await super().write(ctx, write)


async def _history(orch: saga.Orchestrator, run_id: Any) -> list[tuple[str, Any]]:
    return [(k, st) for k, st, _ in await _xmins(orch, run_id)]


@pytest.mark.timeout(60)
async def test_lost_reply_of_a_dropped_children_step_that_ends_the_run(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Tracing and metrics"): "A run's end is counted once however it ends: by
    a worker, after a write whose reply was lost"; `saga.writes.refused` counts "writes
    refused because the writer's lease token was stale"; README ("Child sagas"):
    "dropping it in a rollback, cancels its running ... children ... it completes when
    they all ended".

    A children step `loads` is dropped in a rollback (another branch failed for good);
    once its child ended, the write that drops it also ends the run (`compensated`).
    Its reply is lost after the commit."""
    child_go, child_in = anyio.Event(), anyio.Event()
    boom_go = anyio.Event()
    faults = DropWhen("loads")

    c = saga.Saga("kid", input=Job)

    @c.step()
    async def work(ctx: saga.Context[Job]) -> int:
        child_in.set()
        await child_go.wait()
        return 1

    @work.compensate
    async def unwork(ctx: saga.Context[Job], value: int) -> None:
        faults.armed = True  # the parent's next write of loads is the drop

    p = saga.Saga("parent", input=Job)
    p.children("loads", c, lambda ctx: [Job()], after=[])

    @p.step(after=[], retry=saga.Retry(max_attempts=1))
    async def boom(ctx: saga.Context[Job]) -> None:
        await boom_go.wait()
        raise saga.PermanentError("no")

    reader = InMemoryMetricReader()
    with capture_logs() as logs:
        orch = await orchestrator(p, c, meter_provider=MeterProvider([reader]))
        faults.attach(orch)
        run = await p.start(Job())
        with anyio.fail_after(10):
            await child_in.wait()
        boom_go.set()
        with anyio.fail_after(10):
            while [k for k, st in await _history(orch, run.id) if st == "loads"].count(
                "children_waiting"
            ) < 2:
                await anyio.sleep(0.05)
        child_go.set()
        with pytest.raises(saga.RunCompensatedError):
            await run.result(timeout=30)
        await anyio.sleep(1.0)  # (a worker counts and logs after its write)
    assert faults.fired["lost_reply"] == 1
    found = points(reader)
    observed = {
        "saga.runs.compensated": total(found, "saga.runs.compensated"),
        "saga.writes.refused": total(found, "saga.writes.refused"),
        "run_compensated lines": sum(
            1
            for line in logs
            if line["event"] == "run_compensated" and line.get("run_id") == str(run.id)
        ),
        "stale_write_refused lines": sum(
            1 for line in logs if line["event"] == "stale_write_refused"
        ),
    }
    assert observed == {
        "saga.runs.compensated": 1,
        "saga.writes.refused": 0,
        "run_compensated lines": 1,
        "stale_write_refused lines": 0,
    }, await _history(orch, run.id)


def _line(line: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(line.get(f) for f in ("event", "log_level", "step", "attempt", "error_type"))


async def _undo_chain(
    orchestrator: OrchestratorFactory, lose: bool, tag: str
) -> tuple[Counter[Any], Counter[Any], dict[str, Any], list[Any], list[str]]:
    from tests._sagas import Ledger, permanent, small_saga

    ledger = Ledger()
    s = small_saga(
        f"chain{tag}",
        ["a", "b", "c", "d"],
        after={"b": ["a"], "c": ["a"], "d": ["b", "c"]},
        compensate={"a", "b", "c"},
        ledger=ledger,
        fail={"d": permanent("no")},
    )
    faults = Faults()
    if lose:
        faults.drop_connection_at_commit("b", compensation=True)
        faults.drop_connection_at_commit("c", compensation=True)
    tracing, reader = Tracing(), InMemoryMetricReader()
    with capture_logs() as logs:
        orch = await orchestrator(
            s, tracer_provider=tracing.provider, meter_provider=MeterProvider([reader])
        )
        one_write_in_flight(orch)
        faults.attach(orch)
        run = await s.start(Job())
        with pytest.raises(saga.RunCompensatedError):
            await run.result(timeout=30)
        await anyio.sleep(1.0)
    if lose:
        assert faults.fired["drop_connection_at_commit"] == 2
    lines = Counter(
        _line(line)
        for line in logs
        if line.get("run_id") == str(run.id)
        and line["log_level"] != "debug"
        and line["event"] != "ambiguous_commit_resolved"
    )
    spans = Counter(
        (
            sp.name.replace(tag, ""),
            (sp.attributes or {}).get("saga.outcome"),
            (sp.attributes or {}).get("saga.run.status"),
        )
        for sp in tracing.spans()
    )
    found = points(reader)
    metrics = {
        m: sorted(
            (tuple(sorted((k, v) for k, v in a.items() if k != "saga.name")), n)
            for a, n in found.get(m, [])
        )
        for m in (
            "saga.step.attempts",
            "saga.compensation.attempts",
            "saga.runs.compensated",
            "saga.writes.refused",
        )
    }
    undone = [c.step for c in ledger.of("compensation")]
    return lines, spans, metrics, await _history(orch, run.id), undone


@pytest.mark.timeout(90)
async def test_lost_replies_of_two_concurrent_compensations(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Steps in parallel"): "independent compensations run concurrently",
    "for every edge a -> b, b is undone before a"; README ("Tracing and metrics"): a
    lost reply is counted as any. b's and c's compensations (independent) both lose
    their reply; the one written last makes a's compensation ready."""
    seen = await _undo_chain(orchestrator, False, "Q1")
    lost = await _undo_chain(orchestrator, True, "Q2")
    assert sorted(lost[4][:2]) == ["b", "c"] and lost[4][2:] == ["a"], lost[4]
    assert lost[0] == seen[0]
    assert lost[1] == seen[1]
    assert lost[2] == seen[2]


_PG = "/usr/lib/postgresql/15/bin/pg_ctl"
_PGDATA = "/tmp/pg-h42"


async def _pg(*args: str) -> None:
    await anyio.run_process(["runuser", "-u", "postgres", "--", _PG, "-D", _PGDATA, *args])


class RestartAtCommit(Faults):
    """``step``'s write commits, then the database goes down (its reply is lost); the
    test brings it back."""

    def __init__(self, step: str) -> None:
        super().__init__()
        self.step = step
        self.down = anyio.Event()
        self.done = False

    async def write(self, ctx: Any, write: Any) -> Any:
        if ctx.step == self.step and not ctx.is_compensation and not self.done:
            self.done = True
            self.fired["restart"] += 1
            await write()
            await _pg("stop", "-m", "fast", "-w")
            self.down.set()
            raise saga.DatabaseError("injected: connection lost at commit") from (
                ConnectionResetError()
            )
        return await super().write(ctx, write)


@pytest.mark.timeout(60)
async def test_lost_reply_batched_after_a_retry_is_not_traced_as_a_retry(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Tracing and metrics"): `saga.outcome` is `success`, `retry`, ...;
    `saga.step.attempts` counts "attempts by outcome and error type", and a run's
    attempts are observed the same "after a write whose reply was lost".

    b2's attempt 1 fails transiently (a retry) at the same instant b0 completes; their
    writes share one commit, b2's first. b0's reply is lost: its worker reads back the
    whole transaction and takes b2's `retry_in` (the transaction's first event) for its
    own, so b0's successful attempt is traced and counted as a `retry`."""
    barrier = Barrier(2)
    s = saga.Saga("retrymix", input=Job)
    tried: Counter[str] = Counter()

    @s.step()
    async def a(ctx: saga.Context[Job]) -> str:
        return "a"

    @s.step(name="b0", after=[a])
    async def b0(ctx: saga.Context[Job]) -> str:
        tried["b0"] += 1
        await barrier.wait()
        return "b0"

    @s.step(name="b1", after=[a])
    async def b1(ctx: saga.Context[Job]) -> str:
        return "b1"

    @s.step(name="b2", after=[a], retry=saga.Retry(max_attempts=3, initial_delay=0.2))
    async def b2(ctx: saga.Context[Job]) -> str:
        tried["b2"] += 1
        if ctx.attempt == 1:
            await barrier.wait()
            raise ConnectionError("flaky")
        return "b2"

    tracing, reader = Tracing(), InMemoryMetricReader()
    faults = OrderedFaults("b2", "b0")
    faults.drop_connection_at_commit("b0", committed=True)
    orch = await orchestrator(
        s, tracer_provider=tracing.provider, meter_provider=MeterProvider([reader])
    )
    one_write_in_flight(orch)
    faults.attach(orch)
    run = await s.start(Job())
    await run.result(timeout=30)
    await anyio.sleep(1.0)
    assert faults.fired["drop_connection_at_commit"] == 1
    events = await _xmins(orch, run.id)
    x0 = next(x for k, st, x in events if k == "step_completed" and st == "b0")
    x2 = next(x for k, st, x in events if k == "step_failed" and st == "b2")
    assert x0 == x2, events  # premise: one shared commit
    b0_spans = [
        (sp.attributes or {}).get("saga.outcome")
        for sp in tracing.spans()
        if sp.name.startswith("saga.step") and (sp.attributes or {}).get("saga.step") == "b0"
    ]
    b0_counted = sorted(
        (a.get("saga.outcome"), n)
        for a, n in points(reader).get("saga.step.attempts", [])
        if a.get("saga.step") == "b0"
    )
    assert (tried["b0"], b0_spans, b0_counted) == (1, ["success"], [("success", 1)])


@pytest.mark.timeout(60)
async def test_lost_reply_of_a_dropped_children_step_that_makes_a_compensation_ready(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Steps in parallel"): compensations run in reverse dependency order and
    "A run is `compensated` only when every compensation succeeded"; README ("What you
    can rely on"): a dropped connection loses nothing, a worker that lost its lease is
    the only one refused; DESIGN: "A crash, a deploy, a dropped connection ... loses
    nothing".

    a, then (children step) `loads` and `boom`; boom fails for good, loads is dropped in
    the rollback; the write that drops loads (once its child ended) makes a's
    compensation ready and leases it to this worker. Its reply is lost after the commit.
    a's compensation allows one attempt (it never fails when called)."""
    child_go, child_in = anyio.Event(), anyio.Event()
    boom_go = anyio.Event()
    faults = DropWhen("loads")
    undone: list[str] = []

    c = saga.Saga("kid2", input=Job)

    @c.step()
    async def work(ctx: saga.Context[Job]) -> int:
        child_in.set()
        await child_go.wait()
        return 1

    @work.compensate
    async def unwork(ctx: saga.Context[Job], value: int) -> None:
        faults.armed = True  # the parent's next write of loads is the drop

    p = saga.Saga("parent2", input=Job)

    @p.step()
    async def a(ctx: saga.Context[Job]) -> str:
        return "a"

    @a.compensate(retry=saga.Retry(max_attempts=1))
    async def undo_a(ctx: saga.Context[Job], value: str) -> None:
        undone.append("a")

    p.children("loads", c, lambda ctx: [Job()], after=[a])

    @p.step(after=[a], retry=saga.Retry(max_attempts=1))
    async def boom(ctx: saga.Context[Job]) -> None:
        await boom_go.wait()
        raise saga.PermanentError("no")

    with capture_logs() as logs:
        orch = await orchestrator(p, c, lease_seconds=1.0)
        faults.attach(orch)
        run = await p.start(Job())
        with anyio.fail_after(10):
            await child_in.wait()
        boom_go.set()
        with anyio.fail_after(10):
            while [k for k, st in await _history(orch, run.id) if st == "loads"].count(
                "children_waiting"
            ) < 2:
                await anyio.sleep(0.05)
        child_go.set()
        with anyio.fail_after(30):
            while not (await run.info()).status.is_terminal:
                await anyio.sleep(0.1)
    assert faults.fired["lost_reply"] == 1
    info = await run.info()
    hist = await _history(orch, run.id)
    expired = [ln for ln in logs if ln["event"] == "lease_expired"]
    assert (info.status.value, undone, len(expired)) == ("compensated", ["a"], 0), "\n".join(
        map(str, hist)
    )


class WriteAfter(Faults):
    """``step``'s write waits for ``go``, then commits and loses its reply."""

    def __init__(self, step: str, go: anyio.Event) -> None:
        super().__init__()
        self.step, self.go = step, go

    async def write(self, ctx: Any, write: Any) -> Any:
        if ctx.step == self.step and not ctx.is_compensation and not self.fired["lost"]:
            self.fired["lost"] += 1
            await self.go.wait()
            await write()
            raise saga.DatabaseError("injected: connection lost at commit") from (
                ConnectionResetError()
            )
        return await super().write(ctx, write)


@pytest.mark.timeout(60)
async def test_lost_reply_resolved_while_a_claim_of_the_same_run_is_on_its_way(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Steps in parallel"): "Every ready step is its own leased, fenced, retried
    item: a crash, an expired lease or a dropped connection affects that branch only";
    DESIGN: "Steps run at least once"; only a crash, an expired lease, a timeout's
    give-up run a step again.

    a, then b, c and e (concurrency 2: a's write leases b and c here, e waits for a
    slot). c ends; the claim loop claims e; that claim's reply takes a moment (a slow
    network). Meanwhile b's write commits and its reply is lost: resolving it, the
    worker adopts every first-attempt item of the run leased to it (items_leased_to)
    that it does not hold yet, e included, and runs it; then the claim's reply arrives
    and the claim loop runs e again: e's function is called twice on one worker, with
    no crash, expired lease or timeout (and nothing logged about it)."""
    from saga._client import store_of

    e_claimed = anyio.Event()
    calls: Counter[str] = Counter()
    s = saga.Saga("claimrace", input=Job)

    @s.step()
    async def a(ctx: saga.Context[Job]) -> str:
        return "a"

    @s.step(after=[a])
    async def b(ctx: saga.Context[Job]) -> str:
        calls["b"] += 1
        return "b"

    @s.step(after=[a])
    async def c(ctx: saga.Context[Job]) -> str:
        calls["c"] += 1
        return "c"

    @s.step(after=[a])
    async def e(ctx: saga.Context[Job]) -> str:
        calls["e"] += 1
        await anyio.sleep(0.5)
        return "e"

    faults = WriteAfter("b", e_claimed)
    with capture_logs() as logs:
        orch = await orchestrator(s, concurrency=2)
        store = store_of(orch)
        claim_items = store.claim_items

        async def slow_reply(*args: Any, **kwargs: Any) -> Any:
            items = await claim_items(*args, **kwargs)
            if any(i.step_name == "e" for i in items):
                e_claimed.set()
                await anyio.sleep(1.0)  # the claim's reply on its way
            return items

        store.claim_items = slow_reply  # type: ignore[method-assign]
        faults.attach(orch)
        run = await s.start(Job())
        assert await run.result(timeout=30) == {"b": "b", "c": "c", "e": "e"}
        await anyio.sleep(0.5)
    assert e_claimed.is_set() and faults.fired["lost"] == 1
    noise = Counter(
        ln["event"] for ln in logs if ln["event"] in ("lease_lost", "stale_write_refused")
    )
    elog = [(ln["event"], ln.get("attempt")) for ln in logs if ln.get("step") == "e"]
    assert (dict(calls), dict(noise)) == ({"b": 1, "c": 1, "e": 1}, {}), elog


@pytest.mark.timeout(60)
async def test_lost_reply_of_a_step_cancelled_while_waiting_for_its_rate_limit(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Steps in parallel"): on cancel "completed steps are compensated in
    reverse dependency order"; "A run is `compensated` only when every compensation
    succeeded"; DESIGN: "a dropped connection ... loses nothing".

    a, then b1 and b2 sharing a rate limit of one token: one takes it, the other (say
    b2) waits for the next. The run is cancelled: b2, cut short while waiting, is
    dropped (it never started its function); its write
    (which makes a's compensation ready, leased here) commits and its reply is lost.
    a's compensation allows one attempt."""
    undone: list[str] = []
    faults = DropWhen("b2")
    limit = saga.RateLimit("h42slow", per_second=0.02, burst=1)
    s = saga.Saga("ratecancel", input=Job)

    @s.step()
    async def a(ctx: saga.Context[Job]) -> str:
        return "a"

    @a.compensate(retry=saga.Retry(max_attempts=1))
    async def undo_a(ctx: saga.Context[Job], value: str) -> None:
        undone.append("a")

    @s.step(after=[a], rate_limit=limit)
    async def b1(ctx: saga.Context[Job]) -> str:
        return "b1"

    @s.step(after=[a], rate_limit=limit)
    async def b2(ctx: saga.Context[Job]) -> str:
        return "b2"

    with capture_logs() as logs:
        orch = await orchestrator(s, lease_seconds=1.0)
        faults.attach(orch)
        run = await s.start(Job())
        with anyio.fail_after(20):
            while not (
                done := [
                    st
                    for k, st in await _history(orch, run.id)
                    if k == "step_completed" and st in ("b1", "b2")
                ]
            ):
                await anyio.sleep(0.05)
        faults.step = "b2" if done == ["b1"] else "b1"  # the one waiting for a token
        faults.armed = True
        await anyio.sleep(0.3)
        await run.cancel()
        with anyio.fail_after(30):
            while not (await run.info()).status.is_terminal:
                await anyio.sleep(0.1)
    hist = await _history(orch, run.id)
    assert faults.fired["lost_reply"] == 1, hist
    info = await run.info()
    expired = [ln for ln in logs if ln["event"] == "lease_expired"]
    assert (info.status.value, undone, len(expired)) == ("cancelled", ["a"], 0), "\n".join(
        map(str, hist)
    )
