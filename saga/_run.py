"""Handles on runs: status, history, waiting for the outcome, operator actions.

A handle holds a run id and the client that gave it out, nothing more: every method
asks the client, which reads the database when called.
"""

from __future__ import annotations

from typing import Any, Protocol
from uuid import UUID

from saga._model import HistoryEvent, RunInfo, RunStatus


class RunOps(Protocol):
    """The client's operations on one run (``saga.Client`` provides them)."""

    async def info(self, run_id: UUID) -> RunInfo: ...

    async def history(self, run_id: UUID) -> list[HistoryEvent]: ...

    async def result(self, run_id: UUID, timeout: float | None = None) -> Any: ...

    async def cancel(self, run_id: UUID) -> None: ...

    async def retry(self, run_id: UUID) -> None: ...

    async def signal(
        self, run_id: UUID | str, signal: Any, payload: Any, *, conn: Any = None
    ) -> bool: ...


class RunHandle:
    """A reference to one run, bound to the client (or orchestrator) that gave it out.

    Holding a handle costs nothing: every method reads the database when called.
    """

    def __init__(self, client: RunOps, run_id: UUID, *, created: bool = True) -> None:
        self._client = client
        self.id = run_id
        self.created = created
        """False when ``start()`` found an existing run with the same idempotency key."""

    def __repr__(self) -> str:
        return f"<RunHandle {self.id}>"

    async def info(self) -> RunInfo:
        """The run's current state."""
        return await self._client.info(self.id)

    async def status(self) -> RunStatus:
        return (await self.info()).status

    async def history(self) -> list[HistoryEvent]:
        """The run's events in order: what ran, when, where, which attempt, what failed."""
        return await self._client.history(self.id)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end; return its output (the last step's typed result).

        Raises :class:`RunCompensatedError`, :class:`RunCancelledError` or
        :class:`RunFailedError` when the run ended otherwise (:class:`RunStoppedError`:
        stopped for an operator at a timed-out wait), :class:`RunTimeoutError`
        when ``timeout`` seconds pass first (the run goes on), and :class:`LifecycleError`
        when the client closes meanwhile. Woken by NOTIFY; the client polls for all its
        waiters at once as a fallback, so a lost notification costs only latency.
        """
        return await self._client.result(self.id, timeout)

    async def cancel(self) -> None:
        """Cancel the run: the steps that completed are compensated, newest first.

        A step running right now finishes its attempt first (and is compensated if it
        completed, the last step included). A sleeping or waiting run (or one stopped at
        a wait) is compensated at once, without waiting for its timer. The run then ends
        ``cancelled``, or ``failed`` if a compensation gives up. A run stopped for an
        operator at a step that gave up (its retry policy's ``on_give_up="stop"``) is
        compensated and ends ``compensated`` with that step's error. Raises
        :class:`InvalidRunStateError` when the run already ended, or reached its pivot
        step (it only goes forward).
        """
        await self._client.cancel(self.id)

    async def retry(self) -> None:
        """Resume a ``failed`` run at the compensation that gave up, with fresh attempts;
        a ``stopped`` one at its timed-out wait, which waits again (a fresh timeout); or
        one stopped at a step that gave up (past its pivot, or its policy stops), which
        runs again with fresh attempts."""
        await self._client.retry(self.id)

    async def signal(self, signal: Any, payload: Any, *, conn: Any = None) -> bool:
        """Send this run the signal ``signal`` (a name or the :class:`Wait`) with
        ``payload``; see :meth:`Client.signal`. True when recorded, False for a repeat."""
        return await self._client.signal(self.id, signal, payload, conn=conn)
