"""Leases: the only owner of lease state.

The claim loop leases due work (``FOR UPDATE SKIP LOCKED`` in one statement), hands each
item to the runner, and sleeps until woken (a NOTIFY, a freed slot) or until the next due
item this worker knows of (one timer: a retry's backoff, a poll, or due work a claim
passed, held by another transaction: looked at again soon). The heartbeat loop (its
half of this class is in ``saga._heartbeat``) renews the leases held and cancels a step
whose lease was lost. At shutdown the leases of
unfinished items are given back. Other modules read a :class:`Lease` and ask this module
to change it; they never write its fields.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from uuid import UUID

import anyio
from anyio.abc import TaskGroup, TaskStatus

from saga._errors import DatabaseError
from saga._heartbeat import Heartbeats
from saga._held import Lease
from saga._log import Outage, logger
from saga._model import Phase
from saga._store import Store
from saga._store_batch import ClaimAlong
from saga._store_graph import ItemKey
from saga._store_ops import DefinitionKey
from saga._transition import ClaimedItem

#: How soon the claim loop claims again due work its last claim passed (see _idle), and
#: how far apart those looks grow while it stays held: a row released after a long hold is
#: claimed within a second, not after twice the hold.
_RECHECK = 0.02
_RECHECK_MAX = 1.0

Handler = Callable[[ClaimedItem, Lease], Coroutine[Any, Any, None]]


class Leases(Heartbeats):
    """Claims, heartbeats, the wake-up timer and the release of one worker's leases."""

    def __init__(
        self,
        store: Store,
        *,
        worker_id: str,
        concurrency: int,
        lease_seconds: float,
        heartbeat_every: float,
        poll_interval: float,
        definitions: Sequence[DefinitionKey],
        outage: Outage,
        graphs: Sequence[DefinitionKey] = (),
        prioritized: bool = False,
    ) -> None:
        self._store = store
        self._worker = worker_id
        self._concurrency = concurrency
        self._lease_seconds = lease_seconds
        self._heartbeat_every = heartbeat_every
        self._poll = poll_interval
        self._definitions = list(definitions)
        self._graphs = list(graphs)  # the definitions whose runs are graphs of items
        self._prioritized = prioritized  # some saga has priorities: claim urgent first
        self._outage = outage
        self.inflight: dict[UUID | ItemKey, Lease] = {}
        #: Runs a transition claimed along, waiting for a task whose run just ended.
        self._handoff: deque[tuple[ClaimedItem, Lease]] = deque()
        self._dead: dict[UUID | ItemKey, int] = {}  # crashed by saga.testing: key -> token
        # The claim in flight, in a task of its own: a shutdown does not cancel it (see
        # claim_loop), it waits for it a little before giving the leases back.
        self._claiming: asyncio.Future[list[ClaimedItem]] | None = None
        self._given_up: set[Lease] = set()  # attempts ignoring their timeout (_responsive)
        self._renewals: TaskGroup | None = None  # the heartbeat loop's (see _renew_alone)
        self._renewing: set[UUID | ItemKey] = set()
        self._spawn: Callable[[ClaimedItem, Lease], None] | None = None
        self._wake = anyio.Event()
        self._slot_freed = anyio.Event()
        self._reserved = 0  # free slots that work about to be leased here will take
        self._drained = anyio.Event()
        self._more_work = False
        self._sleep: anyio.CancelScope | None = None  # the claim loop's wait, if waiting
        self._next_due = math.inf  # the one timer: when a known item comes due
        self._recheck = _RECHECK  # (see _idle)
        self.stopping = False
        #: What a transition that frees a slot carries to claim the next due run in its
        #: own statement and commit (not for graph items: the claim loop claims those).
        self._along = store.claim_along(
            worker_id, lease_seconds, self._definitions, prioritized, self._claimed_along
        )

    # -- the claim loop -----------------------------------------------------------------------

    def wake(self) -> None:
        """Claim again now."""
        self._wake.set()

    def wake_later(self, delay: float) -> None:
        """Claim again once ``delay`` passes (a retry this worker scheduled comes due):
        the claim loop's one timer moves earlier if need be."""
        due = anyio.current_time() + max(delay, 0.0)
        self._next_due = min(self._next_due, due)
        sleep = self._sleep
        if sleep is not None:
            sleep.deadline = min(sleep.deadline, due)

    @property
    def timer_owed(self) -> bool:
        """Whether this worker knew of work coming due (its one timer is set): when it
        shuts down, the other workers are woken to look for it themselves."""
        return self._next_due < math.inf

    def free_slots(self) -> int:
        return self._concurrency - self._busy() - self._reserved

    def reserve(self, at_most: float = math.inf) -> int:
        """Take the free slots (``at_most`` of them) for work about to be leased here (a
        claim in flight, a graph write that may lease the steps it makes ready): no other
        may lease into them meanwhile, or the worker would run more than its concurrency.
        How many."""
        taken = int(max(min(self.free_slots(), at_most), 0))
        self._reserved += taken
        return taken

    def unreserve(self, taken: int) -> None:
        """Give back what :meth:`reserve` took (the work it leased is held by now)."""
        self._reserved -= taken
        if taken:
            self._slot_freed.set()

    def _busy(self) -> int:
        """The slots taken: the leases held, but those of attempts given up (they run on
        uncounted until they end, their run moves on, or another attempt takes it)."""
        if self._given_up:
            inflight = self.inflight
            self._given_up = {
                ls for ls in self._given_up if ls.stalled and inflight.get(ls.key) is ls
            }
        return len(self.inflight) - len(self._given_up)

    def along(self) -> ClaimAlong | None:
        """A claim for a transition that frees a slot to carry, when there is likely
        more due work than this worker holds (the last claim filled every free slot)."""
        if (
            not self._more_work
            or self.stopping
            or self._graphs
            or self._spawn is None
            or self._busy() > self._concurrency
        ):
            return None
        return self._along

    def _claimed_along(self, items: list[ClaimedItem], asked: int) -> None:
        """Runs the transitions of a batch claimed for the slots they free: each goes on
        in the task of a run that just ended (``take_over``), which saves a task per run;
        the claim loop spawns what no such task took (see ``finished``)."""
        for item in items:
            lease = Lease(item.run_id, item.lease_token, self._lease_seconds)
            if self._hold(lease):
                self._handoff.append((item, lease))
        self._more_work = len(items) == asked

    def _hold(self, lease: Lease) -> bool:
        """A new lease of this worker; False when this worker holds it already (the same
        token: a write whose reply was lost adopted it from the database while the claim
        that leased it was on its way back): it runs once. When it holds what an older
        lease of ours held (that lease expired while its heartbeats did not get through,
        and we claimed the run again), the older one is lost: its step is cancelled, as a
        refused heartbeat would. Not under saga.testing's expire_lease (``stalled``), which
        plays a worker too stalled to notice: that attempt goes on, and its writes are
        refused. Nor when the older one's outcome is being written (``writing``): that
        write gave the item back (a retry due at once, claimed while its task still
        resolves a lost reply), or its fence refuses it; either way it tells."""
        old = self.inflight.get(lease.key)
        if old is not None and old.token == lease.token and not old.lost:
            return False
        self.inflight[lease.key] = lease
        if old is not None and old is not lease and not (old.lost or old.stalled or old.writing):
            old.lost = True
            old.scope.cancel()
            logger.warning("lease_lost", worker=self._worker, **old.log_fields())
        return True

    def take_over(self) -> tuple[ClaimedItem, Lease] | None:
        """A run claimed along, for the task of a run that just ended, or None."""
        return self._handoff.popleft() if self._handoff else None

    def _spawn_handed_off(self) -> None:
        """Runs claimed along that no ending run's task took: a task each."""
        assert self._spawn is not None
        while self._handoff:
            self._spawn(*self._handoff.popleft())

    def adopt(self, item: ClaimedItem, lease: Lease) -> None:
        """Run an item a transition of this worker leased to it (a graph run's new
        branch), in a task of its own."""
        assert self._spawn is not None
        if self._hold(lease):
            self._spawn(item, lease)

    async def claim_loop(
        self, tg: TaskGroup, run: Handler, *, task_status: TaskStatus[None]
    ) -> None:

        def spawn(item: ClaimedItem, lease: Lease) -> None:
            tg.start_soon(run, item, lease)

        self._spawn = spawn
        task_status.started()
        delay = 0.1
        while not self.stopping:
            self._spawn_handed_off()
            free = self.free_slots()
            if free <= 0:
                # Full: wait for a free slot, not for a wake-up (a pending one would make
                # this loop spin until a run finishes).
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
                if not self._more_work and not self.stopping:
                    await self._idle()  # a transition's claim found no more due work
                continue
            self._wake = anyio.Event()
            free = self.reserve()
            try:
                # Not cancelled in flight: a claim the server commits after its caller
                # went would lease runs to a worker whose shutdown already released
                # what it held (they would wait for their lease to expire). A shutdown
                # waits for it (release_all), a little.
                claim = self._claiming = asyncio.ensure_future(self._claim(free))
                claim.add_done_callback(_retrieve)
                items = await asyncio.shield(claim)
            except DatabaseError as exc:
                self.unreserve(free)
                self._outage.lost("claiming work", exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except BaseException:
                self.unreserve(free)
                raise
            self._reserved -= free  # (what it leased is held below, before any await)
            self._outage.back()
            delay = 0.1
            for item in items:
                held = None if item.phase is None else (item.step_name, item.phase)
                lease = Lease(item.run_id, item.lease_token, self._lease_seconds, item=held)
                if self._hold(lease):
                    tg.start_soon(run, item, lease)
            self._more_work = len(items) == free
            if not self._more_work:
                await self._idle()

    async def _claim(self, free: int) -> list[ClaimedItem]:
        """Due runs, then (graph sagas registered) due items, up to ``free``."""
        items = await self._store.claim(
            self._worker, free, self._lease_seconds, self._definitions, self._prioritized
        )
        if self._graphs and len(items) < free:
            items += await self._store.claim_items(
                self._worker, free - len(items), self._lease_seconds, self._graphs
            )
        return items

    async def _idle(self) -> None:
        """The last claim found no more due work: wait for some. Due work it passed
        (rows another transaction held locked: nobody announces their release) is
        claimed again soon: after 20 ms, doubling up to a second while it stays held.
        Work coming due before the poll is claimed when the database's clock says so
        (a timer of ours that fired a moment early does not sleep until the poll)."""
        try:
            due = await self._store.due_unclaimed(self._definitions, self._graphs, self._poll)
        except DatabaseError as exc:
            # Not known: look again soon (the next claim reports an outage, if it is one).
            logger.debug("due_unclaimed_failed", error_type=type(exc.__cause__).__name__)
            due = 0.0
        passed = due is not None and due <= 0
        if passed:
            self.wake_later(self._recheck)
        elif due is not None:
            self.wake_later(due)
        self._recheck = min(self._recheck * 2, _RECHECK_MAX, self._poll) if passed else _RECHECK
        await self._sleep_until_woken()

    async def _sleep_until_woken(self) -> None:
        """Until a wake-up, the timer, or the poll interval, whichever comes first."""
        now = anyio.current_time()
        with anyio.CancelScope(deadline=min(now + self._poll, self._next_due)) as self._sleep:
            await self._wake.wait()
        self._sleep = None
        if anyio.current_time() >= self._next_due:
            self._next_due = math.inf

    def finished(self, item: ClaimedItem, lease: Lease) -> None:
        """The runner is done with ``item`` (whatever happened): its slot is free.

        The same run may have been claimed again meanwhile (our own lease expired during
        a stall): the entry goes only if it is still this lease.
        """
        if self.inflight.get(lease.key) is lease:
            del self.inflight[lease.key]
            self._slot_freed.set()
            if self._more_work or self._handoff:
                # (the claim loop runs after the tasks this batch's results woke: what
                # they leave of the runs claimed along, it spawns)
                self._wake.set()
            if self.stopping and self._handoff:
                self._spawn_handed_off()  # the claim loop is gone
            if not self.inflight:
                self._drained.set()

    # -- shutdown -------------------------------------------------------------------------------

    def died(self, lease: Lease) -> None:
        """saga.testing crashed the attempt under ``lease``: as a dead worker's, it stays
        held until it expires (release_all leaves it)."""
        lease.mark_lost()
        self._dead[lease.key] = lease.token

    def stall(self, run_id: UUID, step: str | None) -> None:
        """Heartbeats leave the lease of ``run_id`` (or of its item ``step``) alone from
        now on, as if its worker had stalled (saga.testing's expire_lease)."""
        keys: list[UUID | ItemKey] = (
            [run_id] if step is None else [run_id, (run_id, step, Phase.STEP)]
        )
        for key in keys:
            lease = self.inflight.get(key)
            if lease is not None:
                lease.stalled = True
                # Its slot goes to other work, as a step given up's does: the takeover
                # may run here (a worker of one slot, or of all its slots busy, too).
                self._given_up.add(lease)
                self._slot_freed.set()
                self._wake.set()

    async def drain(self, timeout: float) -> None:
        """No new claims; wait up to ``timeout`` for the running items to finish."""
        self.stopping = True
        self._wake.set()
        self._slot_freed.set()
        if self._spawn is not None:
            self._spawn_handed_off()  # leased already: they run, as the others do
        with anyio.move_on_after(timeout):
            while self.inflight:
                self._drained = anyio.Event()
                await self._drained.wait()

    async def release_all(self, hurry: bool = False) -> None:
        """Give back every lease this worker holds (its loops have ended; shielded by the
        caller), so another worker takes the items at once; the interrupted attempts do
        not count (once). By owner, not by the leases known here: a write cancelled in
        flight may have committed a lease its runner never learnt of (the next step, or
        a run claimed along). So the claim and the writes in flight (see saga._group),
        which may still lease work here, end first (a little patience). ``hurry``: the
        close already waited out its patience (a step ignoring its cancellation): one
        try at the give-back, a second at most, and what is left expires."""
        flying = [f for f in (self._claiming, *self._store.flights) if f and not f.done()]
        if flying and not hurry:
            with anyio.move_on_after(_FLIGHT_PATIENCE):  # (what they lease goes back below)
                await asyncio.wait(flying)
        for flight in flying:
            flight.cancel()  # held up (a lock): what it may still lease expires
        held = len(self.inflight)
        # Attempts still waiting for a rate limit's token never started: not counted.
        unstarted = [k for k, lease in self.inflight.items() if lease.unstarted]
        self.inflight.clear()
        runs = [(k, token) for k, token in self._dead.items() if not isinstance(k, tuple)]
        items = [(k, token) for k, token in self._dead.items() if isinstance(k, tuple)]
        idle_runs = [k for k in unstarted if not isinstance(k, tuple)]
        idle_items = [k for k in unstarted if isinstance(k, tuple)]
        with anyio.move_on_after(1 if hurry else 5):
            try:
                released = await self._store.release(self._worker, runs, idle_runs)
                released += await self._store.release_items(self._worker, items, idle_items)
                if released:
                    logger.info("leases_released", count=released, worker=self._worker)
            except DatabaseError as exc:
                logger.warning(
                    "lease_release_failed",
                    error_type=type(exc.__cause__).__name__,
                    leases=held,
                )


#: How long a shutdown waits for a claim or writes in flight before giving its leases back.
_FLIGHT_PATIENCE = 5.0


def _retrieve(claim: asyncio.Future[Any]) -> None:
    """A claim's outcome no one awaits any more (a shutdown came): read, not warned of."""
    if not claim.cancelled():
        claim.exception()
