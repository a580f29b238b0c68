"""The orchestrator: a client plus the worker loops that lease and execute work.

Its one anyio task group (see ``_lifecycle``) holds the client's LISTEN connection and
waiter poll, the census, and, unless ``concurrency=0``, the claim and heartbeat loops and
one task per leased run. Entering returns only once claiming is live; leaving stops
claiming, lets running steps finish up to ``shutdown_timeout``, then cancels the rest and
gives their leases back so another process can take them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

import anyio
import asyncpg
from anyio.abc import TaskGroup
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from saga import _checks
from saga._census import census_loop
from saga._checks import show
from saga._client import Client
from saga._codec import DEFAULT_MAX_PAYLOAD_BYTES
from saga._definition import Saga
from saga._errors import ConfigurationError
from saga._graph_runner import GraphRunner
from saga._heartbeat import heartbeat_interval
from saga._hooks import NO_HOOKS, Hooks
from saga._lease import Leases
from saga._lifecycle import started
from saga._log import logger
from saga._policy import check_lease_seconds
from saga._rate import check_consistent
from saga._run import RunHandle
from saga._runner import Runner
from saga._scheduler import Scheduler
from saga._schedules import Scheduled
from saga._spawner import Children

#: Seconds aclose() waits, beyond shutdown_timeout, for the loops to end (the leases'
#: release alone may take 5 s: a row another transaction holds): a step that swallows
#: its cancellation never lets them (its lease is given back regardless).
_UNWIND_SECONDS = 15.0


class Orchestrator(Client):
    """Starts runs and, unless ``concurrency=0``, executes the registered sagas' work.

    ``dsn_or_pool`` is a PostgreSQL DSN (the orchestrator then owns its pool) or an
    ``asyncpg.Pool`` the application owns. Any number of orchestrators, in any number of
    processes, may share one database: work is leased with ``FOR UPDATE SKIP LOCKED``.

    ``concurrency`` bounds how many runs this orchestrator executes at once; ``0`` makes
    it a client that only starts runs and waits for them. ``lease_seconds`` is how long a
    claim lasts without a heartbeat (heartbeats go every third of it); a worker that
    dies is replaced after at most that long. ``poll_interval`` bounds the wait for work
    and results when notifications are lost. ``schedules`` are the :class:`Scheduled`
    sagas it starts on their schedules (any number of orchestrators may hold the same
    ones: each slot starts one run). ``lanes`` limits the work it executes to the sagas
    of those lanes (``Saga(lane=...)``; default: all): urgent work gets workers of its
    own; it still starts, and waits for, runs of every saga given.
    """

    _kind = "Orchestrator"

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        sagas: Sequence[Saga[Any]],
        schema: str = "saga",
        concurrency: int = 32,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        shutdown_timeout: float = 10.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        migrate: bool = True,
        worker_id: str | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        census_interval: float = 15.0,
        schedules: Sequence[Scheduled[Any]] = (),
        lanes: Sequence[str] | None = None,
    ) -> None:
        err = ConfigurationError
        self.concurrency = _checks.integer("concurrency", concurrency, err, minimum=0)
        self.lease_seconds = check_lease_seconds(lease_seconds, err)
        self.shutdown_timeout = _checks.seconds(
            "shutdown_timeout", shutdown_timeout, err, maximum=86400, allow_zero=True
        )
        self.census_interval = _checks.seconds(
            "census_interval", census_interval, err, minimum=0.05, maximum=86400
        )
        super().__init__(
            dsn_or_pool,
            sagas=sagas,
            schema=schema,
            poll_interval=poll_interval,
            max_payload_bytes=max_payload_bytes,
            migrate=migrate,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            worker_id=worker_id,
        )
        self._schedules = _check_schedules(schedules, self._sagas)
        self.lanes = _check_lanes(lanes, self._sagas)
        check_consistent(
            [st.rate_limit for s in self._sagas.values() for st in s.steps if st.rate_limit]
        )
        self._hooks: Hooks = NO_HOOKS
        self._leases: Leases | None = None
        self._runner: Runner | None = None
        self._alone = True  # no other executing orchestrator on the schema (see _pace)

    @property
    def hooks(self) -> Hooks:
        """Fault-injection points (no-ops); ``saga.testing.Faults.attach`` replaces them,
        before or after the orchestrator opened."""
        return self._hooks

    @hooks.setter
    def hooks(self, hooks: Hooks) -> None:
        self._hooks = hooks
        if self._runner is not None:
            self._runner.use_hooks(hooks)

    def _pool_sizes(self) -> tuple[int, int]:
        if not self.concurrency:
            return super()._pool_sizes()
        size = max(4, min(self.concurrency + 2, 20))
        return size, size

    def _peers_present(self) -> Callable[[int], None] | None:
        return self._pace if self.concurrency else None

    def _pace(self, present: int) -> None:
        """``present`` executing orchestrators share the schema (this one included):
        alone, this one keeps two writes in flight, else one (see ``Store.pace``)."""
        alone = present <= 1
        if self._store is not None and alone != self._alone:
            self._alone = alone
            self._store.pace(self.concurrency, alone=alone)
            logger.info("write_pace", worker=self.worker_id, orchestrators=present)

    async def _start_loops(self, tg: TaskGroup) -> None:
        assert self._store is not None
        store = self._store
        if self.concurrency:
            self._alone = True
            store.pace(self.concurrency, alone=True)
        await super()._start_loops(tg)
        # What this orchestrator can execute: nothing at concurrency 0 (then all active
        # work counts as unclaimable here, and it warns about none of it). Runs of the
        # sagas of other lanes it registered are not unclaimable: their lane's run them.
        runnable = (
            [(s.name, s.version, s.fingerprint) for s in self._sagas.values() if self._in_lanes(s)]
            if self.concurrency
            else []
        )
        known = self._definitions if self.concurrency else []
        census = census_loop(
            store, self.telemetry, runnable, known, self.census_interval, self.outage,
            self.concurrency > 0,
        )  # fmt: skip
        await tg.start(self._supervised, "census", started(lambda: census))
        if self._schedules:
            scheduler = Scheduler(
                store, self._schedules, self._start_scheduled, poll=self.poll_interval,
                outage=self.outage,
            )  # fmt: skip
            await tg.start(self._supervised, "scheduler", scheduler.run)
        if self.concurrency == 0:
            return
        leases = self._leases = Leases(
            store,
            worker_id=self.worker_id,
            concurrency=self.concurrency,
            lease_seconds=self.lease_seconds,
            heartbeat_every=heartbeat_interval(self._lease_lengths()),
            poll_interval=self.poll_interval,
            definitions=runnable,
            outage=self.outage,
            graphs=[
                (s.name, s.version, s.fingerprint)
                for s in self._sagas.values()
                if s.graph is not None and self._in_lanes(s)
            ],
            prioritized=any(
                s.traffic.priority is not None and self._in_lanes(s) for s in self._sagas.values()
            ),
        )
        runner = self._runner = Runner(
            store,
            leases,
            sagas=self._sagas,
            worker_id=self.worker_id,
            lease_seconds=self.lease_seconds,
            max_payload_bytes=self.max_payload_bytes,
            telemetry=self.telemetry,
            hooks=self.hooks,
            outage=self.outage,
            faults=self,
        )

        graphs = any(s.graph is not None for s in self._sagas.values())
        # Only sagas with graph items need the dispatch between runs and items.
        handler = (
            GraphRunner(
                runner, leases, Children(store, self.start_child, self.max_payload_bytes)
            ).run
            if graphs
            else runner.run
        )

        async def claim(*, task_status: Any) -> None:
            await leases.claim_loop(tg, handler, task_status=task_status)

        await tg.start(self._supervised, "claim", claim)
        await tg.start(self._supervised, "heartbeat", leases.heartbeat_loop)

    async def _start_scheduled(self, saga: Saga[Any], data: Any, key: str, conn: Any) -> RunHandle:
        return await self.start(saga, data, key=key, require_same_input=False, conn=conn)

    def _lease_lengths(self) -> list[float]:
        return [self.lease_seconds] + [
            step.lease_seconds
            for saga in self._sagas.values()
            for step in saga.steps
            if step.lease_seconds
        ]

    async def _drain(self) -> None:
        if self._leases is not None:
            await self._leases.drain(self.shutdown_timeout)

    def _close_patience(self) -> float | None:
        # The steps' shutdown_timeout, then time for the loops to unwind and release.
        return self.shutdown_timeout + _UNWIND_SECONDS

    async def _after_loops(self, hurry: bool = False) -> None:
        if self._leases is not None:
            await self._leases.release_all(hurry)
            if self._leases.timer_owed:  # (a retry or a sleep it would have claimed)
                with anyio.move_on_after(1):
                    for name in sorted({s.name for s in self._sagas.values() if self._in_lanes(s)}):
                        await self._notify_work(name)

    # -- the worker's view of notifications and starts ---------------------------------------

    def _wants_work(self, saga_name: str) -> bool:
        return self.concurrency > 0 and self._executes(saga_name)

    def _executes(self, saga_name: str) -> bool:
        """Whether this orchestrator runs the work of some version of ``saga_name``."""
        return any(s.name == saga_name and self._in_lanes(s) for s in self._sagas.values())

    def _in_lanes(self, saga: Saga[Any]) -> bool:
        """Whether this orchestrator runs the work of ``saga`` (this version): one of
        its lanes, or every lane when it has none."""
        return self.lanes is None or saga.traffic.lane in self.lanes

    def _wake(self) -> None:
        if self._leases is not None:
            self._leases.wake()

    def wake(self) -> None:
        """Claim again now."""
        self._wake()

    def _started_locally(self, saga: Saga[Any]) -> None:
        if self.concurrency > 0:
            self._wake()

    # -- what saga.testing's faults act on -----------------------------------------------------

    async def expire_lease(self, run_id: UUID, step: str) -> tuple[str | None, int] | None:
        """Make the lease look expired, and stop renewing it here: a stalled worker's
        heartbeat would not renew it before another worker's claim either."""
        assert self._store is not None
        if self._leases is not None:
            self._leases.stall(run_id, step)
        return await self._store.expire_lease(run_id, step)

    async def taken_over(self, run_id: UUID, expired: tuple[str | None, int]) -> bool:
        """Until a claim took over the lease ``expire_lease`` expired (its token moved
        on), for at most ``_TAKEOVER_SECONDS``: the stalled attempt's write then comes
        after it, and is refused, however quickly its step returned. False: not taken
        over yet (every slot of every worker busy with other work)."""
        assert self._store is not None
        step, token = expired
        with anyio.move_on_after(_TAKEOVER_SECONDS):
            while await self._store.lease_token_of(run_id, step) == token:
                self.wake()
                await anyio.sleep(0.02)
            return True
        return False


#: How long a stalled attempt (saga.testing's expire_lease) waits for its takeover.
_TAKEOVER_SECONDS = 10.0


def _check_schedules(
    schedules: Sequence[Scheduled[Any]], sagas: dict[tuple[str, int], Saga[Any]]
) -> dict[str, Scheduled[Any]]:
    """The schedules by name: each a saga.Scheduled of a registered saga, names unique."""
    if isinstance(schedules, Scheduled) or not isinstance(schedules, Sequence):
        raise ConfigurationError("schedules must be a list of saga.Scheduled")
    by_name: dict[str, Scheduled[Any]] = {}
    for s in schedules:
        if not isinstance(s, Scheduled):
            raise ConfigurationError(f"schedules must hold saga.Scheduled objects, got {show(s)}")
        if sagas.get((s.saga.name, s.saga.version)) is not s.saga:
            raise ConfigurationError(
                f"schedule {s.name!r} starts saga {s.saga.name!r}, which is not in sagas="
            )
        if s.name in by_name:
            raise ConfigurationError(f"two schedules are named {s.name!r}")
        by_name[s.name] = s
    return by_name


def _check_lanes(
    lanes: Sequence[str] | None, sagas: dict[tuple[str, int], Saga[Any]]
) -> frozenset[str] | None:
    """The lanes an orchestrator executes: None (all), or names some saga uses."""
    if lanes is None:
        return None
    if (
        isinstance(lanes, str)
        or not isinstance(lanes, Sequence)
        or not lanes
        or not all(isinstance(lane, str) for lane in lanes)
    ):
        raise ConfigurationError(f"lanes must be a non-empty list of lane names, got {show(lanes)}")
    used = {s.traffic.lane for s in sagas.values()}
    unknown = sorted(set(lanes) - used)
    if unknown:
        raise ConfigurationError(
            f"lanes {unknown} are used by no saga given (their lanes: {sorted(used)})"
        )
    return frozenset(lanes)
