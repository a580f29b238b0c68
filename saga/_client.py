"""The client: everything that does not execute steps.

A client holds a pool, the store and the LISTEN connection (with the result waiters and
their shared poll); it runs no worker loop. It starts runs, hands out
:class:`~saga.RunHandle` objects, waits for results, cancels and retries, and serves the
operator functions and the CLI. :class:`~saga.Orchestrator` is a client plus the worker
loops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Self, TypeVar

import anyio
import asyncpg
import pydantic
from anyio.abc import TaskGroup
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, TracerProvider

from saga import _checks, _children, _registry
from saga._acting import Acting
from saga._aio import uncancellable
from saga._awaiting import Awaiting
from saga._codec import DEFAULT_MAX_PAYLOAD_BYTES, same_input
from saga._db import Executor, check_dsn_or_pool, close_pool, open_pool, validate_schema
from saga._definition import Saga
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    IdempotencyConflictError,
    InvalidInputError,
    RunNotFoundError,
)
from saga._input import encode_valid
from saga._instruments import CREATED, RUN_ID, SAGA
from saga._lifecycle import Lifecycle, started
from saga._listener import Listener
from saga._log import Outage, logger
from saga._migrate import check_migrated, migrate
from saga._model import HistoryEvent, RunInfo
from saga._notify import WorkNotifier
from saga._partitions import uuid7
from saga._run import OutputT, RunHandle
from saga._signals import Signalling
from saga._store import StartResult, Store
from saga._store_children import ParentClaim
from saga._store_ops import DefinitionKey
from saga._store_reads import RunRow
from saga._telemetry import Telemetry

InT = TypeVar("InT", bound=pydantic.BaseModel)

_MAX_KEY_LENGTH = 512
_STARTS_PATIENCE = 10.0  # how long a close waits for the starts in flight (seconds)
_MAX_ID_LENGTH = 200
_MAX_PAYLOAD_LIMIT = 256 * 1024 * 1024  # what Postgres text comfortably holds


class Client(Lifecycle, Signalling, Acting, Awaiting):
    """Starts runs, waits for them and acts on them; executes nothing.

    ``dsn_or_pool`` is a PostgreSQL DSN (the client then owns its pool) or an
    ``asyncpg.Pool`` the application owns (at least 2 connections: the LISTEN connection
    holds one). ``sagas`` are the definitions it starts and whose results it decodes.
    ``poll_interval`` bounds the wait for a result when notifications are lost.
    """

    _kind = "Client"

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        sagas: Sequence[Saga[Any]] = (),
        schema: str = "saga",
        poll_interval: float = 1.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        migrate: bool = True,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        worker_id: str | None = None,
    ) -> None:
        check_dsn_or_pool(dsn_or_pool, 2, " (one is held by the LISTEN connection)")
        if worker_id is None:
            worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.worker_id = _checks.text(
            "worker_id", worker_id, ConfigurationError, max_length=_MAX_ID_LENGTH
        )
        super().__init__(self.worker_id)
        self._dsn_or_pool = dsn_or_pool
        self.schema = validate_schema(schema)
        self.poll_interval = _checks.seconds(
            "poll_interval", poll_interval, ConfigurationError, minimum=0.01, maximum=3600
        )
        self.max_payload_bytes = _checks.integer(
            "max_payload_bytes",
            max_payload_bytes,
            ConfigurationError,
            minimum=1,
            maximum=_MAX_PAYLOAD_LIMIT,
        )
        self._migrate = _checks.flag("migrate", migrate, ConfigurationError)
        _checks.providers(tracer_provider, meter_provider, ConfigurationError)
        self.telemetry = Telemetry(tracer_provider, meter_provider)
        self._sagas: dict[tuple[str, int], Saga[Any]] = _registry.definitions(
            _checks.sequence_of("sagas", sagas, Saga, ConfigurationError)
        )
        self._definitions: list[DefinitionKey] = []
        self._pool: asyncpg.Pool | None = None
        self._hot: asyncpg.Pool | None = None
        self._store: Store | None = None
        self._listener: Listener | None = None
        self.outage = Outage(self.worker_id)
        self._notifier = WorkNotifier(self._notify_work, self._soon)
        self._starting = 0  # starts in flight: a close lets them finish first
        self._started_all: anyio.Event | None = None

    def _pool_sizes(self) -> tuple[int, int]:
        """Connections of its pool (one holds the LISTEN), and of its pool of generic
        plans for the statements on given runs (see Store.hot). On the general pool
        Postgres planned a result's reads at every execution: start and wait for 1,920
        runs from 32 callers, a worker in another process, 3 + 2 connections against 4:
        Postgres statement time per run 500-560 -> 280-340 us."""
        return 3, 2

    # -- lifecycle --------------------------------------------------------------------------

    async def _open(self) -> None:
        _children.check_registered(self._sagas)
        _children.check_acyclic(self._sagas)
        for saga in self._sagas.values():
            saga._freeze()
        self._definitions = [(s.name, s.version, s.fingerprint) for s in self._sagas.values()]
        if isinstance(self._dsn_or_pool, str):
            self._pool = await open_pool(self._dsn_or_pool, self._pool_sizes()[0])
        else:
            self._pool = self._dsn_or_pool
        if self._migrate:
            await migrate(self._pool, self.schema)
        else:
            await check_migrated(self._pool, self.schema)
        if isinstance(self._dsn_or_pool, str) and self._pool_sizes()[1]:
            self._hot = await open_pool(self._dsn_or_pool, self._pool_sizes()[1], generic=True)
        self._store = Store(self._pool, self.schema, hot=self._hot)

    async def _start_loops(self, tg: TaskGroup) -> None:
        assert self._pool is not None
        assert self._store is not None
        self._listener = Listener(
            self._pool,
            self._store,
            wants_work=self._wants_work,
            wake=self._wake,
            worker_id=self.worker_id,
            poll_interval=self.poll_interval,
            outage=self.outage,
            peers=self._peers_present(),
        )
        await tg.start(self._supervised, "listener", self._listener.run)
        await tg.start(self._supervised, "waiter poll", started(self._listener.poll_waiters))

    async def __aenter__(self) -> Self:
        entered = await super().__aenter__()
        for saga in self._sagas.values():
            _registry.register(saga, self)
        logger.info(
            f"{self._kind.lower()}_started",
            worker=self.worker_id,
            schema=self.schema,
            sagas=[f"{n}:v{v}" for n, v in self._sagas],
        )
        return entered

    def _closing(self, reason: str) -> None:
        if self._listener is not None:
            self._listener.waiters.close(reason)

    async def _close(self) -> None:
        if self._starting:  # (no start begins now: the client is closing)
            self._started_all = anyio.Event()
            with anyio.move_on_after(_STARTS_PATIENCE):
                await self._started_all.wait()
        if self._store is not None:  # (their trailing NOTIFYs: the loops are gone)
            await self._notifier.flush()
        if self._hot is not None:
            await close_pool(self._hot)
        if isinstance(self._dsn_or_pool, str) and self._pool is not None:
            await close_pool(self._pool)

    async def _notify_work(self, saga_name: str) -> None:
        assert self._store is not None
        try:
            await self._store.notify_work(saga_name)
        except DatabaseError as exc:  # workers still poll
            self.outage.lost("notifying workers", exc)

    def _wants_work(self, saga_name: str) -> bool:
        return False

    def _wake(self) -> None:
        """A NOTIFY says there is new work (workers claim; a client ignores it)."""

    def _peers_present(self) -> Callable[[int], None] | None:
        """What hears how many executing orchestrators share the schema: a client
        executes nothing, so it is not one of them and does not count them."""
        return None

    def _store_or_raise(self) -> Store:
        self._check_open()
        assert self._store is not None
        return self._store

    def definition(self, name: str, version: int) -> Saga[Any] | None:
        """The registered definition of (name, version), if any."""
        return self._sagas.get((name, version))

    # -- starting -----------------------------------------------------------------------------

    async def start(
        self,
        saga: Saga[InT, OutputT],
        input: InT | Mapping[str, Any],
        *,
        key: str | None = None,
        require_same_input: bool = True,
        conn: Executor | None = None,
        priority: int | None = None,
    ) -> RunHandle[OutputT]:
        """Validate ``input``, durably record a new run, and return its handle.

        When this returns the run is committed; cancelling the caller once the insert was
        sent (by any means: anyio scopes, ``asyncio.timeout``, ``Task.cancel()``) neither
        cancels nor loses the run. With ``key``, a run already started with that key for
        this saga is returned instead (``handle.created`` is then False), provided it was
        started with an equal input: a different input raises
        :class:`IdempotencyConflictError`, unless ``require_same_input=False``. With
        ``conn`` (an asyncpg connection in an open transaction) the run is inserted in that
        transaction: it exists, and workers are woken, only if the caller commits.
        ``priority`` (0-100) overrides the saga's for this run.
        """
        with self._in_flight():
            return await self._start(saga, input, key, require_same_input, conn, priority=priority)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """A start under way: a close waits for it (a while) before closing the pools."""
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1
            if not self._starting and self._started_all is not None:
                self._started_all.set()

    async def start_child(
        self, saga: Saga[Any], input: Any, key: str, parent: ParentClaim
    ) -> RunHandle:
        """A child run of the step ``parent`` (run id, step, and the claim it runs under:
        a lost one raises ``ClaimLost``): by key, its end wakes it."""
        with self._in_flight():
            return await self._start(saga, input, key, False, None, parent)

    async def _start(
        self,
        saga: Saga[InT, OutputT],
        input: InT | Mapping[str, Any],
        key: str | None,
        require_same_input: bool,
        conn: Executor | None,
        parent: ParentClaim | None = None,
        priority: int | None = None,
    ) -> RunHandle[OutputT]:
        store = self._store_or_raise()
        _registry.check_start(self._sagas, saga, conn, require_same_input)
        if key is not None:
            _checks.text("idempotency key", key, InvalidInputError, max_length=_MAX_KEY_LENGTH)
        what = f"input for saga {saga.name!r}"
        model, input_json = encode_valid(
            saga.input_type, input, what, "input", self.max_payload_bytes
        )
        traffic = saga.traffic.for_run(model, priority)
        # In the caller's transaction the NOTIFY goes out at its commit: never coalesced.
        notify = conn is not None or self._notifier.claim(saga.name)
        with self.telemetry.start_span(saga) as (span, carrier):
            # Once the INSERT is sent its outcome must be known: a cancelled caller gets
            # its cancellation only after the insert committed or failed.
            # What follows a run's insert happens even if the caller is cancelled meanwhile.
            committed = partial(self._committed, saga, notify, span)
            started_run = await uncancellable(
                store.start_run(
                    uuid7(),
                    saga.name,
                    saga.version,
                    key,
                    input_json,
                    saga.steps[0].name,
                    carrier,
                    notify,
                    saga.fingerprint,
                    conn,
                    roots=None if saga.graph is None else list(saga.graph.roots),
                    pivot=saga.pivot,
                    parent=parent,
                    traffic=traffic,
                ),
                committed,
            )
        other = started_run.existing_definition
        if (
            require_same_input
            and other is not None
            and (other[0] != saga.version or other[1] not in (None, saga.fingerprint))
        ):
            raise IdempotencyConflictError(
                f"idempotency key {key!r} of saga {saga.name!r} was used by run "
                f"{started_run.run_id} of another definition (version {other[0]}, "
                f"fingerprint {other[1]}; this start's: version {saga.version}, fingerprint "
                f"{saga.fingerprint}); use a new key, or pass require_same_input=False to "
                "get that run",
                started_run.run_id,
            )
        existing = started_run.existing_input
        if (
            require_same_input
            and existing is not None
            and not same_input(existing, input_json, model)
        ):
            raise IdempotencyConflictError(
                f"idempotency key {key!r} of saga {saga.name!r} was used by run "
                f"{started_run.run_id} with a different input; use a new key, or pass "
                "require_same_input=False to get that run",
                started_run.run_id,
            )
        return RunHandle(self, started_run.run_id, created=started_run.created)

    def _committed(
        self, saga: Saga[Any], notified: bool, span: Span, started_run: StartResult
    ) -> None:
        """A start's insert is done: its span names the run; for a new run, the trailing
        wake-up (unless its statement notified), the count, the log line, and the local
        orchestrator's claim."""
        span.set_attribute(RUN_ID, str(started_run.run_id))
        span.set_attribute(CREATED, started_run.created)
        if started_run.created:
            if not notified:
                self._notifier.after_commit(saga.name)
            self.telemetry.runs_started.add(1, {SAGA: saga.name})
            logger.debug("run_started", run_id=str(started_run.run_id), saga=saga.name)
            self._started_locally(saga)

    def _started_locally(self, saga: Saga[Any]) -> None:
        """A run of ``saga`` was committed by this process (an orchestrator claims it)."""

    # -- runs ---------------------------------------------------------------------------------

    def get_run(self, run_id: uuid.UUID | str) -> RunHandle:
        """A handle on an existing run (by id), e.g. one started by another process
        (``created`` is False: this call created nothing)."""
        self._check_open()
        return RunHandle(self, _checks.run_id(run_id, ConfigurationError), created=False)

    async def _row(self, run_id: uuid.UUID) -> RunRow:
        row = await self._store_or_raise().get_run(run_id)
        if row is None:
            raise RunNotFoundError(run_id)
        return row

    async def info(self, run_id: uuid.UUID | str) -> RunInfo:
        """The run's current state."""
        return (await self._row(_checks.run_id(run_id, ConfigurationError))).info

    async def history(self, run_id: uuid.UUID | str) -> list[HistoryEvent]:
        """The run's events in order: what ran, when, where, which attempt, what failed."""
        run_id = _checks.run_id(run_id, ConfigurationError)
        events = await self._store_or_raise().get_events(run_id)
        if not events:
            await self._row(run_id)  # raises RunNotFoundError for an unknown id
        return events

    async def unclaimable_runs(self) -> dict[DefinitionKey, int]:
        """Active runs of definitions this client did not register, by (saga name,
        version, fingerprint; None: started before fingerprints were recorded). They wait
        for an orchestrator that has their definition: watch this during deploys."""
        return await self._store_or_raise().count_unclaimable(self._definitions)


def store_of(client: Any) -> Store:
    """The store of an open client, for the operator functions taking one: a clear
    ConfigurationError for anything else (only its type is named: a DSN holds secrets)."""
    if not isinstance(client, Client):
        raise ConfigurationError(
            f"expected a saga.Client or saga.Orchestrator, got {type(client).__name__}"
        )
    return client._store_or_raise()
