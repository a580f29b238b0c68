"""Sending signals: validated against the run's definition, then one commit.

A part of :class:`~saga.Client` (a mixin): a signal's payload is checked (its wait exists
in the run's saga, the payload validates against the wait's model and fits the size
limit) under the run's row lock and before anything is written; then the store records
it, wakes the run if it is at that wait, and NOTIFYs the workers when it commits (in the
caller's transaction when a connection is given).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic

from saga import _checks
from saga._acting import operator_data
from saga._aio import uncancellable
from saga._codec import encode
from saga._db import Executor
from saga._definition import Saga
from saga._errors import (
    ConfigurationError,
    DefinitionError,
    InvalidInputError,
    InvalidRunStateError,
    RunNotFoundError,
)
from saga._input import encode_valid
from saga._log import logger
from saga._notify import WorkNotifier
from saga._registry import check_conn
from saga._store import Store
from saga._store_signals import Delivery, RunDefinition
from saga._waits import Wait

P = TypeVar("P", bound=pydantic.BaseModel)

_MAX_KEY_LENGTH = 512


class Signalling:
    """Needs ``_store_or_raise``, ``definition``, ``max_payload_bytes`` and
    ``_notifier`` from the client it is part of."""

    max_payload_bytes: int
    _notifier: WorkNotifier

    if TYPE_CHECKING:  # provided by the client

        def _store_or_raise(self) -> Store: ...

        def definition(self, name: str, version: int) -> Saga[Any] | None: ...

    async def signal(
        self,
        run_id: uuid.UUID | str,
        wait_or_name: str | Wait[P],
        payload: P | Mapping[str, Any],
        *,
        conn: Executor | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> bool:
        """Send the signal ``wait_or_name`` (a name, or the :class:`Wait` object) with
        ``payload`` to a run, from any process.

        The payload is validated against the wait's model and size-checked before
        anything is written (:class:`InvalidInputError`, :class:`PayloadTooLargeError`,
        as for ``start()``). A signal that arrives before the run reaches its wait is kept
        for it. Returns True when recorded, False when a signal of that name was recorded
        first (the first wins; nothing changed). Raises :class:`RunNotFoundError` for an
        unknown run, and :class:`InvalidRunStateError` when the run has ended, is rolling
        back (cancelled, or a step failed for good), or its wait was already decided
        (timed out): the refusal is recorded in the run's history. With ``conn`` (an
        asyncpg connection in an open transaction) the signal is written in that
        transaction: it exists, and the run is woken, only when the caller commits. One
        statement, one commit (a name also reads which saga the run belongs to, to find
        the wait's model). ``by`` and ``note`` (an operator sending it by hand: who and
        why) go into the history's ``signal_received`` event.
        """
        rid = _checks.run_id(run_id, ConfigurationError)
        data = operator_data(by, note)
        check_conn(conn)
        store = self._store_or_raise()
        if isinstance(wait_or_name, Wait):
            wait: Wait[Any] = wait_or_name
        else:
            _checks.text("signal name", wait_or_name, InvalidInputError, max_length=128)
            found = await store.run_definition(rid, conn)
            if found is None:
                raise RunNotFoundError(rid)
            wait = self._wait(found, wait_or_name)
        payload_json = self._payload(wait, payload)
        saga = (wait.saga.name, wait.saga.version, wait.saga.fingerprint)
        return await self._deliver(rid, wait.name, payload_json, saga, conn, data)

    async def _signal_unchecked(
        self,
        run_id: uuid.UUID,
        name: str,
        payload: Mapping[str, Any],
        saga: tuple[str, int],
        *,
        by: str | None = None,
        note: str | None = None,
    ) -> bool:
        """:meth:`signal` to a run of a saga not registered here (the dashboard without
        its definitions): ``payload``, a JSON object, is stored as it is (size-checked,
        never validated: the worker reads it against the wait's model)."""
        what = f"payload of signal {name!r}"
        payload_json = encode(dict(payload), Any, what=what, max_bytes=self.max_payload_bytes)
        data = operator_data(by, note)
        unchecked = (*saga, None)  # any definition of that name and version
        return await self._deliver(run_id, name, payload_json, unchecked, None, data)

    async def _deliver(
        self,
        rid: uuid.UUID,
        name: str,
        payload_json: str,
        saga: tuple[str, int, str | None],
        conn: Executor | None,
        data: str | None,
    ) -> bool:
        store = self._store_or_raise()
        # As for starts: under load one signal per window NOTIFYs in its statement (a
        # NOTIFY makes its commit wait for the others' WAL flush); the others are covered
        # by a trailing one. In the caller's transaction it goes out at their commit.
        notify = conn is not None or self._notifier.claim(saga[0])
        send = store.send_signal(rid, name, payload_json, saga, conn, data, notify)

        def delivered(delivery: Delivery) -> None:  # (even if the caller is cancelled)
            if not notify and delivery is Delivery.ACCEPTED:
                self._notifier.after_commit(saga[0])

        if conn is not None:
            delivery = await send
            delivered(delivery)
        else:
            delivery = await uncancellable(send, delivered)
        return _outcome(delivery, rid, name, saga)

    async def signal_key(
        self,
        saga: Saga[Any] | str,
        key: str,
        wait_or_name: str | Wait[P],
        payload: P | Mapping[str, Any],
        *,
        conn: Executor | None = None,
        by: str | None = None,
        note: str | None = None,
    ) -> bool:
        """:meth:`signal` to the run of ``saga`` started with the idempotency ``key``
        (the business id a webhook carries); an unknown key is a
        :class:`RunNotFoundError`."""
        if isinstance(saga, Saga):
            saga_name = saga.name
        else:  # a name: anything else could only reach the database as garbage
            saga_name = _checks.text(
                "saga (a saga.Saga or its name)", saga, ConfigurationError, max_length=128
            )
        _checks.text("idempotency key", key, InvalidInputError, max_length=_MAX_KEY_LENGTH)
        if not isinstance(wait_or_name, Wait):
            _checks.text("signal name", wait_or_name, InvalidInputError, max_length=128)
        check_conn(conn)
        found = await self._store_or_raise().run_by_key(saga_name, key, conn)
        if found is None:
            raise RunNotFoundError(key=key, saga=saga_name)
        wait = wait_or_name
        if not isinstance(wait, Wait):
            wait = self._wait(found, wait)
        return await self.signal(found.run_id, wait, payload, conn=conn, by=by, note=note)

    def _wait(self, run: RunDefinition, name: str) -> Wait[Any]:
        """The wait ``name`` of the run's registered definition (raises)."""
        definition = self.definition(run.saga_name, run.saga_version)
        if definition is not None and run.fingerprint not in (None, definition.fingerprint):
            raise DefinitionError(
                f"run {run.run_id} is a run of saga {run.saga_name!r} v{run.saga_version} "
                f"as defined with fingerprint {run.fingerprint}; this client registers it "
                f"with fingerprint {definition.fingerprint} (another definition: its waits "
                "may differ): send the signal from a process with the run's definition"
            )
        if definition is None:
            raise DefinitionError(
                f"run {run.run_id} is a run of saga {run.saga_name!r} v{run.saga_version}, "
                "which is not registered with this client (its waits' models validate "
                "signals): register it"
            )
        wait = definition.get_wait(name)
        if wait is None:
            known = ", ".join(repr(w.name) for w in definition.waits()) or "none"
            raise InvalidInputError(
                f"saga {run.saga_name!r} has no wait for a signal named {name!r} "
                f"(its signals: {known})"
            )
        return wait

    def _payload(self, wait: Wait[Any], payload: Any) -> str:
        """The payload's JSON, validated against the wait's model (raises)."""
        what = f"payload for signal {wait.name!r}"
        stored_as = f"payload of signal {wait.name!r}"
        return encode_valid(wait.model, payload, what, stored_as, self.max_payload_bytes)[1]


def _outcome(
    delivery: Delivery, run_id: uuid.UUID, name: str, saga: tuple[str, int, str | None]
) -> bool:
    if delivery is Delivery.ACCEPTED:
        logger.debug("signal_received", run_id=str(run_id), saga=saga[0], signal=name)
        return True
    if delivery is Delivery.REPEATED:
        return False
    if delivery is Delivery.NOT_FOUND:
        raise RunNotFoundError(run_id)
    if delivery is Delivery.OTHER_SAGA:
        raise InvalidInputError(
            f"run {run_id} is not a run of saga {saga[0]!r} v{saga[1]} as defined here "
            f"(fingerprint {saga[2]}), whose wait {name!r} this is"
        )
    if delivery is Delivery.ENDED:
        raise InvalidRunStateError(
            f"run {run_id} has ended: signal {name!r} refused (recorded in its history)"
        )
    if delivery is Delivery.RESOLVED:
        raise InvalidRunStateError(
            f"run {run_id} is stopped and resolved: resolving it freed its concurrency key "
            f"for the next run, so it can no longer go on: signal {name!r} refused "
            "(recorded in its history)"
        )
    if delivery is Delivery.ROLLING_BACK:
        raise InvalidRunStateError(
            f"run {run_id} is rolling back (cancelled, or a step failed) and will wait for "
            f"nothing: signal {name!r} refused (recorded in its history)"
        )
    raise InvalidRunStateError(
        f"run {run_id} no longer waits for {name!r} (its wait timed out, or the run was "
        "cancelled): signal refused (recorded in its history)"
    )
