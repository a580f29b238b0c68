"""Operator actions on one run, part of :class:`~saga.Client` (a mixin): cancel it, retry
it where it stopped for an operator, mark it resolved, skip the compensation that gave up.

Each action is one fenced statement that also appends its event to the run's history,
with who acted (``by``) and why (``note``) when given; when it changes nothing, the run's
state says why (already ended, already cancelling, past its pivot step, not stopped).
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from saga import _checks
from saga._aio import uncancellable
from saga._claims import RETRIABLE_STATUS, RETRIED_STATUS, REWAITABLE_STATUS, REWAITED_STATUS
from saga._errors import ConfigurationError, InvalidRunStateError, RunNotFoundError
from saga._log import log_event, logger
from saga._model import Phase, RunInfo, RunStatus
from saga._skip import plan_skip

if TYPE_CHECKING:
    from saga._definition import Saga
    from saga._store import Store
    from saga._store_reads import RunRow
    from saga._telemetry import Telemetry

#: Longest operator name and note an action records.
MAX_BY_LENGTH = 200
MAX_NOTE_LENGTH = 4000


def operator_data(by: str | None, note: str | None, *, note_required: bool = False) -> str | None:
    """What an action's event records of the operator (JSON), checked: ``by`` and
    ``note`` are str without NUL, bounded; ``note_required`` for the actions that need a
    reason (resolving, skipping). None when neither is given."""
    data: dict[str, str] = {}
    if by is not None:
        data["by"] = _checks.who("by", by, ConfigurationError, max_length=MAX_BY_LENGTH)
    if note is not None or note_required:
        if note_required and (not isinstance(note, str) or not note.strip()):
            raise ConfigurationError(f"a note is required (why), got {_checks.show(note)}")
        data["note"] = _checks.text("note", note, ConfigurationError, max_length=MAX_NOTE_LENGTH)
    return json.dumps(data) if data else None


class Acting:
    """Needs ``_store_or_raise``, ``_row``, ``info``, ``definition`` and ``_sagas`` from
    the client it is part of."""

    if TYPE_CHECKING:  # provided by the client
        _sagas: dict[tuple[str, int], Saga[Any]]

        def _store_or_raise(self) -> Store: ...

        async def _row(self, run_id: uuid.UUID) -> RunRow: ...

        async def info(self, run_id: uuid.UUID) -> RunInfo: ...

        def definition(self, name: str, version: int) -> Saga[Any] | None: ...

        telemetry: Telemetry

    async def cancel(
        self, run_id: uuid.UUID | str, *, by: str | None = None, note: str | None = None
    ) -> None:
        """Cancel a run; see :meth:`RunHandle.cancel`."""
        await self._cancel(run_id, by, note)

    async def _cancel(self, run_id: uuid.UUID | str, by: str | None, note: str | None) -> bool:
        """:meth:`cancel`: True when it recorded the cancel, False when one was already."""
        run_id = _checks.run_id(run_id, ConfigurationError)
        data = operator_data(by, note)
        store = self._store_or_raise()
        if await uncancellable(store.request_cancel(run_id, data)):
            return True
        row = await self._row(run_id)
        info = row.info
        if info.status.is_terminal and _freed(info):
            raise InvalidRunStateError(f"run {run_id} is {info.status}{_freed(info)}")
        reached = (
            row.pivot in info.completed_steps
            or not info.status.is_terminal
            or (info.status is RunStatus.STOPPED and info.step == row.pivot)
        )
        if row.pivot is not None and not info.cancel_requested and reached:
            raise InvalidRunStateError(
                f"run {run_id} reached its pivot step {row.pivot!r}: it only goes forward "
                "now (a run stopped after it is retried, not cancelled)"
            )
        if info.status.is_terminal:
            raise InvalidRunStateError(f"run {run_id} already ended {info.status}{_freed(info)}")
        return False  # already requested: cancelling twice is harmless

    async def retry(
        self, run_id: uuid.UUID | str, *, by: str | None = None, note: str | None = None
    ) -> None:
        """Resume a failed or stopped run; see :meth:`RunHandle.retry`."""
        run_id = _checks.run_id(run_id, ConfigurationError)
        data = operator_data(by, note)
        store = self._store_or_raise()
        compensation, step = Phase.COMPENSATION, Phase.STEP
        if await uncancellable(
            store.retry_run(run_id, RETRIABLE_STATUS, RETRIED_STATUS, compensation, data)
        ):
            return
        if await uncancellable(store.rewait_run(run_id, REWAITABLE_STATUS, REWAITED_STATUS, data)):
            return
        if await uncancellable(
            store.retry_run(run_id, REWAITABLE_STATUS, RunStatus.RUNNING, step, data)
        ):
            return  # stopped after its pivot: the step that gave up runs again
        info = await self.info(run_id)
        if info.resolved:
            raise InvalidRunStateError(f"run {run_id} is {info.status}{_freed(info)}")
        if info.status in (RETRIABLE_STATUS, REWAITABLE_STATUS):
            raise _changed(run_id, info.status, "retry")
        raise InvalidRunStateError(
            f"run {run_id} is {info.status}; only {RETRIABLE_STATUS} and "
            f"{REWAITABLE_STATUS} runs can be retried"
        )

    async def resolve(self, run_id: uuid.UUID | str, *, note: str, by: str | None = None) -> None:
        """Mark a failed or stopped run resolved; see :meth:`RunHandle.resolve`."""
        run_id = _checks.run_id(run_id, ConfigurationError)
        data = operator_data(by, note, note_required=True)
        assert data is not None
        limits = {  # the registered keyed sagas' limits (the latest version's, of a name)
            s.name: s.traffic.limit
            for s in sorted(self._sagas.values(), key=lambda s: s.version)
            if s.traffic.key is not None
        }
        if await uncancellable(self._store_or_raise().resolve_run(run_id, data, limits)):
            return
        info = await self.info(run_id)
        if info.resolved:
            raise InvalidRunStateError(f"run {run_id} is resolved already")
        if info.status in (RunStatus.FAILED, RunStatus.STOPPED):
            raise _changed(run_id, info.status, "resolve")
        raise InvalidRunStateError(
            f"run {run_id} is {info.status}; only failed and stopped runs can be resolved"
        )

    async def skip_compensation(
        self, run_id: uuid.UUID | str, *, note: str, by: str | None = None
    ) -> None:
        """Skip the compensation that gave up; see :meth:`RunHandle.skip_compensation`."""
        run_id = _checks.run_id(run_id, ConfigurationError)
        data = operator_data(by, note, note_required=True)
        assert data is not None
        store = self._store_or_raise()
        state = await store.rollback_state(run_id)
        if state is None:
            raise RunNotFoundError(run_id)
        if state["status"] != RunStatus.FAILED or not state["compensation_failed"]:
            raise InvalidRunStateError(
                f"run {run_id} is {state['status']}; only a failed run whose compensation "
                "gave up can skip it"
            )
        if state["key_freed"]:
            raise InvalidRunStateError(
                f"run {run_id} is resolved: resolving it freed its concurrency key for the "
                "next run, so its compensations can no longer run"
            )
        saga = self.definition(state["saga_name"], state["saga_version"])
        if saga is None or state["fingerprint"] not in (None, saga.fingerprint):
            raise ConfigurationError(
                f"skipping a compensation needs the definition of saga "
                f"{state['saga_name']!r} version {state['saga_version']} the run started "
                f"with (fingerprint {state['fingerprint']}; what is left to undo depends on "
                "it): pass it to this client's sagas= (saga CLI: --target)"
            )
        skip = plan_skip(saga, dict(state), json.loads(data))
        limit = saga.traffic.limit if saga.traffic.key is not None else None
        if not await uncancellable(store.skip_compensation(run_id, skip, limit)):
            raise InvalidRunStateError(
                f"run {run_id} changed meanwhile (another operator acted on it); look again"
            )
        log = logger.bind(run_id=str(run_id), saga=saga.name)
        for event in json.loads(skip.events_json):  # (as a worker logs what it wrote)
            log_event(log, event["kind"], event["step"], None, None)
        if skip.ends is not None:  # nothing left to undo: the run ended here, not in a worker
            info = await self.info(run_id)
            took = None if info.finished_at is None else info.finished_at - info.created_at
            age = None if took is None else took.total_seconds()
            self.telemetry.run_ended(saga.name, str(skip.ends), age)


def _freed(info: RunInfo) -> str:
    """Why an ended run's retry or cancel was refused, when resolving it was the reason."""
    if not info.resolved or info.concurrency_key is None:
        return ""
    return (
        ", and resolved: resolving it freed its concurrency key for the next run, so it "
        "can no longer be retried or cancelled"
    )


def _changed(run_id: uuid.UUID, status: RunStatus, action: str) -> InvalidRunStateError:
    """An action refused while the run was elsewhere (a retry running it again), read
    back once it is where the action applies again: say so, rather than contradict."""
    return InvalidRunStateError(
        f"run {run_id} was not {status} when the {action} was made (it changed meanwhile, "
        f"e.g. another retry ran it) and is {status} again now; look again and repeat the "
        f"{action} if it still applies"
    )
