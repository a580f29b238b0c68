"""Operator actions over many runs (a filter), and the runs that need an operator.

Bulk actions are bounded and confirmed: the caller says how many runs it may touch at
most (``limit``) and, optionally, how many it expects (``expect``: the count an operator
saw and confirmed); when more match, or another count does, nothing changes. Each run
is then acted on by itself, exactly as the single action would (one fenced statement,
its own history event with ``by`` and ``note``): a run whose state refuses the action
is reported, never forced.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from saga import _checks
from saga._acting import operator_data
from saga._checks import show
from saga._client import Client, store_of
from saga._errors import ConfigurationError, InvalidRunStateError, RunNotFoundError
from saga._model import RunStatus
from saga._operator import MAX_PAGE_SIZE, Age, RunPage, _statuses, runs_page
from saga._store_ops import Position

#: The most runs one bulk action may touch.
MAX_BULK = 10_000

Statuses = Iterable[RunStatus | str] | RunStatus | str | None


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs a bulk action (or :func:`count_matching`) covers: the filters of
    :func:`saga.list_runs`."""

    saga: str | None = None
    status: Statuses = None
    key: str | None = None
    older_than: Age | None = None
    newer_than: Age | None = None


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk action did: the runs it acted on, and the runs whose state refused
    it, with the reason (``matched`` = both)."""

    acted: list[uuid.UUID] = field(default_factory=list)
    refused: dict[uuid.UUID, str] = field(default_factory=dict)

    @property
    def matched(self) -> int:
        return len(self.acted) + len(self.refused)


async def _matching(client: Client, where: RunFilter, cap: int) -> list[uuid.UUID]:
    """The ids of the runs matching, newest first, at most ``cap`` + 1 of them. A page
    goes on from the place of the last run of the one before, which a prune may have
    deleted meanwhile (with all the page): runs of earlier pages pruned since are left
    out, and the paging goes on until ``cap`` + 1 runs that exist were seen."""
    ids: list[uuid.UUID] = []
    status = _statuses(where.status)  # once: an iterator would be used up by one page
    position: Position | None = None
    while True:
        page: RunPage = await runs_page(
            client,
            saga=where.saga,
            status=status,
            key=where.key,
            older_than=where.older_than,
            newer_than=where.newer_than,
            before=position,
            limit=min(MAX_PAGE_SIZE, cap + 1 - len(ids)),
        )
        ids += [run.id for run in page.runs]
        more = page.next_before is not None
        if position is not None and (len(ids) > cap or not more):
            # Past the first page: what a prune took since is left out (the count may
            # then fall back to the cap, and the paging goes on).
            existing = await store_of(client).existing_runs(ids)
            ids = [run_id for run_id in ids if run_id in existing]
        if len(ids) > cap or not more:
            return ids
        position = Position(page.runs[-1].created_at, page.runs[-1].id)


def _check_limit(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BULK:
        raise ConfigurationError(f"{name} must be an int from 1 to {MAX_BULK}, got {show(value)}")
    return value


def _check_expect(value: object) -> None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BULK
    ):
        raise ConfigurationError(
            f"expect must be None or an int from 0 to {MAX_BULK} (the count confirmed), "
            f"got {show(value)}"
        )


async def count_matching(
    client: Client,
    *,
    saga: str | None = None,
    status: Statuses = None,
    key: str | None = None,
    older_than: Age | None = None,
    newer_than: Age | None = None,
    cap: int = MAX_BULK,
) -> int:
    """How many runs match the filters (those of :func:`saga.list_runs`), counting at
    most ``cap`` + 1: a result above ``cap`` means "more than cap". What a bulk action
    would touch, for an operator to confirm (pass it as ``expect=``)."""
    where = RunFilter(saga, status, key, older_than, newer_than)
    return len(await _matching(client, where, _check_limit("cap", cap)))


async def _bulk(
    client: Client,
    where: RunFilter,
    limit: int,
    expect: int | None,
    act: Callable[[uuid.UUID], Awaitable[None]],
) -> BulkResult:
    _check_limit("limit", limit)
    _check_expect(expect)  # both before anything is read
    ids = await _matching(client, where, limit)
    if len(ids) > limit:
        raise ConfigurationError(
            f"more than limit={limit} runs match; narrow the filter or raise the limit "
            "(nothing was changed)"
        )
    if expect is not None and expect != len(ids):
        raise ConfigurationError(
            f"{len(ids)} runs match now, not the {expect} expected; look again "
            "(nothing was changed)"
        )
    result = BulkResult()
    for run_id in reversed(ids):  # oldest first
        try:
            await act(run_id)
        except InvalidRunStateError as e:
            result.refused[run_id] = str(e)
        except RunNotFoundError:
            result.refused[run_id] = f"run {run_id} was deleted meanwhile"
        else:
            result.acted.append(run_id)
    return result


async def cancel_runs(
    client: Client,
    *,
    limit: int,
    saga: str | None = None,
    status: Statuses = None,
    key: str | None = None,
    older_than: Age | None = None,
    newer_than: Age | None = None,
    expect: int | None = None,
    by: str | None = None,
    note: str | None = None,
) -> BulkResult:
    """Cancel every run matching the filters (those of :func:`saga.list_runs`), oldest
    first, as :meth:`RunHandle.cancel` would one by one; runs whose state refuses a
    cancel (ended, past their pivot) are reported in ``refused``. Raises
    :class:`ConfigurationError`, changing nothing, when more than ``limit`` runs match
    or (given ``expect``) another number than ``expect`` does."""
    operator_data(by, note)  # checked before anything is read

    async def act(run_id: uuid.UUID) -> None:
        if not await client._cancel(run_id, by, note):
            raise InvalidRunStateError(f"run {run_id} is already being cancelled (nothing changed)")

    where = RunFilter(saga, status, key, older_than, newer_than)
    return await _bulk(client, where, limit, expect, act)


async def retry_runs(
    client: Client,
    *,
    limit: int,
    saga: str | None = None,
    status: Statuses = None,
    key: str | None = None,
    older_than: Age | None = None,
    newer_than: Age | None = None,
    expect: int | None = None,
    by: str | None = None,
    note: str | None = None,
) -> BulkResult:
    """Retry every run matching the filters, oldest first, as :meth:`RunHandle.retry`
    would one by one (failed compensations, steps stopped for an operator, timed-out
    waits); runs in another state are reported in ``refused``. Bounded and confirmed
    like :func:`cancel_runs`."""
    operator_data(by, note)

    async def act(run_id: uuid.UUID) -> None:
        await client.retry(run_id, by=by, note=note)

    where = RunFilter(saga, status, key, older_than, newer_than)
    return await _bulk(client, where, limit, expect, act)


async def needs_attention(
    client: Client, *, limit: int = 50, after: uuid.UUID | str | None = None
) -> RunPage:
    """The runs waiting for an operator, oldest first: ``failed`` ones (a compensation
    gave up) and ``stopped`` ones (a step or a wait stopped for an operator), except
    those marked resolved. Keyset-paged through a partial index: pass the page's
    ``next_before`` as ``after`` for the next (newer) page. Raises
    :class:`RunNotFoundError` when ``after`` names no run (pruned meanwhile?)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ConfigurationError(
            f"limit must be an int from 1 to {MAX_PAGE_SIZE}, got {show(limit)}"
        )
    cursor = _checks.run_id(after, ConfigurationError) if after is not None else None
    store = store_of(client)
    if cursor is not None and not await store.run_exists(cursor):
        raise RunNotFoundError(cursor)
    runs = await store.needs_attention(limit + 1, cursor)
    if cursor is not None and not runs and not await store.run_exists(cursor):
        raise RunNotFoundError(cursor)  # pruned since it was checked: no page follows it
    page = runs[:limit]
    return RunPage(runs=page, next_before=page[-1].id if len(runs) > limit else None)
