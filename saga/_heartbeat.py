"""Heartbeats: the renewal of the leases one worker holds, half of
:class:`saga._lease.Leases` (which owns the lease state; this half reads and updates it).

Every third of the shortest lease, one statement renews every responsive lease; the
answer tells which were lost (their attempts are cancelled) and which runs were asked
to cancel. A run whose row another transaction holds is skipped by that statement and
renewed on a connection of its own, waiting for the lock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import anyio
from anyio.abc import TaskGroup, TaskStatus

from saga._errors import DatabaseError
from saga._held import Lease
from saga._log import Outage, logger
from saga._store import Store
from saga._store_graph import ItemKey


class Heartbeats:
    """The heartbeat loop and the renewals of :class:`saga._lease.Leases`."""

    # The lease state, set up by Leases.__init__.
    _store: Store
    _worker: str
    _heartbeat_every: float
    _outage: Outage
    inflight: dict[UUID | ItemKey, Lease]
    _given_up: set[Lease]  # attempts ignoring their timeout (_responsive)
    _renewals: TaskGroup | None  # the heartbeat loop's (see _renew_alone)
    _renewing: set[UUID | ItemKey]
    _slot_freed: anyio.Event
    _wake: anyio.Event

    async def heartbeat_loop(self, *, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as self._renewals:
            task_status.started()
            try:
                while True:
                    await anyio.sleep(self._heartbeat_every)
                    now = anyio.current_time()
                    held = list(self.inflight.values())
                    leases = [lease for lease in held if self._responsive(lease, now)]
                    if leases:
                        await self._beat(leases)
            finally:
                self._renewals = None

    async def renew(self, lease: Lease) -> None:
        """Renew ``lease`` now, by its length (saga._call: an attempt whose step leases
        for less than the claim did), as a heartbeat would."""
        if not lease.stalled:
            await self._beat([lease])

    def _responsive(self, lease: Lease, now: float) -> bool:
        """Whether heartbeats renew ``lease``: not a stalled one (saga.testing's
        expire_lease), nor one whose attempt ignored its timeout's cancellation for the
        grace saga._call gives it. That attempt's lease then expires, and another attempt
        takes over."""
        if lease.stalled:
            return False
        if lease.unresponsive_at > now:
            return True
        lease.stalled = True
        logger.error("step_unresponsive", worker=self._worker, **lease.log_fields())
        self._given_up.add(lease)  # its slot goes to other work
        self._slot_freed.set()
        self._wake.set()
        return False

    async def _beat(self, leases: list[Lease]) -> None:
        sent = {lease.key: lease.token for lease in leases}
        runs = [(ls.run_id, ls.token, ls.seconds) for ls in leases if ls.item is None]
        items = [(ls.item_key, ls.token, ls.seconds) for ls in leases if ls.item is not None]
        try:
            held: dict[Any, bool | None] = {}
            if runs:
                held.update(await self._store.heartbeat(self._worker, runs))
            if items:
                held.update(await self._store.heartbeat_items(self._worker, items))
        except DatabaseError as exc:
            self._outage.lost("heartbeat", exc)
            return
        self._outage.back()
        self._heard(sent, held)
        for lease in leases:
            if lease.item is None and lease.key in held and held[lease.key] is None:
                self._renew_alone(lease)

    def _renew_alone(self, lease: Lease) -> None:
        """The heartbeat skipped ``lease``: another transaction held its run's row (a
        caller's transaction that sent it a signal). Renew it on a connection of its own,
        waiting for that lock, so that the lease is renewed the moment the lock is
        released (the other leases' heartbeats wait for no one)."""
        if self._renewals is None or lease.key in self._renewing:
            return
        waiting = self._store.waiting  # a connection each: a quarter of the pool at most
        if waiting is None:
            return  # (the next heartbeat tries again)
        try:
            waiting.acquire_nowait()
        except anyio.WouldBlock:
            return
        self._renewing.add(lease.key)
        self._renewals.start_soon(self._renewal, lease, waiting)

    async def _renewal(self, lease: Lease, waiting: anyio.Semaphore) -> None:
        beat = [(lease.run_id, lease.token, lease.seconds)]
        try:
            held = await self._store.heartbeat(self._worker, beat, wait=True)
        except DatabaseError:
            return  # (the next heartbeat tries again)
        finally:
            waiting.release()
            self._renewing.discard(lease.key)
        if held:  # (missing, it may have been given back meanwhile by the run's own write,
            # which waited for the same lock: the next heartbeat tells a lost lease)
            self._heard({lease.key: lease.token}, dict(held))

    def _heard(self, sent: dict[Any, int], held: dict[Any, bool | None]) -> None:
        """A heartbeat's answer: a cancel requested is noted, a lease missing was lost
        (its attempt is cancelled)."""
        for key, token in sent.items():
            lease = self.inflight.get(key)
            if lease is not None and held.get(key):
                lease.cancel_requested = True  # the runner rolls back after this step
            if key in held or lease is None or lease.token != token or lease.writing:
                # Still ours, or the run moved on to a new lease meanwhile, or its outcome
                # is being written: that fenced write tells whether the lease held (a
                # run's end that committed after the heartbeat was sent is no loss).
                continue
            lease.lost = True
            lease.scope.cancel()
            logger.warning("lease_lost", worker=self._worker, **lease.log_fields())


def heartbeat_interval(lease_seconds: Sequence[float]) -> float:
    """Heartbeats go every third of the shortest lease this worker may hold."""
    return min(lease_seconds, default=math.inf) / 3
