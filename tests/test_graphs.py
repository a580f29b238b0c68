"""Sagas whose steps run in parallel: declared as a graph, each ready step its own leased
item, a join that runs once, and compensation in reverse dependency order."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import saga
from saga.testing import Faults, advance
from tests._sagas import (
    Gate,
    Job,
    Ledger,
    fast,
    permanent,
    small_saga,
    transient,
    until_status,
)
from tests.conftest import Cli, OrchestratorFactory

Ctx = saga.Context[Any]
#: a, then b, c and d at once, then e once all three completed.
FAN = {"b": ["a"], "c": ["a"], "d": ["a"], "e": ["b", "c", "d"]}
FAN_STEPS = ["a", "b", "c", "d", "e"]


def fan(name: str = "fan", **options: Any) -> saga.Saga[Any]:
    return small_saga(name, FAN_STEPS, after=FAN, compensate=True, **options)


def event_index(history: list[saga.HistoryEvent], kind: str, step: str) -> int:
    return next(i for i, e in enumerate(history) if e.kind == kind and e.step == step)


def assert_reverse_dependency_order(
    history: list[saga.HistoryEvent], deps: dict[str, list[str]]
) -> None:
    """For every edge a -> b where both were compensated, b's compensation completed
    before a's started (in the run's history order)."""
    undone = {e.step for e in history if e.kind == "compensation_completed"}
    for b, parents in deps.items():
        for a in parents:
            if a in undone and b in undone:
                assert event_index(history, "compensation_completed", b) < event_index(
                    history, "compensation_started", a
                ), f"{b} must be undone before {a}"


class Customer(BaseModel):
    id: str


# -- declaring the graph ------------------------------------------------------------------


def declare(after: dict[str, list[Any]], steps: list[str] | None = None) -> saga.Saga[Job]:
    s: saga.Saga[Job] = saga.Saga("g", input=Job)
    for name in steps or ["a", "b", "c"]:

        async def fn(ctx: Ctx) -> str:
            return ctx.step

        s.step(name=name, after=after.get(name))(fn)
    return s


@pytest.mark.parametrize(
    ("after", "message"),
    [
        ({"a": ["c"], "b": ["a"], "c": ["b"]}, "cycle: a -> b -> c -> a"),
        ({"b": ["nope"]}, "runs after 'nope', which is not a step of this saga"),
        ({"b": ["b"]}, "cannot run after itself"),
        ({"b": "a"}, "after= of step 'b' takes a list"),
        ({"b": [1]}, "takes steps or step names"),
    ],
    ids=["cycle", "unknown", "itself", "not a list", "not a step"],
)
async def test_broken_graphs_fail_at_definition_time(
    orchestrator: OrchestratorFactory, after: dict[str, list[Any]], message: str
) -> None:
    """Cycles, unknown steps, a step after itself and malformed after= are refused with
    a message naming the problem, at declaration or at registration, before any run."""

    async def declare_and_register() -> None:
        await orchestrator(declare(after))

    with pytest.raises(saga.DefinitionError, match=message):
        await declare_and_register()


def test_a_step_of_another_saga_is_refused() -> None:
    """after= naming another saga's step is refused at declaration, naming both."""
    other = declare({})
    s: saga.Saga[Job] = saga.Saga("mine", input=Job)

    async def fn(ctx: Ctx) -> str:
        return ""

    with pytest.raises(saga.DefinitionError, match="a step of saga 'g'"):
        s.step(name="x", after=[other.get_step("a")])(fn)


async def test_reading_a_result_that_is_not_an_ancestor_fails_at_registration(
    orchestrator: OrchestratorFactory,
) -> None:
    """A step whose code reads the result of a step it does not run after (a sibling
    branch) is refused when the saga is registered, with the fix in the message."""
    s: saga.Saga[Job] = saga.Saga("reads", input=Job)

    @s.step()
    async def a(ctx: Ctx) -> str:
        return "a"

    @s.step(after=[a])
    async def b(ctx: Ctx) -> str:
        return "b"

    @s.step(after=[a])
    async def c(ctx: Ctx) -> str:
        return ctx.result(b)  # b may not have run yet

    with pytest.raises(saga.DefinitionError, match="step 'c' reads the result of step 'b'"):
        await orchestrator(s)


async def test_sleeps_and_waits_in_a_graph_are_refused(orchestrator: OrchestratorFactory) -> None:
    """A graph saga with a sleep is refused at registration (not supported yet), rather
    than run wrong."""
    s = declare({"c": ["a"]}, steps=["a"])
    s.sleep(1.0)

    @s.step()
    async def b(ctx: Ctx) -> str:
        return "b"

    @s.step(after=["a"])
    async def c(ctx: Ctx) -> str:
        return "c"

    with pytest.raises(saga.DefinitionError, match="not supported yet"):
        await orchestrator(s)


def test_a_line_declared_with_after_is_still_a_linear_saga() -> None:
    """Naming the previous step explicitly keeps a saga linear: same execution path and
    the same fingerprint as the declaration-order API (runs in flight keep running)."""
    explicit = declare({"b": ["a"], "c": ["b"]})
    implicit = declare({})
    explicit._freeze()
    implicit._freeze()
    assert explicit.graph is None
    assert implicit.graph is None
    assert explicit.fingerprint == implicit.fingerprint
    graph = declare({"c": ["a"]})
    graph._freeze()
    assert graph.graph is not None
    assert graph.fingerprint != implicit.fingerprint


# -- running branches -----------------------------------------------------------------------


async def test_independent_steps_run_at_the_same_time_and_the_join_runs_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """b, c and d run concurrently (each waits until all three have started: run one
    after the other they would time out), then e runs once, after all three, and the
    run's output is e's result."""
    started: set[str] = set()
    all_in = anyio.Event()
    ledger = Ledger()
    s: saga.Saga[Job] = saga.Saga("meet", input=Job)

    async def meet(ctx: Ctx) -> str:
        ledger.record(ctx)
        if ctx.step in {"b", "c", "d"}:
            started.add(ctx.step)
            if len(started) == 3:
                all_in.set()
            with anyio.fail_after(5):
                await all_in.wait()
        return ctx.step.upper()

    for name in FAN_STEPS:
        s.step(name=name, after=FAN.get(name), retry=saga.Retry(max_attempts=1))(meet)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    assert await run.result(timeout=15) == "E"
    assert ledger.steps().count("e") == 1
    history = await run.history()
    for branch in "bcd":
        assert event_index(history, "step_completed", branch) < event_index(
            history, "step_started", "e"
        )
    ready = next(e for e in history if e.kind == "step_ready" and e.step == "e")
    assert ready.data["after"] == ["b", "c", "d"]


async def test_a_graph_with_several_final_steps_returns_each_result_by_name(
    orchestrator: OrchestratorFactory,
) -> None:
    """Two independent roots and no join: the output maps each final step to its typed
    result."""
    s: saga.Saga[Job] = saga.Saga("provision", input=Job)

    @s.step(after=[])
    async def billing(ctx: Ctx) -> Customer:
        return Customer(id=f"cus-{ctx.input.n}")

    @s.step(after=[])
    async def project(ctx: Ctx) -> int:
        return 7

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=3))
    out = await run.result(timeout=10)
    assert out == {"billing": Customer(id="cus-3"), "project": 7}


async def test_reading_a_sibling_result_at_run_time_is_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """Reading a non-ancestor's result in a way the registration cannot see still fails
    the step with the rule in the error, whether or not the sibling finished."""
    s: saga.Saga[Job] = saga.Saga("sneaky", input=Job)
    steps: dict[str, Any] = {}

    @s.step(after=[])
    async def a(ctx: Ctx) -> str:
        return "a"

    @s.step(after=[], retry=saga.Retry(max_attempts=1))
    async def b(ctx: Ctx) -> str:
        await anyio.sleep(0.2)
        return str(ctx.result(steps["a"]))

    steps["a"] = a
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunCompensatedError, match="does not run after 'a'"):
        await run.result(timeout=10)


async def test_branches_run_on_different_workers(orchestrator: OrchestratorFactory) -> None:
    """With one slot per worker, the ready branches a worker cannot take are claimed by
    another: b, c and d run on more than one worker, and the join still runs once."""
    ledger = Ledger()
    s = fan(ledger=ledger, delay={"b": 0.3, "c": 0.3, "d": 0.3})
    first = await orchestrator(s, concurrency=1)
    await orchestrator(s, concurrency=1)
    await orchestrator(s, concurrency=1)
    run = await first.start(s, Job())
    await run.result(timeout=15)
    history = await run.history()
    workers = {e.worker for e in history if e.kind == "step_started" and e.step in "bcd"}
    assert len(workers) > 1
    assert ledger.steps().count("e") == 1


# -- failures, crashes, dropped connections -------------------------------------------------


async def test_a_failed_branch_stops_new_steps_lets_running_ones_finish_and_undoes_in_order(
    orchestrator: OrchestratorFactory,
) -> None:
    """d fails for good while c still runs: e never starts, c finishes and is
    compensated, and every compensation runs in reverse dependency order (b and c
    before a); the run ends compensated with d's error."""
    ledger = Ledger()
    s = fan(ledger=ledger, delay={"c": 0.3}, fail={"d": permanent("no slot")})
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunCompensatedError, match="no slot"):
        await run.result(timeout=15)
    assert "e" not in ledger.steps()
    assert sorted(ledger.steps("compensation")) == ["a", "b", "c"]
    assert ledger.steps("compensation")[-1] == "a"
    assert_reverse_dependency_order(await run.history(), FAN)


async def test_cancel_lets_running_branches_finish_then_compensates_in_order(
    orchestrator: OrchestratorFactory,
) -> None:
    """cancel() while b, c and d run: nothing new starts (no e), each running branch
    finishes its attempt and is compensated, a last; the run ends cancelled."""
    gate, ledger = Gate("c"), Ledger()
    s = fan(ledger=ledger, gate=gate)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        gate.release.set()
        with pytest.raises(saga.RunCancelledError):
            await run.result()
    assert "e" not in ledger.steps()
    assert ledger.steps("compensation")[-1] == "a"
    assert sorted(ledger.steps("compensation")) == ["a", "b", "c", "d"]
    assert_reverse_dependency_order(await run.history(), FAN)


@pytest.mark.parametrize("fault", ["crash", "dropped connection"])
async def test_the_join_starts_exactly_once_when_the_last_branch_fails_at_commit(
    orchestrator: OrchestratorFactory, fault: str
) -> None:
    """The last branch to finish (c) crashes after its side effect, or its connection
    drops as its completion commits: only c is affected (b and d ran once), and the
    join e starts exactly once, on whichever worker ends c."""
    ledger, faults = Ledger(), Faults()
    if fault == "crash":
        faults.crash_after("c")
    else:
        faults.drop_connection_at_commit("c", committed=True)
    s = fan(ledger=ledger, delay={"c": 0.2})
    faults.attach(await orchestrator(s, lease_seconds=0.5))
    orch = await orchestrator(s, lease_seconds=0.5)  # two workers, either may end c
    faults.attach(orch)
    run = await orch.start(s, Job())
    await run.result(timeout=20)
    assert faults.fired["crash_after" if fault == "crash" else "drop_connection_at_commit"] == 1
    calls = ledger.steps()
    assert calls.count("e") == 1
    assert (calls.count("b"), calls.count("d")) == (1, 1)
    history = await run.history()
    assert [e.kind for e in history].count("step_ready") == 5
    assert sum(1 for e in history if e.kind == "step_started" and e.step == "e") == 1


async def test_an_expired_branch_lease_reruns_only_that_branch(
    orchestrator: OrchestratorFactory,
) -> None:
    """b's lease expires while it runs: b runs again under a new token (its first
    attempt's write is refused), c and d run once, and the join once."""
    ledger, faults = Ledger(), Faults()
    faults.expire_lease("b")
    s = fan(ledger=ledger, delay={"b": 0.3})
    orch = await orchestrator(s, lease_seconds=1)
    faults.attach(orch)
    run = await orch.start(s, Job())
    await run.result(timeout=20)
    assert faults.fired["expire_lease"] == 1
    calls = ledger.steps()
    assert calls.count("b") == 2
    assert (calls.count("c"), calls.count("d"), calls.count("e")) == (1, 1, 1)


async def test_a_branch_retries_on_its_own(orchestrator: OrchestratorFactory) -> None:
    """A transient failure of c retries c alone; the run completes."""
    ledger = Ledger()
    s = fan(ledger=ledger, fail={"c": transient(1)}, retry=fast(3))
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await run.result(timeout=15)
    assert ledger.steps().count("c") == 2
    assert ledger.steps().count("b") == 1


async def test_a_compensation_that_gives_up_fails_the_run_until_an_operator_retries(
    orchestrator: OrchestratorFactory,
) -> None:
    """b's compensation fails for good: a's compensation never starts (it must come
    after b's), the run ends failed; an operator's retry runs b's compensation again,
    then a's, and the run ends compensated."""
    ledger = Ledger()
    calls: list[int] = []

    def first_call(ctx: Ctx) -> bool:
        calls.append(ctx.attempt)
        return len(calls) == 1

    flaky = {"b": permanent("undo failed", when=first_call)}
    s = fan(ledger=ledger, fail={"e": permanent()}, fail_undo=flaky)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=15)
    assert "a" not in ledger.steps("compensation")
    await run.retry()
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=15)
    assert ledger.steps("compensation")[-1] == "a"
    assert_reverse_dependency_order(await run.history(), FAN)
    info = await until_status(run, saga.RunStatus.COMPENSATED)
    assert set(info.completed_steps) == {"a", "b", "c", "d"}


# -- visible --------------------------------------------------------------------------------


async def test_the_timeline_shows_overlapping_branches_and_what_each_step_waited_on(
    orchestrator: OrchestratorFactory, cli: Cli
) -> None:
    """The history of a fan-out shows b, c and d attempts overlapping in time; `saga
    show` lists what each step waited on (a at the start, e after b,c,d), and its JSON
    carries the same."""
    s = fan(delay={"b": 0.2, "c": 0.2, "d": 0.2})
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await run.result(timeout=15)
    attempts = {a.step: a for a in saga.timeline(await run.history()) if not a.compensation}
    b, c = attempts["b"], attempts["c"]
    assert None not in (b.started_at, c.started_at, b.ended_at, c.ended_at)
    assert b.started_at < c.ended_at  # type: ignore[operator]
    assert c.started_at < b.ended_at  # type: ignore[operator]  # they overlap
    assert attempts["e"].after == ("b", "c", "d")
    assert attempts["a"].after == ()
    code, out, _ = await cli("show", str(run.id))
    assert code == 0
    assert "AFTER" in out
    assert any(line.split()[:3] == ["e", "step", "b,c,d"] for line in out.splitlines())
    assert any(line.split()[:3] == ["a", "step", "start"] for line in out.splitlines())
    shown = await cli.json("show", str(run.id))
    assert {a["step"]: a["after"] for a in shown["attempts"]}["e"] == ["b", "c", "d"]


async def test_advance_moves_a_branch_backoff(orchestrator: OrchestratorFactory) -> None:
    """saga.testing.advance moves a graph run's item backoff too: a branch waiting an hour
    before its retry runs at once."""
    ledger = Ledger()
    hour = saga.Retry(max_attempts=2, initial_delay=3600, max_delay=3600, jitter=0)
    s = fan(ledger=ledger, fail={"c": transient(1)}, retry={"c": hour})
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        while not any(e.kind == "step_failed" for e in await run.history()):  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert await advance(orch, run, 3600) is not None
    assert await run.result(timeout=10) == "e"
    assert ledger.steps().count("c") == 2


class Basket(BaseModel):
    items: list[int] = []


basket: saga.Saga[Basket] = saga.Saga("basket", input=Basket)


@basket.step(after=[])
async def items(ctx: saga.Context[Basket]) -> int:
    return len(ctx.input.items)


@basket.step(after=[])
async def total(ctx: saga.Context[Basket]) -> int:
    return sum(ctx.input.items)  # an attribute named like the step `items`: no read of it


async def test_an_attribute_named_like_a_step_is_not_a_read_of_it(
    orchestrator: OrchestratorFactory,
) -> None:
    """The check of which results a step reads looks at the variables its code reads,
    not at attribute names: ``ctx.input.items`` beside a (module-level) step named
    ``items`` that it does not run after is no read of it. The saga registers, and both
    steps run."""
    orch = await orchestrator(basket)
    run = await orch.start(basket, Basket(items=[2, 3]))
    await run.result(timeout=20)
    history = await run.history()
    assert {e.step for e in history if e.kind == "step_completed"} == {"items", "total"}
