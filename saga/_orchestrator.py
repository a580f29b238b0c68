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
import math
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import asyncpg
import pydantic
import structlog
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from saga._codec import DEFAULT_MAX_PAYLOAD_BYTES, encode
from saga._definition import Saga
from saga._engine import Engine, Hooks, Lease, SimulatedCrash
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    DefinitionError,
    InvalidInputError,
    LifecycleError,
)
from saga._listener import Listener
from saga._run import RunHandle
from saga._store import ClaimedItem, Store, translate_errors, validate_schema
from saga._telemetry import CREATED, RUN_ID, SAGA, Telemetry

InT = TypeVar("InT", bound=pydantic.BaseModel)

logger = structlog.get_logger("saga")

_MAX_KEY_LENGTH = 512
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


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
    return float(value)


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
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 0:
            raise ConfigurationError(f"concurrency must be an int >= 0, got {concurrency!r}")
        self.concurrency = concurrency
        self.lease_seconds = _positive("lease_seconds", lease_seconds)
        self.poll_interval = _positive("poll_interval", poll_interval)
        self.shutdown_timeout = _positive("shutdown_timeout", shutdown_timeout)
        if not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
            raise ConfigurationError("max_payload_bytes must be a positive int")
        self.max_payload_bytes = max_payload_bytes
        self._migrate = migrate
        self.census_interval = _positive("census_interval", census_interval)
        self.telemetry = Telemetry.for_providers(tracer_provider, meter_provider)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

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

        self._state = "new"  # new -> opening -> open -> closing -> closed
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
        self.hooks: Hooks | None = None  # fault injection, set only by saga.testing
        self._notified_at: dict[str, float] = {}
        self._trailing_notify: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise LifecycleError(f"this Orchestrator is {self._state}; create a new one")
        self._state = "opening"
        for saga in self._sagas.values():
            saga._freeze()
        try:
            if isinstance(self._dsn_or_pool, str):
                async with translate_errors("connecting"):
                    self._pool = await asyncpg.create_pool(
                        self._dsn_or_pool,
                        min_size=1,
                        max_size=max(4, min(self.concurrency + 2, 20)),
                        reset=_keep_session,
                    )
            else:
                self._pool = self._dsn_or_pool
            assert self._pool is not None
            self._store = Store(self._pool, self.schema)
            if self._migrate:
                await self._store.migrate()
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
                if error is not None:
                    logger.error(
                        "orchestrator_crashed",
                        worker=self.worker_id,
                        error_type=type(error).__name__,
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
                )
                await tg.start(self._listener.run)
                tg.start_soon(self._census_loop)
                if self.concurrency > 0:
                    await tg.start(self._claim_loop)
                    await tg.start(self._heartbeat_loop)
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
            if isinstance(exc, Exception):
                logger.exception("orchestrator_crashed", worker=self.worker_id)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._release_leases()

    async def wait_stopped(self) -> None:
        """Wait until this orchestrator's loops stop: return after ``aclose()``, or raise
        the error that stopped them (a bug; the orchestrator no longer works and should be
        closed). A worker process races this against its shutdown signals."""
        if self._host is None:
            raise LifecycleError("the Orchestrator was never opened")
        await asyncio.wait([self._host])
        error = None if self._host.cancelled() else self._host.exception()
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # the task group's wrapping of the one failure
        if error is not None:
            raise error

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
                logger.warning("lease_release_failed", error_type=type(exc.__cause__).__name__)

    async def _close_pool(self) -> None:
        if self._owns_pool and self._pool is not None:
            with anyio.move_on_after(5) as scope:
                await self._pool.close()
            if scope.cancelled_caught:
                self._pool.terminate()

    def _store_or_raise(self) -> Store:
        if self._state != "open" or self._store is None:
            raise LifecycleError(
                "the Orchestrator is not open; use `async with Orchestrator(...)`"
                if self._state in ("new", "opening")
                else "the Orchestrator is closed"
            )
        return self._store

    def _definition(self, name: str, version: int) -> Saga[Any] | None:
        return self._sagas.get((name, version))

    # -- starting and looking up runs -------------------------------------------------

    async def start(
        self, saga: Saga[InT], input: InT | Mapping[str, Any], *, key: str | None = None
    ) -> RunHandle:
        """Validate ``input``, durably record a new run, and return its handle.

        When this returns the run is committed; cancelling the caller afterwards does not
        cancel the run. With ``key``, a run already started with that key for this saga
        is returned instead (``handle.created`` is then False).
        """
        store = self._store_or_raise()
        if self._sagas.get((saga.name, saga.version)) is not saga:
            raise DefinitionError(
                f"saga {saga.name!r} v{saga.version} is not registered with this orchestrator"
            )
        if key is not None and (
            not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH or "\x00" in key
        ):
            raise InvalidInputError(
                f"idempotency key must be a non-empty str of at most {_MAX_KEY_LENGTH} "
                "characters without NUL"
            )
        try:
            model = saga.input_type.model_validate(input)
        except pydantic.ValidationError as exc:
            raise InvalidInputError(f"invalid input for saga {saga.name!r}: {exc}") from exc
        input_json = encode(model, saga.input_type, what="input", max_bytes=self.max_payload_bytes)
        notify = self._claim_notify(saga.name)
        # Shielded: once the INSERT is sent, its outcome must be known to the caller.
        with (
            self.telemetry.start_span(saga) as (span, carrier),
            anyio.CancelScope(shield=True),
        ):
            run_id, created = await store.start_run(
                uuid.uuid4(),
                saga.name,
                saga.version,
                key,
                input_json,
                saga.steps[0].name,
                carrier,
                notify,
            )
            span.set_attribute(RUN_ID, str(run_id))
            span.set_attribute(CREATED, created)
        if created:
            self.telemetry.runs_started.add(1, {SAGA: saga.name})
            logger.debug("run_started", run_id=str(run_id), saga=saga.name)
            if (saga.name, saga.version) in self._sagas and self.concurrency > 0:
                self._wake.set()
        return RunHandle(self, run_id, created=created)

    async def unclaimable_runs(self) -> dict[tuple[str, int], int]:
        """Active runs of (saga name, version) pairs this orchestrator did not register.

        They are not claimed, failed or lost: they wait for an orchestrator that knows
        their definition (e.g. during a rolling deploy). Watch this during deploys.
        """
        return await self._store_or_raise().count_unclaimable(list(self._sagas))

    def _claim_notify(self, saga_name: str) -> bool:
        """Whether this start should NOTIFY the workers itself.

        A NOTIFY takes a cluster-wide lock at commit, so under load one start per
        ``_NOTIFY_WINDOW`` notifies; the others are covered by one trailing NOTIFY at the
        end of the window (workers woken by the first claim everything due by then).
        """
        now = anyio.current_time()
        if now - self._notified_at.get(saga_name, -math.inf) >= _NOTIFY_WINDOW:
            self._notified_at[saga_name] = now
            return True
        if saga_name not in self._trailing_notify and self._tg is not None:
            self._trailing_notify.add(saga_name)
            self._tg.start_soon(self._notify_later, saga_name)
        return False

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
        assert self._listener is not None
        return self._listener.subscribe(run_id)

    def _unsubscribe(self, run_id: uuid.UUID, event: anyio.Event) -> None:
        assert self._listener is not None
        self._listener.unsubscribe(run_id, event)

    @property
    def _waiters(self) -> dict[uuid.UUID, set[anyio.Event]]:
        return {} if self._listener is None else self._listener.waiters

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
        registered = list(self._sagas)
        task_status.started()
        delay = 0.1
        while not self._stopping:
            free = self.concurrency - len(self._inflight)
            if free > 0:
                self._wake = anyio.Event()
                try:
                    items = await store.claim(self.worker_id, free, self.lease_seconds, registered)
                except DatabaseError as exc:
                    logger.warning("claim_failed", error_type=type(exc.__cause__).__name__)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
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
            logger.warning(
                "run_interrupted",
                run_id=str(item.run_id),
                saga=item.saga_name,
                error_type=type(exc.__cause__).__name__,
            )
        except Exception:
            finished = True
            logger.exception("internal_error", run_id=str(item.run_id), saga=item.saga_name)
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
        store, registered, warned_at = self._store, list(self._sagas), -math.inf
        try:
            while True:
                try:
                    census = await store.census(registered)
                    waiting = await store.count_unclaimable(registered)
                except DatabaseError:
                    pass
                else:
                    self.telemetry.gauges.update(self.schema, census, waiting)
                    if waiting and anyio.current_time() - warned_at >= _UNCLAIMABLE_LOG_INTERVAL:
                        warned_at = anyio.current_time()
                        for (name, version), runs in waiting.items():
                            logger.warning(
                                "unknown_definition_waiting", saga=name, version=version, runs=runs
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
                logger.warning("heartbeat_failed", error_type=type(exc.__cause__).__name__)
                continue
            for run_id, token in sent.items():
                lease = self._inflight.get(run_id)
                if lease is not None and held.get(run_id):
                    lease.cancel_requested = True  # the engine rolls back after this step
                if run_id in held or lease is None or lease.token != token:
                    continue  # still ours, or the run moved on to a new lease meanwhile
                lease.lost = True
                lease.scope.cancel()
                logger.warning("lease_lost", run_id=str(run_id), worker=self.worker_id)
