"""saga.testing used as a user testing their own sagas uses it: what README ("Testing
your sagas") and saga/testing.py's docstrings promise of each fault."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest

import saga
from saga.testing import Faults
from tests._sagas import Gate, Job, Ledger, permanent, small_saga, transient
from tests.conftest import OrchestratorFactory


async def test_a_permanent_injected_compensation_failure_is_recorded_as_injected_fault(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Testing your sagas"): "`fail_compensation(step, times=None,
    permanent=False)`: the compensation raises `saga.testing.InjectedFault`." Failures are
    recorded with the exception's qualified type name: with permanent=True too, the run's
    compensation_error.type is "saga.testing.InjectedFault"."""
    s = small_saga("perm_fault", ["reserve", "charge"], compensate={"reserve"},
                   fail={"charge": permanent("declined")})  # fmt: skip
    faults = Faults()
    faults.fail_compensation("reserve", permanent=True)
    faults.attach(await orchestrator(s))
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunFailedError) as raised:
        await run.result(timeout=10)
    assert faults.fired["fail_compensation"] == 1
    error = raised.value.compensation_error
    assert error is not None
    assert error.step == "reserve"
    assert error.type == "saga.testing.InjectedFault"


@pytest.mark.parametrize("by", ["name", "step"])
async def test_expire_lease_on_a_quick_step_of_a_linear_saga_takes_the_run_over(
    orchestrator: OrchestratorFactory, by: str
) -> None:
    """README ("Testing your sagas"): "`expire_lease(step)`: while the step runs, its lease
    expires as if its worker had stalled (...), and another attempt takes over (on another
    worker, or on the same one if it has a free slot); the first attempt's writes are
    refused by the fencing token." and "`faults.fired` counts what really happened".

    A linear saga whose step returns at once (an in-memory fake service, as users' tests
    have), on one orchestrator with free slots: each time, a second attempt takes over
    (lease_expired in the history), and only its outcome is recorded (the first
    attempt's write comes after the takeover, and is refused)."""
    effects = Ledger()
    s = small_saga("quick_stall", ["reserve", "charge", "notify"], ledger=effects)
    faults = Faults()
    faults.attach(await orchestrator(s, lease_seconds=5))
    seen = []
    for n in range(3):  # one run after the other, each with a fault of its own
        faults.expire_lease("charge" if by == "name" else s.get_step("charge"))
        run = await s.start(Job(n=n))
        assert await run.result(timeout=15) == "notify"
        assert faults.fired["expire_lease"] == n + 1
        charges = [c for c in effects.of("step", run.id) if c.step == "charge"]
        history = await run.history()
        assert {c.key for c in charges} == {f"{run.id}:step:charge"}
        seen.append(
            (
                [c.attempt for c in charges],
                "lease_expired" in [e.kind for e in history],
                [e.attempt for e in history if e.kind == "step_completed" and e.step == "charge"],
            )
        )
    assert seen == [([1, 2], True, [2])] * 3


async def test_fired_counts_a_dropped_connection_under_the_fault_s_name(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "Call `faults.attach(orchestrator)`; `faults.fired` counts what really
    happened", by the fault's method name (`fired["crash_after"]`): a connection dropped
    at commit is counted as `fired["drop_connection_at_commit"]`, once."""
    s = small_saga("drop_commit", ["reserve", "charge"])
    faults = Faults()
    faults.drop_connection_at_commit("charge", committed=True)
    faults.attach(await orchestrator(s))
    run = await s.start(Job(n=1))
    assert await run.result(timeout=15) == "charge"
    assert sum(faults.fired.values()) == 1
    assert faults.fired["drop_connection_at_commit"] == 1, dict(faults.fired)


@pytest.mark.parametrize(
    "declare",
    [
        pytest.param(lambda f: f.crash_after("charge", compensation="yes"), id="compensation"),
        pytest.param(
            lambda f: f.drop_connection_at_commit("charge", committed="no"), id="committed"
        ),
        pytest.param(lambda f: f.fail_compensation("charge", permanent="no"), id="permanent"),
    ],
)
async def test_a_fault_flag_that_is_not_a_bool_is_refused(declare: Any) -> None:
    """DESIGN: "Bad input gets a clear error"; README: "Settings that cannot work are
    refused when given, naming the setting". A fault's flags must be bools: a rule with
    `compensation="yes"` would never fire (the user's test passing without its fault),
    and `committed="no"` or `permanent="no"` would mean yes."""
    with pytest.raises(saga.ConfigurationError, match="must be a bool"):
        declare(Faults())


@pytest.mark.parametrize("graph", [False, True])
async def test_a_crashed_worker_s_lease_is_not_given_back_when_its_orchestrator_closes(
    dsn: str, graph: bool
) -> None:
    """README ("Testing your sagas"): "`crash_after(step)`: the step's side effect
    happens, then its worker dies before the checkpoint (nothing is written; the lease
    must expire; the step runs again with the same `ctx.idempotency_key`)"; testing.py:
    "nothing is recorded and the lease is never released, so the run waits for the lease
    to expire"; README: "A crash mid-step counts as an attempt".

    A user's test of a restart: the worker crashes in `charge`, its orchestrator is
    closed, a new one opens. The close gives back no lease of the dead worker: the lease
    expires, the crash counts as attempt 1, and the step runs again as attempt 2."""
    effects = Ledger()
    s = small_saga(
        f"restart_crash_{int(graph)}",
        ["reserve", "charge"],
        after={"reserve": [], "charge": ["reserve"]} if graph else None,
        ledger=effects,
    )
    faults = Faults()
    faults.crash_after("charge")
    options: dict[str, Any] = {"lease_seconds": 2, "poll_interval": 0.2, "shutdown_timeout": 2}
    async with saga.Orchestrator(dsn, sagas=[s], **options) as first:
        faults.attach(first)
        run = await s.start(Job(n=1))
        with anyio.fail_after(10):
            while not faults.fired["crash_after"]:  # noqa: ASYNC110
                await anyio.sleep(0.02)
    async with saga.Orchestrator(dsn, sagas=[s], **options) as second:
        handle = second.get_run(run.id)
        assert await handle.result(timeout=15) == "charge"
        history = [(e.kind, e.step, e.attempt) for e in await handle.history()]
    charges = [c for c in effects.of("step", run.id) if c.step == "charge"]
    assert {c.key for c in charges} == {f"{run.id}:step:charge"}
    assert ("lease_released", "charge", 1) not in history, history
    assert ("lease_expired", "charge", 1) in history, history
    assert [c.attempt for c in charges] == [1, 2]


@pytest.mark.timeout(60)
async def test_expire_lease_takes_over_on_a_worker_of_one_slot(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Testing your sagas: with `expire_lease(step)` "another attempt takes
    over (on another worker, or on the same one: the stalled attempt's slot goes to
    other work ...); the first attempt's writes are refused". On the only orchestrator,
    of concurrency 1, the step runs twice (the takeover's attempt 2 completes) and the
    run completes. Before, no slot was free for the takeover: the stalled attempt waited
    10 s, then its write was accepted (one call, nothing refused), the fault counted."""
    ledger = Ledger()
    s = small_saga("expire_one_slot", ["a", "b"], ledger=ledger, delay={"a": 0.2})
    faults = Faults()
    faults.expire_lease("a")
    orch = await orchestrator(s, concurrency=1, lease_seconds=2)
    faults.attach(orch)
    run = await orch.start(s, Job())
    assert await run.result(timeout=30) == "b"
    assert faults.fired["expire_lease"] == 1
    assert [c.attempt for c in ledger.of("step") if c.step == "a"] == [1, 2]
    history = await run.history()
    completed = [e.attempt for e in history if e.kind == "step_completed" and e.step == "a"]
    assert completed == [2]


@pytest.mark.timeout(90)
async def test_expire_lease_takes_over_when_other_work_was_pending_on_one_slot(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Testing your sagas: `expire_lease(step)`: "another attempt takes over (on
    another worker, or on the same one: the stalled attempt's slot goes to other work,
    as a step given up does, so a worker of one slot takes over too); the first
    attempt's writes are refused by the fencing token (a step that returns before the
    takeover waits for it, up to 10 s, before its checkpoint)".

    One orchestrator of concurrency 1. Run A is at its first step x; run B (one 12 s
    step) waits for the slot. A's step a is stalled; the freed slot goes to B (due
    first), so no takeover comes within 10 s: the stalled attempt writes nothing, and
    once B is done a claim takes A over (attempt 2 of a completes). Before, the stalled
    attempt's write was accepted after 10 s: a ran once, though the fault had fired."""

    ledger = Ledger()
    gate = Gate("x", times=1)
    a_saga = small_saga("stall_first", ["x", "a"], ledger=ledger, gate=gate, delay={"a": 0.2})
    b_saga = small_saga("slow_other", ["s"], delay={"s": 12.0})
    faults = Faults()
    faults.expire_lease("a")
    orch = await orchestrator(a_saga, b_saga, concurrency=1, lease_seconds=2)
    faults.attach(orch)
    run_a = await orch.start(a_saga, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    run_b = await orch.start(b_saga, Job(n=2))
    await anyio.sleep(0.2)
    gate.release.set()
    assert await run_a.result(timeout=40) == "a"
    assert faults.fired["expire_lease"] == 1
    history = await run_a.history()
    completed = [e.attempt for e in history if e.kind == "step_completed" and e.step == "a"]
    assert [c.attempt for c in ledger.of("step") if c.step == "a"] == [1, 2], completed
    assert completed == [2], completed
    await run_b.result(timeout=30)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("err", ["transient", "permanent"])
async def test_a_stalled_attempt_that_raises_writes_nothing_and_is_taken_over(
    orchestrator: OrchestratorFactory, graph: bool, err: str
) -> None:
    """README ("Testing your sagas"): "`expire_lease(step)`: while the step runs, its
    lease expires as if its worker had stalled (...), and another attempt takes over (on
    another worker, or on the same one: the stalled attempt's slot goes to other work
    ...); the first attempt's writes are refused by the fencing token (...; when every
    slot stays busy with other work that long, it writes nothing, and the run is taken
    over once a slot frees)."

    One orchestrator of concurrency 1; run B (a gated step) waits for the slot while run
    A's step b runs. b's lease is expired (the fault fires); the freed slot goes to B
    (due first), as in the README's case. b raises (retryable or not) instead of
    returning: its stalled attempt writes nothing (no step_failed of attempt 1), and
    the run is taken over once the slot frees (lease_expired). Before, the failure's
    write was accepted: only a returning attempt waited for the takeover."""
    ledger = Ledger()
    gate_x = Gate("x", times=1)
    a_saga = small_saga(
        f"stall_raise_{int(graph)}_{err}",
        ["x", "b"],
        ledger=ledger,
        gate=gate_x,
        compensate={"x"},
        after={"x": [], "b": ["x"]} if graph else None,
        fail={"b": transient(1) if err == "transient" else permanent("declined")},
    )
    gate_s = Gate("s", times=1)
    b_saga = small_saga(f"blocker_{int(graph)}_{err}", ["s"], gate=gate_s)
    faults = Faults()
    faults.expire_lease("b")
    orch = await orchestrator(a_saga, b_saga, concurrency=1, lease_seconds=2)
    faults.attach(orch)
    run_a = await orch.start(a_saga, Job(n=1))
    with anyio.fail_after(10):
        await gate_x.entered.wait()
    run_b = await orch.start(b_saga, Job(n=2))  # pending: the only slot is A's
    await anyio.sleep(0.3)
    gate_x.release.set()
    with anyio.fail_after(10):
        await gate_s.entered.wait()  # the slot b's stalled attempt freed went to B
    assert faults.fired["expire_lease"] == 1
    await anyio.sleep(3.0)  # the stalled attempt of b has long raised
    history = [(e.kind, e.step, e.attempt) for e in await run_a.history()]
    gate_s.release.set()
    await run_b.result(timeout=20)
    with anyio.fail_after(30), contextlib.suppress(saga.RunError):
        await run_a.result(timeout=30)
    ended = saga.RunStatus.COMPLETED if err == "transient" else saga.RunStatus.COMPENSATED
    assert (await run_a.info()).status is ended
    final = [(e.kind, e.step, e.attempt) for e in await run_a.history()]
    assert ("step_failed", "b", 1) not in history, history  # the stalled attempt wrote nothing
    assert ("lease_expired", "b", 1) in final, final  # taken over
