"""Operator actions on one run, part of :class:`~saga.Client` (a mixin): cancel it, or
retry it where it stopped for an operator.

Each action is one fenced statement; when it changes nothing, the run's state says why
(already ended, already cancelling, past its pivot step, not stopped)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from saga._aio import uncancellable
from saga._claims import RETRIABLE_STATUS, RETRIED_STATUS, REWAITABLE_STATUS, REWAITED_STATUS
from saga._errors import InvalidRunStateError
from saga._model import Phase, RunInfo, RunStatus

if TYPE_CHECKING:
    from saga._store import RunRow, Store


class Acting:
    """Needs ``_store_or_raise``, ``_row`` and ``info`` from the client it is part of."""

    if TYPE_CHECKING:  # provided by the client

        def _store_or_raise(self) -> Store: ...

        async def _row(self, run_id: uuid.UUID) -> RunRow: ...

        async def info(self, run_id: uuid.UUID) -> RunInfo: ...

    async def cancel(self, run_id: uuid.UUID) -> None:
        """Cancel a run; see :meth:`RunHandle.cancel`."""
        store = self._store_or_raise()
        if await uncancellable(store.request_cancel(run_id)):
            return
        row = await self._row(run_id)
        info = row.info
        reached = row.pivot in info.completed_steps or not info.status.is_terminal
        if row.pivot is not None and not info.cancel_requested and reached:
            raise InvalidRunStateError(
                f"run {run_id} reached its pivot step {row.pivot!r}: it only goes forward "
                "now (a run stopped after it is retried, not cancelled)"
            )
        if info.status.is_terminal:
            raise InvalidRunStateError(f"run {run_id} already ended {info.status}")
        # Already requested: cancelling twice is harmless.

    async def retry(self, run_id: uuid.UUID) -> None:
        """Resume a failed or stopped run; see :meth:`RunHandle.retry`."""
        store = self._store_or_raise()
        compensation, step = Phase.COMPENSATION, Phase.STEP
        if await uncancellable(
            store.retry_run(run_id, RETRIABLE_STATUS, RETRIED_STATUS, compensation)
        ):
            return
        if await uncancellable(store.rewait_run(run_id, REWAITABLE_STATUS, REWAITED_STATUS)):
            return
        if await uncancellable(store.retry_run(run_id, REWAITABLE_STATUS, RunStatus.RUNNING, step)):
            return  # stopped after its pivot: the step that gave up runs again
        info = await self.info(run_id)
        raise InvalidRunStateError(
            f"run {run_id} is {info.status}; only {RETRIABLE_STATUS} and "
            f"{REWAITABLE_STATUS} runs can be retried"
        )
