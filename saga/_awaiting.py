"""Waiting for a run to end, part of :class:`~saga.Client` (a mixin): woken by the
run's NOTIFY when it ends (a watched run sends one), with a poll as the fallback, so a
lost notification only costs latency; a database away is waited out until the deadline.
"""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING, Any

import anyio

from saga import _checks
from saga._codec import Unreadable, decode_stored
from saga._errors import ConfigurationError, DatabaseError, LifecycleError, RunTimeoutError
from saga._model import RunStatus

if TYPE_CHECKING:
    from saga._definition import Saga
    from saga._listener import Listener
    from saga._store import Store
    from saga._store_reads import RunRow

#: How long a result's read of its run may wait, at least, for a connection and the
#: answer, whatever is left of its timeout (a timeout of 0 reads the run once).
_READ_AT_LEAST = 0.1


class Awaiting:
    """Needs ``_store_or_raise``, ``_row``, ``definition``, ``_listener`` and
    ``poll_interval`` from the client it is part of."""

    if TYPE_CHECKING:  # provided by the client

        def _store_or_raise(self) -> Store: ...

        async def _row(self, run_id: uuid.UUID) -> RunRow: ...

        def definition(self, name: str, version: int) -> Saga[Any] | None: ...

        _listener: Listener | None
        poll_interval: float

    async def result(self, run_id: uuid.UUID | str, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its output; see :meth:`RunHandle.result`."""
        run_id = _checks.run_id(run_id, ConfigurationError)
        store = self._store_or_raise()
        assert self._listener is not None
        waiters = self._listener.waiters
        if timeout is not None:
            timeout = _checks.seconds("timeout", timeout, ConfigurationError, allow_zero=True)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        watched = False
        while True:
            waiter = waiters.subscribe(run_id)
            try:
                try:
                    # The reads wait for a connection too: bounded by the deadline (at
                    # least a moment, so that a timeout of 0 reads the run once).
                    with anyio.move_on_after(
                        max(deadline - anyio.current_time(), _READ_AT_LEAST)
                    ) as reading:
                        # Only watched runs NOTIFY when they end (no lock). A run just
                        # found active by its watch has nothing to read until it does.
                        fresh = not watched and await store.watch_run(run_id)
                        watched = watched or fresh
                        remaining = deadline - anyio.current_time()
                        row = None if fresh and remaining > 0 else await self._row(run_id)
                    if reading.cancelled_caught:
                        raise RunTimeoutError(
                            f"run {run_id}: the database did not answer within {timeout} "
                            "seconds (no connection of the pool was free, or the server "
                            "was slow)"
                        )
                except DatabaseError:
                    # The database is away (restart, failover): keep waiting until the
                    # deadline, as the run itself will resume when it is back.
                    if anyio.current_time() >= deadline:
                        raise
                    await anyio.sleep(min(self.poll_interval, deadline - anyio.current_time()))
                    continue
                if row is not None and row.info.status.is_terminal:
                    return self._outcome(row)
                if row is not None and remaining <= 0:
                    raise RunTimeoutError(
                        f"run {run_id} is still {row.info.status} after {timeout} seconds"
                    )
                with anyio.move_on_after(remaining):
                    await waiter.wait()
                if waiters.closed is not None:
                    raise LifecycleError(waiters.closed)
            finally:
                waiters.unsubscribe(run_id, waiter)

    def _outcome(self, row: RunRow) -> Any:
        info = row.info
        if info.status is RunStatus.COMPLETED:
            definition = self.definition(info.saga, info.version)
            known = definition is not None and row.fingerprint in (None, definition.fingerprint)
            result_type = definition.output_type if definition and known else Any
            output = decode_stored(row.output, result_type, f"output of run {info.id}")
            if isinstance(output, Unreadable):
                raise output.error  # a SerializationError: the definition changed under it
            return output
        raise info.ended_error()
