"""Handles on runs: status, history, waiting for the outcome, operator actions.

A handle holds a run id and the client that gave it out, nothing more: every method
asks the client, which reads the database when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, cast
from uuid import UUID

from pydantic import BaseModel
from typing_extensions import TypeVar

from saga._model import HistoryEvent, RunInfo, RunStatus

if TYPE_CHECKING:
    from saga._db import Executor
    from saga._waits import Wait

P = TypeVar("P", bound=BaseModel)
#: A run's output type (its saga's ``output``; Any when the saga declares none).
OutputT = TypeVar("OutputT", default=Any)


class RunOps(Protocol):
    """The client's operations on one run (``saga.Client`` provides them)."""

    async def info(self, run_id: UUID) -> RunInfo: ...

    async def history(self, run_id: UUID) -> list[HistoryEvent]: ...

    async def result(self, run_id: UUID, timeout: float | None = None) -> Any: ...

    async def cancel(
        self, run_id: UUID, *, by: str | None = ..., note: str | None = ...
    ) -> None: ...

    async def retry(
        self, run_id: UUID, *, by: str | None = ..., note: str | None = ...
    ) -> None: ...

    async def resolve(self, run_id: UUID, *, note: str, by: str | None = ...) -> None: ...

    async def skip_compensation(self, run_id: UUID, *, note: str, by: str | None = ...) -> None: ...

    async def signal(
        self,
        run_id: UUID | str,
        wait_or_name: str | Wait[P],
        payload: P | Mapping[str, Any],
        *,
        conn: Executor | None = None,
        by: str | None = ...,
        note: str | None = ...,
    ) -> bool: ...


class RunHandle(Generic[OutputT]):
    """A reference to one run, bound to the client (or orchestrator) that gave it out.

    Holding a handle costs nothing: every method reads the database when called.
    """

    def __init__(self, client: RunOps, run_id: UUID, *, created: bool = True) -> None:
        self._client = client
        self.id = run_id
        self.created = created
        """Whether the call that gave out this handle inserted the run: False when
        ``start()`` found an existing run with the same idempotency key, and for a
        handle from ``get_run()``."""

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

    async def result(self, timeout: float | None = None) -> OutputT:
        """Wait for the run to end; return its output (the last step's typed result).

        Raises :class:`RunCompensatedError`, :class:`RunCancelledError` or
        :class:`RunFailedError` when the run ended otherwise (:class:`RunStoppedError`:
        stopped for an operator at a timed-out wait), :class:`RunTimeoutError`
        when ``timeout`` seconds pass first (the run goes on), and :class:`LifecycleError`
        when the client closes meanwhile. Woken by NOTIFY; the client polls for all its
        waiters at once as a fallback, so a lost notification costs only latency.
        """
        return cast("OutputT", await self._client.result(self.id, timeout))

    async def cancel(self, *, by: str | None = None, note: str | None = None) -> None:
        """Cancel the run: the steps that completed are compensated, newest first.

        A step running right now finishes its attempt first (and is compensated if it
        completed, the last step included). A sleeping or waiting run (or one stopped at
        a wait) is compensated at once, without waiting for its timer. The run then ends
        ``cancelled``, or ``failed`` if a compensation gives up. A run stopped for an
        operator at a step that gave up (its retry policy's ``on_give_up="stop"``) is
        compensated and ends ``compensated`` with that step's error. Raises
        :class:`InvalidRunStateError` when the run already ended, or reached its pivot
        step (it only goes forward).

        ``by`` (who) and ``note`` (why) are recorded in the history's
        ``cancel_requested`` event, as for every operator action.
        """
        await self._client.cancel(self.id, by=by, note=note)

    async def retry(self, *, by: str | None = None, note: str | None = None) -> None:
        """Resume a ``failed`` run at the compensation that gave up, with fresh attempts;
        a ``stopped`` one at its timed-out wait, which waits again (a fresh timeout); or
        one stopped at a step that gave up (past its pivot, or its policy stops), which
        runs again with fresh attempts. Recorded as ``run_retried`` with ``by`` and
        ``note``. A resolved run retried needs attention again if it fails again."""
        await self._client.retry(self.id, by=by, note=note)

    async def resolve(self, *, note: str, by: str | None = None) -> None:
        """Mark a ``failed`` or ``stopped`` run resolved: an operator looked at it and
        dealt with it outside saga (``note`` says how; required). Its state and history
        stay; it leaves the runs that need attention (:func:`saga.needs_attention`),
        ``RunInfo.resolved`` turns true, and ``run_resolved`` is recorded. A later
        retry or cancel makes it unresolved again. Raises :class:`InvalidRunStateError`
        for a run in another state or resolved already."""
        await self._client.resolve(self.id, note=note, by=by)

    async def skip_compensation(self, *, note: str, by: str | None = None) -> None:
        """Skip the compensation that gave up (the run is ``failed`` at it): an
        operator undid that step by hand, or decided it needs no undoing (``note`` says
        which; required). It is recorded as ``compensation_skipped`` (never as
        completed) and the rollback goes on with the remaining compensations, or the run
        ends ``compensated`` (``cancelled`` for a cancel's rollback) when none is left.
        Needs the saga's definition registered with this client (what is left depends
        on it: :class:`ConfigurationError` otherwise). Raises
        :class:`InvalidRunStateError` for a run not failed at a compensation."""
        await self._client.skip_compensation(self.id, note=note, by=by)

    async def signal(
        self,
        wait_or_name: str | Wait[P],
        payload: P | Mapping[str, Any],
        *,
        conn: Executor | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> bool:
        """Send this run the signal ``wait_or_name`` (a name or the :class:`Wait`) with
        ``payload``; see :meth:`Client.signal`. True when recorded, False for a repeat."""
        return await self._client.signal(
            self.id, wait_or_name, payload, conn=conn, by=by, note=note
        )
