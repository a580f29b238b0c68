"""Deterministic fault injection for your own tests against a real PostgreSQL.

Sagas are only as safe as their steps are idempotent. These faults let a test prove it:
make a step's worker die after the side effect but before the checkpoint, expire a lease
under a running step, fail a compensation, or break the connection while a checkpoint
commits, then assert on the outcome. Each fault fires a set number of times for one
step (every run, unless ``run_id`` narrows it)::

    from saga.testing import Faults

    faults = Faults()
    faults.crash_after(charge_card)              # effect happens, checkpoint never does
    async with saga.Orchestrator(dsn, sagas=[checkout], lease_seconds=1) as orch:
        faults.attach(orch)
        run = await checkout.start(order)
        await run.result(timeout=30)
    assert faults.fired["crash_after"] == 1

A crash or an expired lease is recovered by lease expiry, so give the orchestrator a
short ``lease_seconds`` in such tests.

Timers need no real time either: :func:`advance` moves a run's timer (a sleep's end, a
wait's timeout, a retry's backoff) as if that time had passed, so a test of a two-day
approval timeout runs in milliseconds::

    run = await refund.start(request)
    ...                                          # the run reaches its 48 h wait
    await advance(client, run, timedelta(hours=48))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from saga import _checks
from saga._checks import show
from saga._client import Client, store_of
from saga._context import Context
from saga._definition import Step
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    InvalidInputError,
    LifecycleError,
    PermanentError,
    RunNotFoundError,
)
from saga._hooks import NO_HOOKS, FaultTarget, Hooks, SimulatedCrash
from saga._orchestrator import Orchestrator
from saga._run import RunHandle

__all__ = ["Faults", "InjectedFault", "SimulatedCrash", "advance"]

T = TypeVar("T")


class InjectedFault(Exception):
    """The error raised by :meth:`Faults.fail_compensation` (retryable by default)."""


class _PermanentInjectedFault(InjectedFault, PermanentError):
    """``fail_compensation(permanent=True)``'s: recorded as InjectedFault, as the README
    says, and never retried."""


# The recorded error type is the class's qualified name: the one the README gives.
_PermanentInjectedFault.__qualname__ = _PermanentInjectedFault.__name__ = "InjectedFault"


@dataclass
class _Rule:
    kind: str
    step: str
    compensation: bool
    remaining: int | None  # None: every time
    run_id: UUID | None
    option: bool = False
    saga: Any = None  # the step's saga (a Step given); None: that step name in any saga

    def matches(self, ctx: Context[Any]) -> bool:
        return (
            ctx.step == self.step
            and (self.saga is None or ctx._definition is self.saga)
            and ctx.is_compensation == self.compensation
            and (self.run_id is None or ctx.run_id == self.run_id)
            and (self.remaining is None or self.remaining > 0)
        )

    def take(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1


class Faults(Hooks):
    """A plan of faults, attached to one or more orchestrators.

    ``fired`` counts the faults that actually happened, by kind, so a test can check its
    premise (the fault really fired) as well as the outcome.
    """

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self.fired: Counter[str] = Counter()
        # Attempts whose lease expire_lease expired: their checkpoint waits for the
        # takeover. (run, step, attempt) -> (the orchestrator, what it expired)
        self._expired: dict[tuple[UUID, str, int], tuple[FaultTarget, Any]] = {}

    def attach(self, orchestrator: Orchestrator) -> Faults:
        """Inject this plan into an orchestrator's execution (open or not)."""
        if not isinstance(orchestrator, Orchestrator):
            raise ConfigurationError(
                "faults attach to the saga.Orchestrator that executes the steps (a Client "
                f"executes none), got {show(orchestrator)}"
            )
        if orchestrator.hooks is not NO_HOOKS and orchestrator.hooks is not self:
            raise LifecycleError("this orchestrator already has a fault plan attached")
        orchestrator.hooks = self
        return self

    # -- declaring faults -------------------------------------------------------------

    def crash_after(
        self,
        step: Step[Any, Any] | str,
        *,
        times: int = 1,
        compensation: bool = False,
        run_id: UUID | None = None,
    ) -> None:
        """The step (or its compensation) runs to completion, then its worker dies before
        writing the outcome: nothing is recorded and the lease is never released, so the
        run waits for the lease to expire and another attempt runs the step again."""
        self._add("crash_after", step, times, compensation, run_id)

    def expire_lease(
        self, step: Step[Any, Any] | str, *, times: int = 1, run_id: UUID | None = None
    ) -> None:
        """When the step starts, its lease is made to look expired in the database, as if
        its worker had stalled (its heartbeats no longer renew that lease); the claim path
        (another worker's, or this one's if it has a free slot) takes the run over with a
        new fencing token while the first attempt still runs, and that attempt's writes
        are refused."""
        self._add("expire_lease", step, times, False, run_id)

    def fail_compensation(
        self,
        step: Step[Any, Any] | str,
        *,
        times: int | None = None,
        permanent: bool = False,
        run_id: UUID | None = None,
    ) -> None:
        """The compensation of ``step`` raises :class:`InjectedFault` on its next ``times``
        attempts (all of them when None); ``permanent`` makes it skip retries."""
        self._add("fail_compensation", step, times, True, run_id, option=permanent)

    def drop_connection_at_commit(
        self,
        step: Step[Any, Any] | str,
        *,
        committed: bool = True,
        times: int = 1,
        compensation: bool = False,
        run_id: UUID | None = None,
    ) -> None:
        """The connection breaks while the step's outcome is written: after the commit
        reached the database (``committed=True``, the reply is lost) or before it."""
        self._add("drop_connection_at_commit", step, times, compensation, run_id, committed)

    def _add(
        self,
        kind: str,
        step: Step[Any, Any] | str,
        times: int | None,
        compensation: bool,
        run_id: UUID | None,
        option: bool = False,
    ) -> None:
        if times is not None:  # (a float would fire a count no one asked for)
            _checks.integer("times", times, ConfigurationError, minimum=1)
        # ("no" would mean yes, and compensation="yes" would never fire)
        _checks.flag("compensation", compensation, ConfigurationError)
        _checks.flag(
            "committed" if kind.startswith("drop") else "permanent", option, ConfigurationError
        )
        if isinstance(step, str):
            name, saga = _checks.text("step name", step, ConfigurationError, max_length=128), None
            if not _checks.is_name(name):  # the fault could never fire
                raise ConfigurationError(
                    f"step name {show(name)} is not a name a step can have (1-128 letters, "
                    "digits, '_', '.', ':' or '-', starting with a letter or '_')"
                )
        elif isinstance(step, Step):
            name, saga = step.name, step.saga
            if compensation and step.compensation is None:  # it could never fire
                raise ConfigurationError(
                    f"{kind}(..., compensation) on step {name!r}, which has no compensation"
                )
        else:
            raise ConfigurationError(
                f"a fault needs a step (a Step, or a step name), got {show(step)}"
            )
        if run_id is not None:
            run_id = _checks.run_id(run_id, ConfigurationError)
        self._rules.append(_Rule(kind, name, compensation, times, run_id, option, saga))

    def _match(self, kind: str, ctx: Context[Any]) -> _Rule | None:
        for rule in self._rules:
            if rule.kind == kind and rule.matches(ctx):
                rule.take()
                self.fired[kind] += 1
                return rule
        return None

    # -- the runtime's hooks ------------------------------------------------------------

    async def before_call(self, ctx: Context[Any], target: FaultTarget) -> None:
        if self._match("expire_lease", ctx) is not None:
            expired = await target.expire_lease(ctx.run_id, ctx.step)
            target.wake()
            if expired is not None:
                self._expired[(ctx.run_id, ctx.step, ctx.attempt)] = (target, expired)
        rule = self._match("fail_compensation", ctx)
        if rule is not None:
            error = _PermanentInjectedFault if rule.option else InjectedFault
            raise error(f"injected failure of the compensation of {ctx.step!r}")

    async def before_checkpoint(self, ctx: Context[Any]) -> None:
        await self._stalled(ctx)
        if self._match("crash_after", ctx) is not None:
            raise SimulatedCrash(f"injected crash after {ctx.step!r}")

    async def _stalled(self, ctx: Context[Any]) -> None:
        """An attempt whose lease ``expire_lease`` expired, about to write its outcome
        (it returned, or it raised: a failure's write is fenced too): it waits for the
        takeover, so that its write comes after and is refused."""
        stalled = None if ctx.is_compensation else (ctx.run_id, ctx.step, ctx.attempt)
        if stalled is not None and stalled in self._expired:
            target, expired = self._expired.pop(stalled)
            if not await target.taken_over(ctx.run_id, expired):  # so its write comes after
                # No slot freed for the takeover yet: the stalled attempt writes nothing
                # (as a write the takeover refuses), and a claim takes the run over once
                # one is free.
                raise SimulatedCrash(f"stalled attempt of {ctx.step!r} not taken over yet")

    async def write(self, ctx: Context[Any], write: Callable[[], Awaitable[T]]) -> T:
        await self._stalled(ctx)  # (an attempt that raised: before_checkpoint was not called)
        rule = self._match("drop_connection_at_commit", ctx)
        if rule is None:
            return await write()
        if rule.option:
            await write()
        raise DatabaseError("injected: connection lost at commit") from ConnectionResetError()


async def advance(
    client: Client, run: RunHandle | UUID | str, by: timedelta | float
) -> datetime | None:
    """Move the run's timer earlier by ``by`` (a timedelta or seconds), as if that much
    time had passed: a sleep ends sooner, a wait times out sooner, a retry's backoff is
    over sooner (a graph run: its steps' backoffs); the workers are woken. An item a
    worker holds (its lease) and a wait without timeout are left alone. Returns the new
    due time (None: nothing moved); raises :class:`RunNotFoundError` for no such run. For
    tests: production runs keep their real timers."""
    seconds = by.total_seconds() if isinstance(by, timedelta) else by
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not 0 <= seconds <= _checks.MAX_AGE_SECONDS
    ):
        raise InvalidInputError(f"advance() needs a duration from 0 to 1,000 years, got {show(by)}")
    rid = _checks.run_id(run.id if isinstance(run, RunHandle) else run, ConfigurationError)
    store = store_of(client)
    due = await store.advance_timers(rid, float(seconds))
    if due is None and not await store.run_exists(rid):
        raise RunNotFoundError(rid)
    return due
