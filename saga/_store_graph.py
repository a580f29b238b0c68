"""The store's graph items: claiming, writing, renewing and releasing the items of runs
whose steps run in parallel.

A part of :class:`~saga._store.Store` (a mixin). An item's write locks the run row and
reads its state and items (``graph_lock``, ``graph_items``), lets the plan decide (a
function of that state, called here, under the lock), then applies the change fenced by
the item's lease token and owner (``graph_write``). Whichever branch finishes last
decides the join, once.

Items finishing at about the same time share a transaction and its commit (group commit,
as plain runs' transitions do: see ``saga._group``), in rounds of one item per run, in
run id order: concurrent batches lock runs in one order, and the items of one run are
decided one after the other, each seeing the writes before it. An item whose fence fails
writes nothing and is refused alone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from saga._db import translate_errors
from saga._graph_plan import GraphChange, GraphRun, Item
from saga._group import BUSY, GroupCommit, fly
from saga._model import Phase, RunStatus
from saga._rows import claimed_item, events_json, json_or_none
from saga._store_ops import DefinitionKey, definition_args
from saga._transition import ClaimedItem, value

#: An item of a graph run: (run id, step, phase).
ItemKey = tuple[UUID, str, Phase]
#: One item's write: (worker, item, the lease token it holds, the plan's decision).
GraphWrite = tuple[str, ItemKey, int, Callable[[GraphRun], GraphChange]]


@value
class GraphWritten:
    """A graph item's change, written: the items leased to this worker, with tokens."""

    leased: tuple[tuple[str, Phase, int], ...]
    results: dict[str, str]  # the run's results after the change (JSON texts)
    completed: tuple[str, ...]
    age: float


def _graph_write_key(write: GraphWrite) -> tuple[ItemKey, int]:
    """What tells a batch's items apart: the item and the lease token its write holds."""
    return write[1], write[2]


class GraphQueries:
    """Needs ``pool``, ``hot``, ``_q``, ``work_channel`` and ``done_channel`` from the
    store. An item's claim, write, heartbeat and release are leasing statements: they go
    through ``hot`` (generic plans), as a plain run's do."""

    pool: asyncpg.Pool
    hot: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str
    done_channel: str
    _graphs: GroupCommit[GraphWrite, tuple[GraphChange, GraphWritten]]
    waiting: anyio.Semaphore | None
    flights: set[asyncio.Future[Any]]

    def graph_group(self) -> GroupCommit[GraphWrite, tuple[GraphChange, GraphWritten]]:
        """The group commit of items' writes (paced by ``Store.pace``)."""
        return GroupCommit(
            partial(self._graph_one, skip=True),
            partial(self._graph_many, skip=True),
            _graph_write_key,
            wait=self._graph_one,
            waiting=self.waiting,
            flights=self.flights,
        )

    async def claim_items(
        self, worker: str, limit: int, lease_seconds: float, definitions: Sequence[DefinitionKey]
    ) -> list[ClaimedItem]:
        async with translate_errors("claiming work"):
            rows = await self.hot.fetch(
                self._q["claim_items"], worker, limit, lease_seconds, *definition_args(definitions)
            )
        return [claimed_item(r) for r in rows]

    async def due_unclaimed(
        self,
        definitions: Sequence[DefinitionKey],
        graphs: Sequence[DefinitionKey],
        within: float,
    ) -> float | None:
        """Seconds until the next due run of ``definitions`` or item of ``graphs`` that
        no lease holds, looking ``within`` seconds ahead (None: none; 0 or less: due now,
        which the last claim passed, locked by another transaction)."""
        async with translate_errors("claiming work"):
            due: float | None = await self.hot.fetchval(
                self._q["due_unclaimed"],
                *definition_args(definitions),
                *definition_args(graphs),
                min(within, 86400.0),
            )
        return due

    async def last_failure(self, run_id: UUID) -> tuple[str | None, int | None, Any]:
        """The step, attempt and error record of the run's latest failure in its
        history (Nones: none)."""
        async with translate_errors("reading a run's history"):
            row = await self.hot.fetchrow(self._q["last_failure"], run_id)
        if row is None:
            return None, None, None
        return row["step"], row["attempt"], json.loads(row["error"])

    async def graph_write(
        self,
        worker: str,
        key: ItemKey,
        token: int,
        decide: Callable[[GraphRun], GraphChange],
    ) -> tuple[GraphChange, GraphWritten] | None:
        """Lock the run, decide, apply fenced: the change and what it leased here, or
        None when the item's lease was lost (nothing written)."""
        async with translate_errors("recording a transition"):
            return await self._graphs.write((worker, key, token, decide))

    async def _graph_one(
        self, write: GraphWrite, skip: bool = False
    ) -> tuple[GraphChange, GraphWritten] | None:
        outcome = (await self._graph_many([write], skip)).get(_graph_write_key(write))
        if isinstance(outcome, Exception):
            raise outcome  # the plan's decision failed
        return outcome

    async def _graph_many(
        self, writes: Sequence[GraphWrite], skip: bool = False
    ) -> dict[Hashable, Any]:
        """Items' writes in one transaction: the changes written, by item and token (or
        the exception an item's plan raised); an item whose fence failed is left out.
        ``skip``: a run whose row another transaction holds is not waited for: its items
        are ``BUSY`` (each written alone by its writer: see saga._group).

        In rounds of one item per run, in run id order (a stable sort: one run's items in
        the order they came): a round locks its runs (the first) and reads them and their
        items, lets each item's plan decide, then writes every item in one pipelined
        exchange (``fetchmany``). A run's next item, in the next round, sees the writes
        of the one before."""
        found: dict[Hashable, Any] = {}
        busy: set[UUID] | None = set() if skip else None
        async with self.hot.acquire() as conn, conn.transaction():
            for round_ in _rounds(sorted(writes, key=lambda w: w[1][0])):
                await self._graph_round(conn, round_, found, busy)
        return found

    async def _graph_round(
        self,
        conn: Any,
        writes: list[GraphWrite],
        found: dict[Hashable, Any],
        busy: set[UUID] | None,
    ) -> None:
        if busy is not None:
            writes = _not_busy(writes, found, busy)  # (its run's next items wait too)
            if not writes:
                return
        ids = [w[1][0] for w in writes]  # distinct, ascending
        lock = self._q["graph_lock" if busy is None else "graph_lock_skip"]
        runs = {r["id"]: r for r in await conn.fetch(lock, ids, ids[0], ids[-1])}
        if busy is not None and len(runs) < len(ids):  # skipped, or not a graph run
            held = await conn.fetch(self._q["graph_runs"], [i for i in ids if i not in runs])
            busy.update(r["id"] for r in held)  # (the others are refused)
            writes = _not_busy(writes, found, busy)
        items: dict[UUID, list[Item]] = {}
        for i in await conn.fetch(self._q["graph_items"], list(runs)):
            items.setdefault(i["run_id"], []).append(
                Item(i["step"], Phase(i["phase"]), i["leased"])
            )
        decided = _decide(writes, runs, items, found)
        if not decided:
            return
        rows = await conn.fetchmany(
            self._q["graph_write"], [self._write_args(w, c) for w, _, c in decided]
        )
        woken = []
        for (write, run, change), w in zip(decided, rows, strict=True):
            if w["held"] != 1:
                continue  # the item's lease was lost: it wrote nothing
            if w["ended_child"]:
                woken.append((write[1][0], self.work_channel))
            found[_graph_write_key(write)] = (change, _written(run, change, w))
        if woken:
            await conn.executemany(self._q["wake_parent"], woken)

    def _write_args(self, write: GraphWrite, change: GraphChange) -> tuple[Any, ...]:
        """The ``graph_write`` statement's arguments for one item."""
        worker, (run_id, step, phase), token, _ = write
        return (
            run_id,
            step,
            phase,
            token,
            worker,
            change.status,
            change.completed_step,
            change.result_json,
            change.compensated_step,
            change.output_json,
            json_or_none(change.error),
            json_or_none(change.compensation_error),
            change.retry_in,
            [s for s, _ in change.dropped],
            [p for _, p in change.dropped],
            [n.step for n in change.new],
            [n.phase for n in change.new],
            [n.lease_seconds for n in change.new],
            events_json(worker, change.events),
            self.done_channel,
            self.work_channel,
            change.undo_now,
            change.lost,
        )

    async def item_lease(self, key: ItemKey) -> tuple[int, str | None] | None:
        """An item's lease (token, owner); None: the item is gone."""
        run_id, step, phase = key
        async with translate_errors("reading a run's items"):
            row = await self.pool.fetchrow(self._q["item_lease"], run_id, step, str(phase))
        return None if row is None else (row["lease_token"], row["lease_owner"])

    async def items_leased_to(
        self, run_id: UUID, worker: str, by: tuple[str, str | None, int | None] | None = None
    ) -> list[ClaimedItem]:
        """The first attempts of this run's items this worker holds, as claimed; ``by``:
        only those the write beginning with this event (kind, step, attempt) leased."""
        kind, step, attempt = by or (None, None, None)
        async with translate_errors("reading a run's items"):
            rows = await self.pool.fetch(
                self._q["items_leased_to"], run_id, worker, kind, step, attempt
            )
        return [claimed_item(r) for r in rows]

    async def heartbeat_items(
        self, worker: str, leases: Sequence[tuple[ItemKey, int, float]]
    ) -> dict[ItemKey, bool]:
        """Extend ((run id, step, phase), token, seconds) leases; returns those held, and
        whether their run was asked to cancel."""
        beat = self.hot.fetch(
            self._q["heartbeat_items"],
            worker,
            [k[0] for k, _, _ in leases],
            [k[1] for k, _, _ in leases],
            [k[2] for k, _, _ in leases],
            [token for _, token, _ in leases],
            [seconds for _, _, seconds in leases],
        )
        async with translate_errors("heartbeat"):
            rows = await fly(self.flights, beat)  # (see Store.heartbeat)
        return {
            (r["run_id"], r["step"], Phase(r["phase"])): bool(r["cancel_requested"]) for r in rows
        }

    async def release_items(
        self,
        worker: str,
        keep: Sequence[tuple[ItemKey, int]] = (),
        unstarted: Sequence[ItemKey] = (),
    ) -> int:
        """Give back every graph item leased to ``worker`` (its loops have ended) but
        ``keep`` (item, token), not counting the attempts of ``unstarted``."""
        args = [[k[0][0] for k in keep], [k[0][1] for k in keep], [str(k[0][2]) for k in keep]]
        tokens = [k[1] for k in keep]
        idle = [
            [k[0] for k in unstarted],
            [k[1] for k in unstarted],
            [str(k[2]) for k in unstarted],
        ]
        async with translate_errors("releasing leases"):
            rows = await self.hot.fetch(
                self._q["release_items"], worker, self.work_channel, *args, tokens, *idle
            )
        return len(rows)


def _decide(
    writes: list[GraphWrite],
    runs: dict[UUID, Any],
    items: dict[UUID, list[Item]],
    found: dict[Hashable, Any],
) -> list[tuple[GraphWrite, GraphRun, GraphChange]]:
    """Each item's plan decides from its locked run: the changes to write (an item whose
    plan raised writes nothing: its outcome is the exception)."""
    decided: list[tuple[GraphWrite, GraphRun, GraphChange]] = []
    for write in writes:
        r = runs.get(write[1][0])
        if r is None:
            continue  # not a graph run (any more): refused
        run = _graph_run(r, items.get(write[1][0], ()))
        try:
            decided.append((write, run, write[3](run)))
        except Exception as exc:  # nothing of this item is written
            found[_graph_write_key(write)] = exc
    return decided


def _not_busy(
    writes: list[GraphWrite], found: dict[Hashable, Any], busy: set[UUID]
) -> list[GraphWrite]:
    """The writes whose runs are not ``busy``; the others' outcomes are ``BUSY``."""
    kept = []
    for write in writes:
        if write[1][0] in busy:
            found[_graph_write_key(write)] = BUSY
        else:
            kept.append(write)
    return kept


def _rounds(writes: list[GraphWrite]) -> list[list[GraphWrite]]:
    """Writes (sorted by run) in rounds of at most one item per run: a run's second item
    goes in the second round, and so on."""
    rounds: list[list[GraphWrite]] = []
    seen: dict[UUID, int] = {}
    for write in writes:
        n = seen[write[1][0]] = seen.get(write[1][0], -1) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(write)
    return rounds


def _graph_run(r: Any, items: Sequence[Item]) -> GraphRun:
    """A locked run's state, as the plan decides from it."""
    return GraphRun(
        status=RunStatus(r["status"]),
        completed=tuple(r["completed_steps"]),
        compensated=tuple(r["compensated_steps"]),
        results=json.loads(r["results"]),
        cancel_requested=r["cancel_requested"],
        failed_forward=r["has_error"],
        compensation_failed=r["compensation_failed"],
        items=tuple(items),
        failed_step=r["failed_step"],
    )


def _written(run: GraphRun, change: GraphChange, w: Any) -> GraphWritten:
    """What an item's write leased to this worker, and the run's results after it."""
    results = dict(run.results)
    completed = run.completed
    if change.completed_step is not None:
        if change.result_json is not None:
            results[change.completed_step] = change.result_json
        completed = (*completed, change.completed_step)
    leased = tuple(
        (s, Phase(p), t)
        for s, p, t in zip(w["leased_steps"], w["leased_phases"], w["leased_tokens"], strict=True)
    )
    return GraphWritten(leased, results, completed, w["age"] or 0.0)
