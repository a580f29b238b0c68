"""A model of the engine (hypothesis), checked on a real PostgreSQL.

Random linear sagas (steps failing transiently or for good, workers crashing after a
step's effect, dropped connections at commit, flaky compensations), run while workers
are closed (gracefully, once or twice) in the middle of a step or of a compensation and
another orchestrator takes over. The outcome each case must have is computed from
README's rules, then compared with what the run did: its final status and error, which
attempts of which steps and compensations ran (their keys, newest first), and its
history, which must record only attempts that ran and end with no attempt "running".
Each test pins, with ``@example``, a case that once broke: an attempt given back a
second time, the last one allowed, whose next claim logged the start of an attempt
that never ran.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from pydantic import BaseModel

import saga
from saga.testing import Faults

_names = itertools.count()


def _note(message: str) -> None:
    """hypothesis' note() in a generated example, print() elsewhere."""
    try:
        note(message)
    except InvalidArgument:
        print(message)


class Job(BaseModel):
    n: int


class Transient(Exception):
    pass


# -- the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Comp:
    max_attempts: int
    seq: tuple[str, ...]  # per attempt: "T" raises, "C" returns then its worker dies, "O"
    drop: bool | None = None  # drop_connection_at_commit(compensation=True, committed=drop)


@dataclass(frozen=True)
class StepPlan:
    max_attempts: int
    seq: tuple[str, ...]  # per attempt: "T", "P" (PermanentError), "C", "O"
    comp: Comp | None
    drop: bool | None = None  # drop_connection_at_commit(committed=drop) on its first write


@dataclass(frozen=True)
class Env:
    kind: str = "none"  # none | close (during a step) | close_undo (during a compensation)
    at: int = 0  # the step whose first call (or whose compensation's) the closes hit
    mode: str = "1"  # how many orchestrators are closed there, one after the other


@dataclass(frozen=True)
class Case:
    steps: tuple[StepPlan, ...]
    env: Env = Env()


@st.composite
def comp_plans(draw: st.DrawFn, crashes: bool) -> Comp:
    max_attempts = draw(st.integers(1, 3))
    alphabet = ["T", "C"] if crashes else ["T"]
    fails = draw(st.lists(st.sampled_from(alphabet), max_size=max_attempts))
    seq = tuple(fails) + (("O",) if len(fails) < max_attempts else ())
    drop = draw(st.one_of(st.none(), st.none(), st.booleans())) if crashes else None
    return Comp(max_attempts, seq, drop)


@st.composite
def step_plans(draw: st.DrawFn, crashes: bool, fail: bool) -> StepPlan:
    max_attempts = draw(st.integers(1, 3))
    alphabet = ["T", "C"] if crashes else ["T"]
    k = draw(st.integers(0, max_attempts - (0 if fail else 1)))
    seq = [draw(st.sampled_from(alphabet)) for _ in range(k)]
    if k < max_attempts:
        seq.append("P" if fail else "O")
    comp = draw(st.one_of(st.none(), comp_plans(crashes)))
    drop = draw(st.one_of(st.none(), st.none(), st.booleans()))
    return StepPlan(max_attempts, tuple(seq), comp, drop)


@st.composite
def linear_cases(draw: st.DrawFn, crashes: bool = True) -> Case:
    count = draw(st.integers(1, 4))
    failing = draw(st.one_of(st.none(), st.integers(0, count - 1)))
    return Case(tuple(draw(step_plans(crashes, i == failing)) for i in range(count)))


def _attempts(seq: tuple[str, ...]) -> tuple[int, str]:
    """(attempts made, how it ends: O | P | X + the last attempt's kind: exhausted)"""
    for i, kind in enumerate(seq):
        if kind in ("O", "P"):
            return i + 1, kind
    return len(seq), "X" + seq[-1]


ERROR_TYPE = {"P": "saga.PermanentError", "XT": f"{__name__}.Transient", "XC": "saga.AttemptLost"}


@dataclass
class Prediction:
    status: str
    completed: list[str]
    compensated: list[str]
    failing_step: str | None = None
    error_type: str | None = None
    failing_comp: str | None = None
    calls: dict[str, list[int]] = field(default_factory=dict)  # step -> attempts called
    undo_calls: dict[str, list[int]] = field(default_factory=dict)


def _given_back(seq: tuple[str, ...], max_attempts: int, closes: str) -> tuple[list[int], str]:
    """The attempts called of a step (or compensation) whose first attempt is given back
    by ``closes`` shutdowns. README, Retries: "A worker shutting down gives its leases back
    without counting the interrupted attempts, once: an attempt given back a second time
    before any outcome ... counts, so the attempt limit ends that too"."""
    if closes == "1":  # not counted: attempt 1 runs again, then the plan
        n, end = _attempts(seq)
        return [1, *range(1, n + 1)], end
    # Given back twice: attempt 1 counts, as lost; the plan goes on from attempt 2.
    n, end = _attempts(("C", *seq)[:max_attempts])
    return [1, *range(1, n + 1)], end


def predict(case: Case) -> Prediction:
    """README: a step is retried up to its max_attempts (a crash counts as an attempt),
    PermanentError fails at once; a step failing for good compensates the completed
    steps that have a compensation, newest first, each retried likewise; the run is
    ``compensated`` when all succeeded, ``failed`` at the first that gives up."""
    names = [f"s{i}" for i in range(len(case.steps))]
    env = case.env
    completed: list[str] = []
    calls: dict[str, list[int]] = {}
    failing, error_type, status = None, None, "completed"
    for i, plan in enumerate(case.steps):
        if env.kind == "close" and env.at == i:
            calls[names[i]], end = _given_back(plan.seq, plan.max_attempts, env.mode)
        else:
            n, end = _attempts(plan.seq)
            calls[names[i]] = list(range(1, n + 1))
        if end == "O":
            completed.append(names[i])
            continue
        failing, error_type, status = names[i], ERROR_TYPE[end], "compensated"
        break
    compensated: list[str] = []
    undo_calls: dict[str, list[int]] = {}
    failing_comp = None
    if status != "completed":
        for name in reversed(completed):
            comp = case.steps[int(name[1:])].comp
            if comp is None:
                continue
            if env.kind == "close_undo" and name == f"s{env.at}":
                undo_calls[name], end = _given_back(comp.seq, comp.max_attempts, env.mode)
            else:
                n, end = _attempts(comp.seq)
                undo_calls[name] = list(range(1, n + 1))
            if end != "O":
                failing_comp, status = name, "failed"
                break
            compensated.append(name)
    return Prediction(
        status, completed, compensated, failing, error_type, failing_comp, calls, undo_calls
    )


# -- the saga built from a case ---------------------------------------------------------


@dataclass
class World:
    calls: list[tuple[str, str, int, str]] = field(default_factory=list)  # kind, step, attempt, key
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    closes_left: int = 0


def build(case: Case, world: World) -> tuple[saga.Saga[Job], Faults]:
    s = saga.Saga(f"model_{next(_names)}", input=Job)
    faults = Faults()
    env = case.env

    async def interrupted() -> None:
        """The first call(s) at the close point: blocked until the shutdown cancels it."""
        world.closes_left -= 1
        world.entered.set()
        await anyio.sleep(3600)

    for index, plan in enumerate(case.steps):
        name = f"s{index}"

        async def forward(ctx: saga.Context[Job], plan: StepPlan = plan, index: int = index) -> str:
            world.calls.append(("step", ctx.step, ctx.attempt, ctx.idempotency_key))
            seq = plan.seq
            if env.kind == "close" and env.at == index:
                if world.closes_left > 0:
                    await interrupted()
                if env.mode == "2":  # attempt 1 is the lost one
                    seq = ("C", *seq)[: plan.max_attempts]
            kind = seq[ctx.attempt - 1] if ctx.attempt <= len(seq) else "?"
            if kind == "T":
                raise Transient(f"{ctx.step} attempt {ctx.attempt}")
            if kind == "P":
                raise saga.PermanentError(f"{ctx.step} fails for good")
            if kind == "?":
                raise AssertionError(f"{ctx.step}: unplanned attempt {ctx.attempt}")
            return f"r:{ctx.idempotency_key}"

        retry = saga.Retry(max_attempts=plan.max_attempts, initial_delay=0.001, max_delay=0.005)
        step = s.step(name=name, retry=retry)(forward)
        if plan.seq.count("C"):
            faults.crash_after(step, times=plan.seq.count("C"))
        if plan.drop is not None:
            faults.drop_connection_at_commit(step, committed=plan.drop)
        if plan.comp is None:
            continue

        async def undo(ctx: saga.Context[Job], result: str, comp: Comp = plan.comp) -> None:
            world.calls.append(("undo", ctx.step, ctx.attempt, ctx.idempotency_key))
            assert result == f"r:{ctx.run_id}:step:{ctx.step}", result
            seq = comp.seq
            if env.kind == "close_undo" and f"s{env.at}" == ctx.step:
                if world.closes_left > 0:
                    await interrupted()
                if env.mode == "2":
                    seq = ("C", *seq)[: comp.max_attempts]
            kind = seq[ctx.attempt - 1] if ctx.attempt <= len(seq) else "?"
            if kind == "T":
                raise Transient(f"undo {ctx.step} attempt {ctx.attempt}")
            if kind == "?":
                raise AssertionError(f"undo {ctx.step}: unplanned attempt {ctx.attempt}")

        undo_retry = saga.Retry(
            max_attempts=plan.comp.max_attempts, initial_delay=0.001, max_delay=0.005
        )
        step.compensate(retry=undo_retry)(undo)
        if plan.comp.drop is not None:
            faults.drop_connection_at_commit(step, committed=plan.comp.drop, compensation=True)
        if plan.comp.seq.count("C"):
            faults.crash_after(step, times=plan.comp.seq.count("C"), compensation=True)
    return s, faults


async def execute(dsn: str, case: Case) -> None:
    expected = predict(case)
    _note(f"prediction: {expected}")
    world = World()
    env = case.env
    if env.kind in ("close", "close_undo"):
        world.closes_left = int(env.mode)
    definition, faults = build(case, world)
    opts: dict[str, Any] = {"poll_interval": 0.05, "lease_seconds": 1, "shutdown_timeout": 0.3}
    async with saga.Client(dsn, sagas=[definition], poll_interval=0.05) as client:
        run = await client.start(definition, Job(n=1))
        orch = saga.Orchestrator(dsn, sagas=[definition], **opts)
        faults.attach(orch)
        await orch.__aenter__()
        try:
            with anyio.fail_after(45):
                for _ in range(world.closes_left):
                    # A worker closes while the step (or compensation) runs; another
                    # orchestrator opens and takes the work over.
                    await world.entered.wait()
                    world.entered.clear()
                    await orch.aclose()
                    orch = saga.Orchestrator(dsn, sagas=[definition], **opts)
                    faults.attach(orch)
                    await orch.__aenter__()
                try:
                    outcome: object = await run.result(timeout=40)
                except saga.RunError as exc:
                    outcome = exc
        finally:
            await orch.aclose()
        info = await run.info()
        history = await run.history()
    _note(f"calls: {world.calls}")
    _note(f"fired: {dict(faults.fired)}")
    _note("history:\n" + "\n".join(e.describe() for e in history))
    _note(f"info: {info}")

    # Final state, and what result() says.
    assert info.status == expected.status
    assert list(info.completed_steps) == expected.completed
    if expected.status == "completed":
        assert outcome == f"r:{run.id}:step:s{len(case.steps) - 1}"
    else:
        assert isinstance(outcome, saga.RunError), outcome
        if expected.status == "failed":
            assert isinstance(outcome, saga.RunFailedError)
            assert outcome.compensation_error is not None
            assert outcome.compensation_error.step == expected.failing_comp
        else:
            assert isinstance(outcome, saga.RunCompensatedError)
            assert outcome.compensation_error is None
        assert outcome.error is not None
        assert outcome.error.type == expected.error_type
        assert outcome.error.step == expected.failing_step

    # Which attempts ran, with which keys; compensations newest first, one at a time.
    forward: dict[str, list[int]] = {}
    undos: dict[str, list[int]] = {}
    for kind, step, attempt, key in world.calls:
        if kind == "step":
            forward.setdefault(step, []).append(attempt)
            assert key == f"{run.id}:step:{step}"
        else:
            undos.setdefault(step, []).append(attempt)
            assert key == f"{run.id}:compensation:{step}"
    assert forward == expected.calls
    assert undos == expected.undo_calls
    assert list(undos) == list(expected.undo_calls)

    # History: every attempt it says started really ran, and the timeline of an ended
    # run shows no attempt still running.
    ran = {(kind, step, attempt) for kind, step, attempt, _ in world.calls}
    for e in history:
        if e.kind in ("step_started", "compensation_started"):
            kind = "step" if e.kind == "step_started" else "undo"
            assert (kind, e.step, e.attempt) in ran, f"{e.describe()}: that attempt never ran"
    running = [a for a in saga.timeline(history) if a.outcome == "running"]
    assert running == [], f"attempts of an ended run shown running: {running}"

    kinds = [e.kind for e in history]
    terminal_kinds = {"run_completed", "run_compensated", "run_failed", "run_cancelled"}
    assert kinds[-1] in terminal_kinds
    assert sum(k in terminal_kinds for k in kinds) == 1
    assert [e.step for e in history if e.kind == "step_completed"] == expected.completed
    assert [e.step for e in history if e.kind == "compensation_completed"] == expected.compensated


SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
    print_blob=True,
)


@st.composite
def close_cases(draw: st.DrawFn) -> Case:
    steps = list(draw(linear_cases(crashes=False)).steps)
    at = draw(st.integers(0, len(steps) - 1))
    for i in range(at):  # the steps before the close point complete
        p = steps[i]
        if _attempts(p.seq)[1] != "O":
            steps[i] = StepPlan(p.max_attempts, ("O",), p.comp, p.drop)
    return Case(tuple(steps), Env("close", at, draw(st.sampled_from(["1", "2"]))))


@st.composite
def close_undo_cases(draw: st.DrawFn) -> Case:
    steps = draw(linear_cases(crashes=False)).steps
    expected = predict(Case(steps))
    assume(expected.status != "completed" and expected.undo_calls)
    at = int(draw(st.sampled_from(list(expected.undo_calls)))[1:])
    return Case(steps, Env("close_undo", at, draw(st.sampled_from(["1", "2"]))))


@pytest.mark.timeout(120)
@SETTINGS
@example(case=Case((StepPlan(1, ("O",), None),), Env("close", 0, "2")))
@given(case=close_cases())
async def test_model_worker_closed_mid_step(dsn: str, case: Case) -> None:
    """README, Retries: "A worker shutting down gives its leases back without counting
    the interrupted attempts, once: an attempt given back a second time before any
    outcome ... counts, so the attempt limit ends that too." README, States: "Every
    transition is appended to the run's history with time ..., step, attempt, worker and
    error"; `timeline(history)`: "each step and compensation attempt from the history".

    Random linear sagas whose worker closes (once or twice) while a step runs, another
    orchestrator taking over, end as the model says, and their history records only
    attempts that ran. Pinned: a step with max_attempts=1 given back twice ends
    compensated with saga.AttemptLost, attempt 1 called twice, and no ``step_started``
    of an attempt 2 (``saga.timeline()`` would show it ``running`` for ever)."""
    await execute(dsn, case)


@pytest.mark.timeout(120)
@SETTINGS
@example(
    case=Case(
        (StepPlan(1, ("O",), Comp(1, ("O",))), StepPlan(1, ("T",), None)),
        Env("close_undo", 0, "2"),
    )
)
@given(case=close_undo_cases())
async def test_model_worker_closed_mid_compensation(dsn: str, case: Case) -> None:
    """README, Retries: "... an attempt given back a second time before any outcome ...
    counts, so the attempt limit ends that too"; Compensation: compensations "are leased,
    checkpointed and retried like steps". README, States: "Every transition is appended
    to the run's history with time ..., step, attempt, worker and error".

    Random rollbacks whose worker closes (once or twice) while a compensation runs end
    as the model says. Pinned: a compensation with max_attempts=1 given back twice: the
    run ends `failed` with saga.AttemptLost, and its history holds no
    ``compensation_started`` of an attempt 2, which never ran."""
    await execute(dsn, case)
