"""The orchestrator: the runtime that starts runs and leases and executes their work.

One anyio task group, owned by ``async with Orchestrator(...)``, holds every loop: the
claim loop, the LISTEN connection, the heartbeat, and one task per leased run. Entering
returns only once claiming is live; leaving stops claiming, lets running steps finish up
to ``shutdown_timeout``, then cancels the rest and gives their leases back so another
process can take them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import asyncpg
import pydantic
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from saga import _checks
from saga._aio import is_cancellation, uncancellable
from saga._codec import DEFAULT_MAX_PAYLOAD_BYTES, encode
from saga._definition import Saga, check_lease_seconds
from saga._engine import Engine, Hooks, Lease, SimulatedCrash
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    DefinitionError,
    IdempotencyConflictError,
    InvalidInputError,
    LifecycleError,
    exception_type,
)
from saga._listener import Listener
from saga._log import Outage, logger
from saga._run import RunHandle
from saga._store import (
    ClaimedItem,
    DefinitionKey,
    Store,
    latest_migration,
    translate_errors,
    validate_schema,
)
from saga._telemetry import CREATED, RUN_ID, SAGA, Telemetry

InT = TypeVar("InT", bound=pydantic.BaseModel)

_MAX_KEY_LENGTH = 512
_MAX_WORKER_ID_LENGTH = 200
_MAX_PAYLOAD_LIMIT = 256 * 1024 * 1024  # what Postgres text comfortably holds
_UNCLAIMABLE_LOG_INTERVAL = 60.0
# At most one start NOTIFY per saga per window from one process (see _claim_notify).
_NOTIFY_WINDOW = 0.005


async def _keep_session(_conn: Any) -> None:
    """Pool reset for the orchestrator's own pool: nothing to undo.

    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL``) is a round trip and a transaction on every release, which doubled the commits
    per step. saga's sessions keep no server-side state: no session advisory locks (only
    transaction-scoped ones), no cursors, no settings, and the listener removes its
    LISTENs explicitly. asyncpg still rolls back any open transaction before this runs.
    """


def _seconds(name: str, value: float, **bounds: Any) -> float:
    return _checks.seconds(name, value, ConfigurationError, **bounds)


class Orchestrator:
    """Starts runs and, unless ``concurrency=0``, executes the registered sagas' work.

    ``dsn_or_pool`` is a PostgreSQL DSN (the orchestrator then owns its pool) or an
    ``asyncpg.Pool`` the application owns. Any number of orchestrators, in any number of
    processes, may share one database: work is leased with ``FOR UPDATE SKIP LOCKED``.

    ``concurrency`` bounds how many runs this orchestrator executes at once; ``0`` makes
    it a client that only starts runs and waits for them. ``lease_seconds`` is how long a
    claim lasts without a heartbeat (heartbeats go every third of it); a worker that
    dies is replaced after at most that long. ``poll_interval`` bounds the wait for work
    and results when notifications are lost.
    """

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
    ) -> None:
        if not isinstance(dsn_or_pool, str | asyncpg.Pool):
            raise ConfigurationError("dsn_or_pool must be a DSN string or an asyncpg.Pool")
        self._dsn_or_pool = dsn_or_pool
        self.schema = validate_schema(schema)
        err = ConfigurationError
        self.concurrency = _checks.integer("concurrency", concurrency, err, minimum=0)
        self.lease_seconds = check_lease_seconds(lease_seconds, err)
        self.poll_interval = _seconds("poll_interval", poll_interval, maximum=3600)
        self.shutdown_timeout = _seconds(
            "shutdown_timeout", shutdown_timeout, maximum=86400, allow_zero=True
        )
        self.max_payload_bytes = _checks.integer(
            "max_payload_bytes", max_payload_bytes, err, minimum=1, maximum=_MAX_PAYLOAD_LIMIT
        )
        if not isinstance(migrate, bool):
            raise ConfigurationError(f"migrate must be a bool, got {migrate!r}")
        self._migrate = migrate
        self.census_interval = _seconds("census_interval", census_interval, maximum=86400)
        self.telemetry = Telemetry.for_providers(tracer_provider, meter_provider)
        if worker_id is None:
            worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.worker_id = _checks.text("worker_id", worker_id, err, max_length=_MAX_WORKER_ID_LENGTH)
        if isinstance(dsn_or_pool, asyncpg.Pool) and dsn_or_pool.get_max_size() < 2:
            raise ConfigurationError(
                f"the pool allows {dsn_or_pool.get_max_size()} connection(s); saga needs at "
                "least 2 (one is held by the LISTEN connection)"
            )

        self._sagas: dict[tuple[str, int], Saga[Any]] = {}
        for saga in sagas:
            if not isinstance(saga, Saga):
                raise ConfigurationError(f"sagas must hold saga.Saga objects, got {saga!r}")
            key = (saga.name, saga.version)
            if key in self._sagas and self._sagas[key] is not saga:
                raise DefinitionError(
                    f"two different definitions of saga {saga.name!r} version {saga.version}"
                )
            self._sagas[key] = saga

        self._state = "new"  # new -> opening -> open [-> failed] -> closing -> closed
        self._definitions: list[DefinitionKey] = []
        self._failure: BaseException | None = None  # what stopped the loops, if anything
        self._pool: asyncpg.Pool | None = None
        self._owns_pool = isinstance(dsn_or_pool, str)
        self._store: Store | None = None
        self._tg: TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._stop = anyio.Event()
        self._engine: Engine | None = None
        self._stopping = False
        self._wake = anyio.Event()
        self._slot_freed = anyio.Event()
        self._more_work = False
        self._inflight: dict[uuid.UUID, Lease] = {}
        self._drained = anyio.Event()
        self._listener: Listener | None = None
        self.outage = Outage(self.worker_id)
        self.hooks: Hooks | None = None  # fault injection, set only by saga.testing
        self._notified_at: dict[str, float] = {}
        self._trailing_notify: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True from the end of ``async with`` entry until close, unless its loops died."""
        return self._state == "open"

    async def _check_migrated(self, store: Store) -> None:
        applied = max(await store.applied_migrations(), default=0)
        if applied < latest_migration():
            raise ConfigurationError(
                f"schema {self.schema!r} is not migrated (at migration {applied} of "
                f"{latest_migration()}); "
                "run `saga migrate` (or saga.migrate()) first, or open the orchestrator "
                "with migrate=True"
            )

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise LifecycleError(f"this Orchestrator is {self._state}; create a new one")
        self._state = "opening"
        for saga in self._sagas.values():
            saga._freeze()
        self._definitions = [(s.name, s.version, s.fingerprint) for s in self._sagas.values()]
        try:
            if isinstance(self._dsn_or_pool, str):
                async with translate_errors("connecting"):
                    # min_size=0: asyncpg would otherwise log a traceback per attempt to
                    # restore its connection floor while the database is away.
                    self._pool = await asyncpg.create_pool(
                        self._dsn_or_pool,
                        min_size=0,
                        max_size=max(4, min(self.concurrency + 2, 20)),
                        reset=_keep_session,
                    )
            else:
                self._pool = self._dsn_or_pool
            assert self._pool is not None
            self._store = Store(self._pool, self.schema)
            if self._migrate:
                await self._store.migrate()
            else:
                await self._check_migrated(self._store)
            self._engine = Engine(self._store, self)
            started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._host = asyncio.create_task(
                self._host_main(started), name=f"saga-orchestrator:{self.worker_id}"
            )
            await started
        except BaseException:
            self._state = "closed"
            if self._host is not None:
                self._stop.set()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([self._host])
            await self._close_pool()
            raise
        for saga in self._sagas.values():
            saga._orchestrators.append(self)
        self._state = "open"
        logger.info(
            "orchestrator_started",
            worker=self.worker_id,
            schema=self.schema,
            sagas=[f"{n}:v{v}" for n, v in self._sagas],
            concurrency=self.concurrency,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop claiming, let running steps finish (up to ``shutdown_timeout``), release
        the leases of the rest, and close. Safe to call more than once."""
        if self._state in ("closing", "closed", "new"):
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        self._stopping = True
        if self._listener is not None:
            self._listener.waiters.close("the Orchestrator was closed while waiting")
        self._wake.set()
        for saga in self._sagas.values():
            if self in saga._orchestrators:
                saga._orchestrators.remove(self)
        self._stop.set()
        try:
            with anyio.CancelScope(shield=True):
                assert self._host is not None
                await asyncio.wait([self._host])
                error = self._host.exception()
                if error is not None and self._failure is None:
                    logger.error(
                        "orchestrator_crashed",
                        worker=self.worker_id,
                        error_type=exception_type(error),
                    )
                await self._close_pool()
        finally:
            self._state = "closed"
            logger.info("orchestrator_stopped", worker=self.worker_id)

    async def _host_main(self, started: asyncio.Future[None]) -> None:
        """Own the task group in one task, so `async with` may enter and exit in
        different tasks (pytest fixtures, aiohttp cleanup contexts)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                assert self._pool is not None
                assert self._store is not None
                self._listener = Listener(
                    self._pool,
                    self._store,
                    wants_work=lambda name: any(name == n for n, _ in self._sagas),
                    wake=self.wake,
                    worker_id=self.worker_id,
                    poll_interval=self.poll_interval,
                    outage=self.outage,
                )
                await tg.start(self._supervise, "listener", self._listener.run)
                await tg.start(
                    self._supervise, "waiter poll", _started(self._listener.poll_waiters)
                )
                await tg.start(self._supervise, "census", _started(self._census_loop))
                if self.concurrency > 0:
                    await tg.start(self._supervise, "claim", self._claim_loop)
                    await tg.start(self._supervise, "heartbeat", self._heartbeat_loop)
                started.set_result(None)
                await self._stop.wait()
                # Drain: no new claims; running steps get shutdown_timeout to finish.
                with anyio.move_on_after(self.shutdown_timeout):
                    while self._inflight:
                        self._drained = anyio.Event()
                        await self._drained.wait()
                tg.cancel_scope.cancel()
        except BaseException as exc:
            if not started.done():
                started.set_exception(
                    exc if isinstance(exc, Exception) else LifecycleError("startup cancelled")
                )
                return
            if not self._stopping:
                self._died(exc)
            raise
        else:
            if not self._stopping:  # every loop ended, and nobody asked them to
                self._died(LifecycleError("the orchestrator's loops stopped unexpectedly"))
                raise self._failure  # type: ignore[misc]
        finally:
            with anyio.CancelScope(shield=True):
                await self._release_leases()

    def _died(self, exc: BaseException) -> None:
        """The loops stopped without aclose(): report it everywhere it can be seen."""
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        self._failure = exc
        if self._state == "open":
            self._state = "failed"
        logger.error("orchestrator_crashed", worker=self.worker_id, error_type=exception_type(exc))
        if self._listener is not None:
            self._listener.waiters.close(f"the Orchestrator stopped: {exception_type(exc)}")

    async def _supervise(
        self, name: str, loop: Callable[..., Awaitable[None]], *, task_status: TaskStatus[None]
    ) -> None:
        """Run one of the orchestrator's loops; its end, unless asked for, is an error.

        Without this, a loop ended by a stray CancelledError would vanish silently (anyio
        treats it as a cancelled task) and the orchestrator would look alive while it no
        longer claims, heartbeats or listens.
        """
        try:
            await loop(task_status=task_status)
        except BaseException as exc:
            if is_cancellation(exc) or not isinstance(exc, asyncio.CancelledError):
                raise
            raise LifecycleError(f"the {name} loop was stopped by a stray CancelledError") from exc
        if not self._stopping:
            raise LifecycleError(f"the {name} loop ended unexpectedly")

    async def wait_stopped(self) -> None:
        """Wait until this orchestrator's loops stop: return after ``aclose()``, or raise
        the error that stopped them (a bug; the orchestrator no longer works and should be
        closed). A worker process races this against its shutdown signals."""
        if self._host is None:
            raise LifecycleError("the Orchestrator was never opened")
        await asyncio.wait([self._host])
        if self._failure is not None:
            raise self._failure
        error = None if self._host.cancelled() else self._host.exception()
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # the task group's wrapping of the one failure
        if error is not None:
            raise error
        if not self._stopping:
            raise LifecycleError("the orchestrator's loops stopped unexpectedly")

    async def _release_leases(self) -> None:
        leases = [
            (lease.run_id, lease.token) for lease in self._inflight.values() if not lease.lost
        ]
        self._inflight.clear()
        if not leases or self._store is None:
            return
        with anyio.move_on_after(5):
            try:
                released = await self._store.release(self.worker_id, leases)
                logger.info("leases_released", count=released, worker=self.worker_id)
            except DatabaseError as exc:
                logger.warning(
                    "lease_release_failed",
                    error_type=type(exc.__cause__).__name__,
                    leases=len(leases),
                )

    async def _close_pool(self) -> None:
        if self._owns_pool and self._pool is not None:
            with anyio.move_on_after(5) as scope:
                await self._pool.close()
            if scope.cancelled_caught:
                self._pool.terminate()

    def _store_or_raise(self) -> Store:
        if self._state != "open" or self._store is None:
            if self._state in ("new", "opening"):
                raise LifecycleError(
                    "the Orchestrator is not open; use `async with Orchestrator(...)`"
                )
            if self._state == "failed":
                raise LifecycleError(
                    f"the Orchestrator stopped: its loops died of "
                    f"{exception_type(self._failure or LifecycleError())}; close it"
                ) from self._failure
            raise LifecycleError("the Orchestrator is closed")
        return self._store

    def _definition(self, name: str, version: int) -> Saga[Any] | None:
        return self._sagas.get((name, version))

    # -- starting and looking up runs -------------------------------------------------

    async def start(
        self,
        saga: Saga[InT],
        input: InT | Mapping[str, Any],
        *,
        key: str | None = None,
        require_same_input: bool = True,
    ) -> RunHandle:
        """Validate ``input``, durably record a new run, and return its handle.

        When this returns the run is committed; cancelling the caller once the insert was
        sent (by any means: anyio scopes, ``asyncio.timeout``, ``Task.cancel()``) neither
        cancels nor loses the run. With ``key``, a run already started with that key for
        this saga is returned instead (``handle.created`` is then False), provided it was
        started with an equal input: a different input raises
        :class:`IdempotencyConflictError`, unless ``require_same_input=False``.
        """
        store = self._store_or_raise()
        if self._sagas.get((saga.name, saga.version)) is not saga:
            raise DefinitionError(
                f"saga {saga.name!r} v{saga.version} is not registered with this orchestrator"
            )
        if key is not None:
            _checks.text("idempotency key", key, InvalidInputError, max_length=_MAX_KEY_LENGTH)
        try:
            model = saga.input_type.model_validate(input)
        except pydantic.ValidationError as exc:
            raise InvalidInputError(f"invalid input for saga {saga.name!r}: {exc}") from exc
        input_json = encode(model, saga.input_type, what="input", max_bytes=self.max_payload_bytes)
        notify = self._claim_notify(saga.name)
        with self.telemetry.start_span(saga) as (span, carrier):
            # Once the INSERT is sent its outcome must be known: a cancelled caller gets
            # its cancellation only after the insert committed or failed.
            run_id, created, existing_input = await uncancellable(
                store.start_run(
                    uuid.uuid4(),
                    saga.name,
                    saga.version,
                    key,
                    input_json,
                    saga.steps[0].name,
                    carrier,
                    notify,
                    saga.fingerprint,
                )
            )
            span.set_attribute(RUN_ID, str(run_id))
            span.set_attribute(CREATED, created)
        if (
            not created
            and require_same_input
            and existing_input is not None
            and not _same_json(existing_input, input_json)
        ):
            raise IdempotencyConflictError(
                f"idempotency key {key!r} of saga {saga.name!r} was used by run {run_id} "
                "with a different input; use a new key, or pass require_same_input=False "
                "to get that run",
                run_id,
            )
        if created:
            if not notify:
                self._notify_after_commit(saga.name)
            self.telemetry.runs_started.add(1, {SAGA: saga.name})
            logger.debug("run_started", run_id=str(run_id), saga=saga.name)
            if (saga.name, saga.version) in self._sagas and self.concurrency > 0:
                self._wake.set()
        return RunHandle(self, run_id, created=created)

    async def unclaimable_runs(self) -> dict[tuple[str, int, str | None], int]:
        """Active runs of definitions this orchestrator did not register, by (saga name,
        version, fingerprint); the fingerprint is None for runs started before saga
        recorded fingerprints.

        They are not claimed, failed or lost: they wait for an orchestrator that has their
        definition (a rolling deploy, or a changed definition whose version was not
        bumped). Watch this during deploys.
        """
        return await self._store_or_raise().count_unclaimable(self._definitions)

    def _claim_notify(self, saga_name: str) -> bool:
        """Whether this start should NOTIFY the workers itself.

        A NOTIFY takes a cluster-wide lock at commit, so under load one start per
        ``_NOTIFY_WINDOW`` notifies; the others are covered by a trailing NOTIFY that
        :meth:`_notify_after_commit` schedules once they committed.
        """
        now = anyio.current_time()
        if now - self._notified_at.get(saga_name, -math.inf) >= _NOTIFY_WINDOW:
            self._notified_at[saga_name] = now
            return True
        return False

    def _notify_after_commit(self, saga_name: str) -> None:
        """A start that did not NOTIFY has committed: make sure a NOTIFY follows it.

        Scheduled after the commit (not when the start began), so that the trailing
        NOTIFY is always sent after every start it covers is visible to the workers.
        """
        if saga_name not in self._trailing_notify and self._tg is not None:
            self._trailing_notify.add(saga_name)
            self._tg.start_soon(self._notify_later, saga_name)

    async def _notify_later(self, saga_name: str) -> None:
        await anyio.sleep(_NOTIFY_WINDOW)
        self._trailing_notify.discard(saga_name)
        self._notified_at[saga_name] = anyio.current_time()
        assert self._store is not None
        with contextlib.suppress(DatabaseError):  # workers still poll
            await self._store.notify_work(saga_name)

    def get_run(self, run_id: uuid.UUID | str) -> RunHandle:
        """A handle on an existing run (by id), e.g. one started by another process."""
        self._store_or_raise()
        return RunHandle(self, run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(run_id))

    # -- result waiters -----------------------------------------------------------------

    def _subscribe(self, run_id: uuid.UUID) -> anyio.Event:
        self._store_or_raise()
        assert self._listener is not None
        return self._listener.waiters.subscribe(run_id)

    def _check_waiting(self) -> None:
        """Raise LifecycleError when waiting is over for good (closed, or loops died)."""
        if self._listener is not None and self._listener.waiters.closed is not None:
            raise LifecycleError(self._listener.waiters.closed)

    def _unsubscribe(self, run_id: uuid.UUID, event: anyio.Event) -> None:
        assert self._listener is not None
        self._listener.waiters.unsubscribe(run_id, event)

    @property
    def _waiters(self) -> dict[uuid.UUID, set[anyio.Event]]:
        return {} if self._listener is None else self._listener.waiters._events

    # -- loops ----------------------------------------------------------------------------

    def wake(self) -> None:
        """Claim again now."""
        self._wake.set()

    def wake_later(self, delay: float) -> None:
        """Claim again once ``delay`` passes (a retry this worker scheduled comes due)."""
        if self._tg is not None and not self._stopping:
            self._tg.start_soon(self._wake_after, delay)

    async def _wake_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._wake.set()

    async def _claim_loop(self, *, task_status: TaskStatus[None]) -> None:
        assert self._store is not None
        assert self._tg is not None
        store, tg = self._store, self._tg
        registered = self._definitions
        task_status.started()
        delay = 0.1
        while not self._stopping:
            free = self.concurrency - len(self._inflight)
            if free > 0:
                self._wake = anyio.Event()
                try:
                    items = await store.claim(self.worker_id, free, self.lease_seconds, registered)
                except DatabaseError as exc:
                    self.outage.lost("claiming work", exc)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                self.outage.back()
                delay = 0.1
                for item in items:
                    lease = Lease(item.run_id, item.lease_token, self.lease_seconds)
                    self._inflight[item.run_id] = lease
                    tg.start_soon(self._run_item, item, lease)
                self._more_work = len(items) == free
                if self._more_work:
                    continue
            else:
                # Full: wait for a free slot, not for _wake (a pending wake-up would make
                # this loop spin until a run finishes).
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
                continue
            with anyio.move_on_after(self.poll_interval):
                await self._wake.wait()

    async def _run_item(self, item: ClaimedItem, lease: Lease) -> None:
        assert self._engine is not None
        saga = self._sagas[(item.saga_name, item.saga_version)]
        finished = False
        try:
            await self._engine.process(item, saga, lease)
            finished = True
        except SimulatedCrash:
            # saga.testing: behave as a dead worker would: write nothing, hold the lease
            # until it expires, and never release it.
            finished = True
            lease.lost = True
            logger.warning("simulated_crash", run_id=str(item.run_id), saga=item.saga_name)
        except DatabaseError as exc:
            finished = True  # the lease runs out and any worker takes the run again
            self.outage.lost("recording an outcome", exc)
        except BaseException as exc:
            if is_cancellation(exc):
                raise  # shutdown: the lease stays listed so aclose() releases it
            # A bug of saga's (user code cannot get here: the engine records whatever
            # it raises). The lease runs out and the run is retried, counting an attempt.
            finished = True
            lease.lost = True
            logger.error(
                "internal_error",
                run_id=str(item.run_id),
                saga=item.saga_name,
                error_type=exception_type(exc),
                exc_info=exc,
            )
        finally:
            # When cancelled by shutdown, the lease stays listed so aclose() releases it.
            # The same run may have been claimed again meanwhile (our own lease expired
            # during a stall): only drop the entry if it is still this lease.
            if finished and self._inflight.get(item.run_id) is lease:
                del self._inflight[item.run_id]
                self._slot_freed.set()
                if self._more_work:
                    self._wake.set()
                if not self._inflight:
                    self._drained.set()

    async def _census_loop(self) -> None:
        """Refresh the database-wide gauges (runs per state, oldest active run, scheduler
        lag, unclaimable work) every ``census_interval``; warn about unclaimable work at
        most once a minute. Two small queries over the active and failed runs only."""
        assert self._store is not None
        store, registered, warned_at = self._store, self._definitions, -math.inf
        mine = {(name, version): fp for name, version, fp in registered}
        try:
            while True:
                try:
                    census = await store.census(registered)
                    waiting = await store.count_unclaimable(registered)
                except DatabaseError as exc:
                    self.outage.lost("reading run statistics", exc)
                else:
                    self.outage.back()
                    self.telemetry.gauges.update(self.schema, census, waiting)
                    if waiting and anyio.current_time() - warned_at >= _UNCLAIMABLE_LOG_INTERVAL:
                        warned_at = anyio.current_time()
                        for (name, version, fp), runs in waiting.items():
                            logger.warning(
                                "unknown_definition_waiting",
                                saga=name,
                                version=version,
                                fingerprint=fp,
                                registered_fingerprint=mine.get((name, version)),
                                runs=runs,
                            )
                await anyio.sleep(self.census_interval)
        finally:
            self.telemetry.gauges.forget(self.schema)

    async def _heartbeat_loop(self, *, task_status: TaskStatus[None]) -> None:
        assert self._store is not None
        store = self._store
        shortest = min(
            [self.lease_seconds]
            + [
                s.lease_seconds
                for saga in self._sagas.values()
                for s in saga.steps
                if s.lease_seconds
            ]
        )
        task_status.started()
        while True:
            await anyio.sleep(shortest / 3)
            leases = list(self._inflight.values())
            sent = {lease.run_id: lease.token for lease in leases}
            if not sent:
                continue
            try:
                held = await store.heartbeat(
                    self.worker_id, [(ls.run_id, ls.token, ls.seconds) for ls in leases]
                )
            except DatabaseError as exc:
                self.outage.lost("heartbeat", exc)
                continue
            self.outage.back()
            for run_id, token in sent.items():
                lease = self._inflight.get(run_id)
                if lease is not None and held.get(run_id):
                    lease.cancel_requested = True  # the engine rolls back after this step
                if run_id in held or lease is None or lease.token != token:
                    continue  # still ours, or the run moved on to a new lease meanwhile
                lease.lost = True
                lease.scope.cancel()
                logger.warning("lease_lost", run_id=str(run_id), worker=self.worker_id)


def _started(loop: Callable[[], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A loop that is live as soon as it is started (for ``TaskGroup.start``)."""

    async def run(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await loop()

    return run


def _same_json(a: str, b: str) -> bool:
    """Whether two stored JSON texts hold the same value: key order aside, but types not
    (``1``, ``1.0`` and ``true`` differ, as they would reach the steps differently)."""
    return a == b or _same(json.loads(a), json.loads(b))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
