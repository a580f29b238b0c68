"""Small sagas for tests, built from a description, and the retry policies tests share.

``small_saga("name", ["reserve", "charge"], compensate={"reserve"}, fail={"charge":
permanent("declined")}, ledger=ledger)`` builds a saga whose steps (and compensations)
record each call in a :class:`Ledger`, may be held by a :class:`Gate`, sleep, fail as
told (:class:`Fail`), and return what ``result`` says (by default the step's name). A
test whose point is the shape of a definition (definition-time checks, typed results,
payload types, attempt-by-attempt choreography) writes its saga by hand instead.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel

import saga

T = TypeVar("T")
Ctx = saga.Context[Any]


def fast(attempts: int) -> saga.Retry:
    """``attempts`` attempts, 10 ms apart at first, never more than 50 ms."""
    return saga.Retry(max_attempts=attempts, initial_delay=0.01, max_delay=0.05)


#: The tests' default: three quick attempts.
FAST = fast(3)
#: A single attempt: the first failure is final.
ONCE = saga.Retry(max_attempts=1)


class Job(BaseModel):
    """The input of built sagas: ``fail`` lets a run choose its own failures (see
    ``Fail.when``)."""

    n: int = 0
    fail: str = ""


@dataclass(frozen=True)
class Call:
    """One call of a step or compensation, as the ledger saw it."""

    phase: str  # "step" or "compensation" (from ctx.is_compensation)
    step: str
    attempt: int
    key: str  # ctx.idempotency_key
    run_id: uuid.UUID
    value: Any = None  # a compensation: the result it received


class Ledger:
    """An external service as the steps of built sagas see it: every call in order, and
    per step idempotency key the net effect a service deduplicating by key would hold
    (1 once the step ran, 0 once its compensation ran). A call applies its effect first,
    then fails if told to."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.net: dict[str, int] = {}

    def record(self, ctx: Ctx, value: Any = None) -> None:
        phase = "compensation" if ctx.is_compensation else "step"
        self.calls.append(
            Call(phase, ctx.step, ctx.attempt, ctx.idempotency_key, ctx.run_id, value)
        )
        self.net[f"{ctx.run_id}:step:{ctx.step}"] = 0 if ctx.is_compensation else 1

    def of(self, phase: str | None = None, run_id: uuid.UUID | None = None) -> list[Call]:
        """The calls of one phase (both when None), of one run (all when None)."""
        return [c for c in self.calls if phase in (None, c.phase) and run_id in (None, c.run_id)]

    def steps(self, phase: str = "step", run_id: uuid.UUID | None = None) -> list[str]:
        """The step names of the calls of ``phase``, in call order."""
        return [c.step for c in self.of(phase, run_id)]

    def trace(self, run_id: uuid.UUID | None = None) -> list[str]:
        """Every call in order: ``step`` for a step, ``undo step`` for a compensation."""
        return [c.step if c.phase == "step" else f"undo {c.step}" for c in self.of(None, run_id)]

    def attempts(self, step: str, phase: str = "step") -> list[int]:
        return [c.attempt for c in self.of(phase) if c.step == step]

    def raw(self, phase: str = "step") -> Counter[str]:
        """How many times each idempotency key of ``phase`` was called."""
        return Counter(c.key for c in self.of(phase))


@dataclass(frozen=True)
class Fail:
    """A failure of a built step or compensation: ``error(message)`` is raised by the
    calls ``when`` selects (all by default), on attempts up to ``attempts`` (all when
    None). ``message`` may be a function of the call's context."""

    error: type[BaseException] = RuntimeError
    message: str | Callable[[Ctx], str] = "injected failure"
    attempts: int | None = None
    when: Callable[[Ctx], bool] | None = None

    def check(self, ctx: Ctx) -> None:
        if self.attempts is not None and ctx.attempt > self.attempts:
            return
        if self.when is not None and not self.when(ctx):
            return
        message = self.message if isinstance(self.message, str) else self.message(ctx)
        raise self.error(message)


def permanent(
    message: str | Callable[[Ctx], str] = "failed for good",
    when: Callable[[Ctx], bool] | None = None,
) -> Fail:
    """A saga.PermanentError: no retry."""
    return Fail(saga.PermanentError, message, None, when)


def transient(
    attempts: int = 1,
    error: type[BaseException] = ConnectionError,
    message: str | Callable[[Ctx], str] = "transient failure",
    when: Callable[[Ctx], bool] | None = None,
) -> Fail:
    """A retryable error on the first ``attempts`` attempts."""
    return Fail(error, message, attempts, when)


class Gate:
    """Holds the calls of one step (or its compensation) until :attr:`release` is set:
    :attr:`entered` is set when one arrives. ``times`` holds only the first calls
    (all when None); ``when`` selects the calls it holds."""

    def __init__(
        self,
        step: str,
        *,
        compensation: bool = False,
        times: int | None = None,
        when: Callable[[Ctx], bool] | None = None,
    ) -> None:
        self.step = step
        self.compensation = compensation
        self.times = times
        self.when = when
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.held = 0

    async def pass_through(self, ctx: Ctx) -> None:
        if (ctx.step, ctx.is_compensation) != (self.step, self.compensation):
            return
        if self.when is not None and not self.when(ctx):
            return
        if self.times is not None and self.held >= self.times:
            return
        self.held += 1
        self.entered.set()
        await self.release.wait()


def _for(step: str, value: T | Mapping[str, T], default: T) -> T:
    """``value`` itself, or its entry for ``step`` (``default`` if it has none)."""
    if isinstance(value, Mapping):
        return value.get(step, default)
    return value


def small_saga(
    name: str = "small",
    steps: int | Sequence[str] = 1,
    *,
    input: type[BaseModel] = Job,
    version: int = 1,
    compensate: bool | Collection[str] = False,
    ledger: Ledger | None = None,
    fail: Mapping[str, Fail] | None = None,
    fail_undo: Mapping[str, Fail] | None = None,
    gate: Gate | None = None,
    delay: float | Callable[[], float] | Mapping[str, float] = 0.0,
    result: Callable[[Ctx], Any] | Mapping[str, Callable[[Ctx], Any]] | None = None,
    retry: saga.Retry | Mapping[str, saga.Retry] | None = FAST,
    undo_retry: saga.Retry | Mapping[str, saga.Retry] | None = FAST,
    timeout: float | Mapping[str, float] | None = None,
    lease_seconds: float | Mapping[str, float] | None = None,
    after: Mapping[str, Sequence[str]] | None = None,
    traffic: Mapping[str, Any] | None = None,
) -> saga.Saga[Any]:
    """A saga of ``steps`` (a count: ``s1``, ``s2``, ...; or names), in order, or (a
    step named in ``after``) after the steps named there: a graph saga.

    Each step records its call in ``ledger``, passes ``gate``, sleeps ``delay`` seconds,
    raises per ``fail[step]``, then returns ``result(ctx)`` (by default the step's name);
    a mapping gives per-step values. Steps named in ``compensate`` (all if True) have a
    compensation that records its call (with the result it received), passes ``gate``,
    then raises per ``fail_undo[step]``. ``retry``/``undo_retry``, ``timeout`` and
    ``lease_seconds`` go to the declarations (a mapping: per step; None: saga's
    default). ``traffic``: the saga's priority and concurrency options.
    """
    names = [f"s{i}" for i in range(1, steps + 1)] if isinstance(steps, int) else list(steps)
    fail, fail_undo = fail or {}, fail_undo or {}
    s = saga.Saga(name, input=input, version=version, **(traffic or {}))
    for step_name in names:
        pause = _for(step_name, delay, 0.0) if isinstance(delay, Mapping) else delay
        produce = _for(step_name, result, None) if isinstance(result, Mapping) else result

        async def forward(
            ctx: Ctx,
            pause: float | Callable[[], float] = pause,
            produce: Callable[[Ctx], Any] | None = produce,
        ) -> Any:
            if ledger is not None:
                ledger.record(ctx)
            if gate is not None:
                await gate.pass_through(ctx)
            seconds = pause() if callable(pause) else pause
            if seconds:
                await anyio.sleep(seconds)
            if ctx.step in fail:
                fail[ctx.step].check(ctx)
            return ctx.step if produce is None else produce(ctx)

        step = s.step(
            name=step_name,
            retry=_for(step_name, retry, None),
            timeout=_for(step_name, timeout, None),
            lease_seconds=_for(step_name, lease_seconds, None),
            after=None if after is None else after.get(step_name),
        )(forward)
        if compensate is True or (compensate and step_name in compensate):

            async def undo(ctx: Ctx, value: Any) -> None:
                if ledger is not None:
                    ledger.record(ctx, value)
                if gate is not None:
                    await gate.pass_through(ctx)
                if ctx.step in fail_undo:
                    fail_undo[ctx.step].check(ctx)

            step.compensate(retry=_for(step_name, undo_retry, None))(undo)
    return s


def parked_saga(
    name: str = "parked", *, version: int = 1, input: type[BaseModel] = Job
) -> saga.Saga[Any]:
    """A saga no test orchestrator executes: its runs stay pending (a call of its step
    would fail the run, which the test would see)."""
    return small_saga(
        name,
        ["never"],
        version=version,
        input=input,
        fail={"never": Fail(AssertionError, "a parked saga's step was executed")},
    )


async def until_status(run: saga.RunHandle, *statuses: saga.RunStatus) -> saga.RunInfo:
    """The run's info once it is in one of ``statuses`` (polled; at most 15 s)."""
    with anyio.fail_after(15):
        while True:
            info = await run.info()
            if info.status in statuses:
                return info
            await anyio.sleep(0.02)


async def ignore_cancellation_for(seconds: float) -> str:
    """Hostile user code: keeps running for ``seconds`` whatever cancels it (each
    re-delivered cancellation is swallowed, briefly throttled), then returns "late"."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            await anyio.sleep(0.05)
        except BaseException:  # the hostile code under test
            time.sleep(0.005)  # noqa: ASYNC251 - throttles the re-delivered cancellations
    return "late"
