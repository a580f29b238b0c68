"""saga.testing's faults combined with graphs, children, waits, concurrency keys and
operator actions: nothing lost, run twice or undone twice, and no wake-up missed."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

import saga
from saga.testing import Faults
from tests._sagas import Gate, Job, Ledger, fast, permanent, small_saga
from tests.conftest import OrchestratorFactory


async def test_graph_compensation_given_up_then_retried_undoes_each_step_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "A compensation that gives up stops new ones; once the running ones finish
    the run is `failed`, and `retry()` resumes the rollback there. Nothing is skipped
    silently." + keys "<run id>:compensation:<step>"."""
    effects = Ledger()
    s = small_saga(
        "g_undo",
        ["a", "b", "c"],
        after={"a": [], "b": [], "c": ["a", "b"]},
        compensate={"a", "b"},
        ledger=effects,
        fail={"c": permanent("no")},
    )
    faults = Faults()
    faults.fail_compensation("a", permanent=True, times=1)
    orch = await orchestrator(s, lease_seconds=1)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=15)
    assert faults.fired["fail_compensation"] == 1
    await run.retry()
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=15)
    comps = effects.of("compensation", run.id)
    assert sorted(c.step for c in comps) == ["a", "b"]
    assert {c.key for c in comps} == {
        f"{run.id}:compensation:a",
        f"{run.id}:compensation:b",
    }


async def test_cancel_while_a_crashed_step_waits_for_its_lease_finishes_and_undoes_it(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Operator actions: "`cancel()`: the step running now finishes its attempt,
    then every completed step is compensated (the one that was running included, if it
    completed ...)"; DESIGN: "A crash, a deploy ... loses nothing".

    s2 runs, then its worker dies before recording it (crash_after), and the run is
    cancelled while s2's lease waits to expire: no new step starts (s3 never runs), but
    s2's attempt, cut short, is run again to its end, and compensated with s1. Before,
    the claim after the expired lease dropped s2 as a step that never ran: s2's effect
    stayed, uncompensated, and the run still ended `cancelled`."""
    effects = Ledger()
    s = small_saga("c_crash", ["s1", "s2", "s3"], compensate=True, ledger=effects)
    faults = Faults()
    faults.crash_after("s2")
    orch = await orchestrator(s, lease_seconds=1.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        while faults.fired["crash_after"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=15)
    assert effects.steps("step", run.id) == ["s1", "s2", "s2"]
    assert effects.steps("compensation", run.id) == ["s2", "s1"]


async def test_crash_before_a_wait_with_the_signal_sent_meanwhile_completes(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "Nothing is lost to crashes"; a signal sent while the step before the
    wait crashed is not lost."""
    from tests._wait_sagas import Decision, _approval

    s = _approval("appr_crash", None)
    faults = Faults()
    faults.crash_after("reserve")
    orch = await orchestrator(s, lease_seconds=1)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        while faults.fired["crash_after"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert await run.signal("decision", Decision(approved=True, by="ana"))
    assert await run.result(timeout=15) == "ana"


async def test_dropped_compensation_commit_in_a_graph_undoes_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "outcomes are recorded exactly once"; drop_connection_at_commit with
    compensation=True in a graph run."""
    effects = Ledger()
    s = small_saga(
        "g_drop",
        ["a", "b", "c"],
        after={"a": [], "b": [], "c": ["a", "b"]},
        compensate={"a", "b"},
        ledger=effects,
        fail={"c": permanent("no")},
    )
    faults = Faults()
    faults.drop_connection_at_commit("a", compensation=True, committed=True)
    faults.drop_connection_at_commit("b", compensation=True, committed=False)
    orch = await orchestrator(s, lease_seconds=1)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=15)
    assert faults.fired["drop_connection_at_commit"] == 2
    hist = [e.kind for e in await run.history()]
    assert hist.count("compensation_completed") == 2
    assert sorted(c.step for c in effects.of("compensation", run.id)) == ["a", "b"]


async def test_concurrency_key_holds_through_a_crash(orchestrator: OrchestratorFactory) -> None:
    """README: concurrency_limit=1: one run at a time per key, a crash included."""
    effects = Ledger()
    running: list[int] = []
    overlap: list[int] = []

    s = saga.Saga("keyed_crash", input=Job, concurrency_key=lambda j: "k", concurrency_limit=1)

    @s.step(retry=fast(3))
    async def work(ctx: saga.Context[Job]) -> int:
        effects.record(ctx)
        if running:
            overlap.append(ctx.input.n)
        running.append(ctx.input.n)
        try:
            await anyio.sleep(0.2)
        finally:
            running.remove(ctx.input.n)
        return ctx.input.n

    faults = Faults()
    faults.crash_after(work, times=1)
    orch = await orchestrator(s, lease_seconds=1)
    faults.attach(orch)
    r1 = await s.start(Job(n=1))
    with anyio.fail_after(10):
        while faults.fired["crash_after"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    r2 = await s.start(Job(n=2))
    assert await r1.result(timeout=15) == 1
    assert await r2.result(timeout=15) == 2
    assert overlap == []


SLOW = saga.Retry(max_attempts=3, initial_delay=3600, max_delay=3600)


@pytest.mark.parametrize("graph", [False, True])
async def test_advance_moves_a_compensation_backoff(
    orchestrator: OrchestratorFactory, graph: bool
) -> None:
    """README: advance "moves a run's timer (a sleep's end, a wait's timeout, a retry's
    backoff; in a graph run, the backoffs of its steps waiting to retry)": a compensation
    failing once (fail_compensation) with a one-hour backoff is retried at once."""
    from saga.testing import advance

    effects = Ledger()
    s = small_saga(
        f"adv_comp_{int(graph)}",
        ["a", "b"],
        after={"a": [], "b": ["a"]} if graph else None,
        compensate={"a"},
        ledger=effects,
        fail={"b": permanent("no")},
        undo_retry=SLOW,
    )
    faults = Faults()
    faults.fail_compensation("a", times=1)
    orch = await orchestrator(s, lease_seconds=2)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        while faults.fired["fail_compensation"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await anyio.sleep(0.5)  # the failure is written
    due = await advance(orch, run, 3700)
    assert due is not None
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)


async def test_skip_compensation_in_a_graph_goes_on_with_the_rest(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: skip_compensation "ends compensated (...) when none is left"; what is left
    is still compensated: a -> b -> c, c fails, b's compensation gives up (injected,
    permanent); skipping it undoes a and the run ends compensated."""
    effects = Ledger()
    s = small_saga(
        "g_skip",
        ["a", "b", "c"],
        after={"a": [], "b": ["a"], "c": ["b"]},
        compensate={"a", "b"},
        ledger=effects,
        fail={"c": permanent("no")},
    )
    faults = Faults()
    faults.fail_compensation("b", permanent=True)
    orch = await orchestrator(s, lease_seconds=1)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=15)
    await run.skip_compensation(note="by hand")
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=15)
    assert effects.steps("compensation", run.id) == ["a"]


async def test_graph_run_is_not_failed_while_a_sibling_compensation_still_runs(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "A compensation that gives up stops new ones; once the running ones finish
    the run is `failed`, and `retry()` resumes the rollback there." So a retry can never
    run a compensation twice: b's compensation (held) runs once, a's (given up) is
    retried."""
    effects = Ledger()
    gate = Gate("b", compensation=True, times=1)
    s = small_saga(
        "g_sib",
        ["a", "b", "c"],
        after={"a": [], "b": [], "c": ["a", "b"]},
        compensate={"a", "b"},
        ledger=effects,
        gate=gate,
        fail={"c": permanent("no")},
    )
    faults = Faults()
    faults.fail_compensation("a", permanent=True, times=1)
    orch = await orchestrator(s, lease_seconds=2, concurrency=4)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
        while faults.fired["fail_compensation"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await anyio.sleep(1.0)
    status = (await run.info()).status
    gate.release.set()
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=10)
    assert status is not saga.RunStatus.FAILED
    await run.retry()
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    assert sorted(effects.steps("compensation", run.id)) == ["a", "b"]


def _chunk(ledger: Ledger, name: str = "chunk") -> saga.Saga[Job]:
    return small_saga(
        name, ["load"], compensate=True, ledger=ledger, result=lambda ctx: ctx.input.n * 10
    )


def _import(child: saga.Saga[Job], ledger: Ledger, name: str = "import") -> saga.Saga[Job]:
    s = small_saga(name, ["split"], compensate=True, ledger=ledger)
    split = s.get_step("split")
    chunks = s.children(
        "chunks", child, lambda ctx: [Job(n=i) for i in range(ctx.input.n)], after=[split]
    )

    @s.step(after=[chunks])
    async def done(ctx: saga.Context[Job]) -> list[int]:
        return list(ctx.result(chunks))

    return s


async def test_cancelling_a_parent_while_a_child_crashed_finishes_and_undoes_its_step(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: cancelling undoes a children step: "cancels its running and stopped
    children and rolls back the completed ones"; a cancelled run starts no new step, and
    "`cancel()`: the step running now finishes its attempt".
    Child n=0's load crashes (crash_after); the parent is cancelled meanwhile. That load,
    cut short, runs again to its end (before, it was dropped, and its effect stayed
    uncompensated), then each child's load is undone exactly once."""
    ledger = Ledger()
    child = _chunk(ledger)
    parent = _import(child, ledger)
    faults = Faults()
    faults.crash_after("load", times=1)
    orch = await orchestrator(parent, child, lease_seconds=1.5)
    faults.attach(orch)
    run = await orch.start(parent, Job(n=2))
    with anyio.fail_after(10):
        while faults.fired["crash_after"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=20)
    loads = [c for c in ledger.of("step") if c.step == "load"]
    undos = [c for c in ledger.of("compensation") if c.step == "load"]
    kids = (await saga.list_runs(orch, saga="chunk")).runs
    statuses = sorted(str(k.status) for k in kids)
    assert len(kids) == 2, kids
    assert all(k.status in (saga.RunStatus.CANCELLED, saga.RunStatus.COMPENSATED) for k in kids), (
        statuses
    )
    ran = Counter(c.run_id for c in loads)
    assert sorted(ran.values()) == [1, 2], ran  # the crashed load ran again, once
    assert Counter(c.run_id for c in undos) == dict.fromkeys(ran, 1)
    assert all(ledger.net[f"{kid}:step:load"] == 0 for kid in ran)


async def test_a_branch_finishing_after_a_compensation_gave_up_is_undone_after_retry(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (graphs): "branches already running finish their attempt, and if they
    complete they are compensated too (...) A compensation that gives up stops new ones;
    once the running ones finish the run is `failed`, and `retry()` resumes the rollback
    there. Nothing is skipped silently." a is held while b fails and c's compensation
    gives up (injected, permanent)."""
    effects = Ledger()
    gate = Gate("a", times=1)
    s = small_saga(
        "g_late",
        ["a", "b", "c"],
        after={"a": [], "b": ["c"], "c": []},
        compensate={"a", "c"},
        ledger=effects,
        gate=gate,
        fail={"b": permanent("no")},
    )
    faults = Faults()
    faults.fail_compensation("c", permanent=True, times=1)
    orch = await orchestrator(s, lease_seconds=2, concurrency=4)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
        while faults.fired["fail_compensation"] == 0:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await anyio.sleep(0.5)
    mid = (await run.info()).status
    gate.release.set()
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=10)
    assert mid is not saga.RunStatus.FAILED
    await run.retry()
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    assert sorted(effects.steps("compensation", run.id)) == ["a", "c"]


@pytest.mark.parametrize("fault", ["expire", "drop_true", "drop_false", "crash_child"])
async def test_children_step_under_faults_starts_each_child_once(
    orchestrator: OrchestratorFactory, fault: str
) -> None:
    """README: children are "Started once" ("a retried step (a crash, an expired lease)
    never starts a second child") and "Woken, not polling" (the fallback poll is 30 s)."""
    ledger = Ledger()
    child = _chunk(ledger)
    parent = _import(child, ledger)
    faults = Faults()
    if fault == "expire":
        faults.expire_lease("chunks")
    elif fault == "drop_true":
        faults.drop_connection_at_commit("chunks", committed=True)
    elif fault == "drop_false":
        faults.drop_connection_at_commit("chunks", committed=False)
    else:
        faults.crash_after("load", times=1)
    # a crashed child is reclaimed at the poll (1 s, the default); the rest is woken
    poll = 1.0 if fault == "crash_child" else 30.0
    orch = await orchestrator(parent, child, lease_seconds=1, poll_interval=poll)
    faults.attach(orch)
    run = await orch.start(parent, Job(n=3))
    assert await run.result(timeout=20) == [0, 10, 20]
    assert sum(faults.fired.values()) == 1
    kids = (await saga.list_runs(orch, saga="chunk")).runs
    assert len(kids) == 3


@pytest.mark.parametrize("drop", [False, True])
async def test_signal_that_came_first_wakes_the_run_despite_a_lost_commit_reply(
    orchestrator: OrchestratorFactory, drop: bool
) -> None:
    """README (How it works): parking at a wait "checks, under the run's row lock,
    whether the signal came first (then the run is due at once)", and a dropped
    connection at commit loses nothing. The signal is sent while the step before the wait
    runs; the reply of that step's commit is lost (drop_connection_at_commit,
    committed=True). Fallback poll 30 s: only a wake-up moves the run on in time."""
    from tests._wait_sagas import Decision

    entered, release = anyio.Event(), anyio.Event()
    s = saga.Saga(f"sig_first_{int(drop)}", input=Job)

    @s.step(retry=fast(3))
    async def reserve(ctx: saga.Context[Job]) -> int:
        entered.set()
        await release.wait()
        return 1

    decision = s.wait_for("decision", Decision, timeout=None, on_timeout="compensate")

    @s.step(retry=fast(3))
    async def finish(ctx: saga.Context[Job]) -> str:
        return ctx.result(decision).by

    faults = Faults()
    if drop:
        faults.drop_connection_at_commit(reserve, committed=True)
    orch = await orchestrator(s, lease_seconds=2, poll_interval=30.0)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with anyio.fail_after(5):
        await entered.wait()
    assert await run.signal("decision", Decision(approved=True, by="ana"))
    release.set()
    assert await run.result(timeout=8) == "ana"
    assert faults.fired["drop_connection_at_commit"] == int(drop)
