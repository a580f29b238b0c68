"""The operator commands of ``saga``: ``runs``, ``show``, ``stats``, ``retry``, ``cancel``,
``prune``.

Each is a thin layer over the Python API (:mod:`saga._operator`, :class:`~saga.RunHandle`)
on a client that :mod:`saga._cli` opened; it prints a table for people or,
with ``--json``, JSON for scripts, and returns the exit code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import cast
from uuid import UUID

from saga._cli_args import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from saga._cli_render import (
    _attempt_json,
    _clean,
    _Ctx,
    _duration,
    _error,
    _event_json,
    _info_json,
    _table,
    _time,
)
from saga._client import Client
from saga._model import RunStatus
from saga._operator import (
    MAX_PAGE_SIZE,
    PRUNABLE_BY_DEFAULT,
    count_runs_by_saga,
    list_runs,
    prune,
)
from saga._timeline import timeline


async def _runs(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    statuses = None if args.status is None else [s for group in args.status for s in group]
    page = await list_runs(
        orch,
        saga=args.saga,
        status=statuses,
        older_than=args.older_than,
        newer_than=args.newer_than,
        before=args.before,
        limit=args.limit,
        key=args.key,
    )
    if ctx.as_json:
        ctx.emit({"runs": [_info_json(r) for r in page.runs], "next_before": page.next_before})
        return EXIT_OK
    if not page.runs:
        ctx.note("no runs match")
        return EXIT_OK
    rows = [
        [
            str(r.id),
            r.saga if r.version == 1 else f"{r.saga} v{r.version}",
            str(r.status) + (" (cancel requested)" if r.cancel_requested else ""),
            r.step or "-",
            str(r.attempt) if r.step else "-",
            _time(r.created_at),
            _duration(r.finished_at - r.created_at) if r.finished_at else "-",
            _error(r.compensation_error or r.error),
        ]
        for r in page.runs
    ]
    headers = ["RUN", "SAGA", "STATUS", "STEP", "ATTEMPT", "CREATED (UTC)", "TOOK", "ERROR"]
    _table(ctx, headers, rows)
    if page.next_before is not None:
        ctx.note(f"more: add --before {page.next_before}")
    return EXIT_OK


async def _show(ctx: _Ctx, orch: Client) -> int:
    handle = orch.get_run(await _run_to_show(ctx, orch))
    info = await handle.info()
    history = await handle.history()
    attempts = timeline(history)
    if ctx.as_json:
        ctx.emit(
            {
                "run": _info_json(info),
                "attempts": [_attempt_json(a) for a in attempts],
                "events": [_event_json(e) for e in history],
            }
        )
        return EXIT_OK
    took = f" (took {_duration(info.finished_at - info.created_at)})" if info.finished_at else ""
    fields = [
        ("run", str(info.id)),
        ("saga", f"{info.saga} v{info.version}"),
        ("key", info.key or "-"),
        ("status", str(info.status) + (" (cancel requested)" if info.cancel_requested else "")),
        ("step", f"{info.step} (attempt {info.attempt})" if info.step else "-"),
        ("worker", info.worker or "-"),
        ("created", _time(info.created_at) + " UTC"),
        ("finished", _time(info.finished_at) + " UTC" + took if info.finished_at else "-"),
        ("error", _error(info.error, full=True)),
        ("compensation error", _error(info.compensation_error, full=True)),
    ]
    for name, value in fields:
        ctx.say(f"{name + ':':<20}{_clean(value)}")
    ctx.say()
    rows = [
        [
            a.step,
            "compensation" if a.compensation else "step",
            str(a.attempt),
            a.worker or "-",
            _time(a.started_at, precise=True) if a.started_at else "-",
            _duration(timedelta(seconds=a.duration)) if a.duration is not None else "-",
            a.outcome + (f" (retry in {a.retry_in:.2f}s)" if a.retry_in is not None else ""),
            _error(a.error),
        ]
        for a in attempts
    ]
    if rows:
        headers = ["STEP", "PHASE", "ATTEMPT", "WORKER", "STARTED", "TOOK", "OUTCOME", "ERROR"]
        _table(ctx, headers, rows)
    else:
        ctx.say("no attempts yet")
    if ctx.args.events:
        ctx.say()
        for event in history:
            ctx.say(_clean(event.describe()))
    return EXIT_OK


async def _run_to_show(ctx: _Ctx, orch: Client) -> UUID:
    """The run ``saga show`` names: RUN, or the one run started with --key (in --saga)."""
    args = ctx.args
    if (args.run is None) == (args.key is None):
        ctx.fail(EXIT_USAGE, "name the run by its id (RUN) or by --key KEY, not both")
    if args.run is not None:
        if args.saga is not None:
            ctx.fail(EXIT_USAGE, "--saga goes with --key; a run id names one run already")
        return cast(UUID, args.run)
    runs = (await list_runs(orch, key=args.key, saga=args.saga, limit=MAX_PAGE_SIZE)).runs
    where = f" in saga {args.saga!r}" if args.saga is not None else ""
    if not runs:
        ctx.fail(EXIT_NOT_FOUND, f"no run with key {args.key!r}{where}")
    if len(runs) > 1:
        names = ", ".join(sorted(repr(r.saga) for r in runs))
        ctx.fail(
            EXIT_USAGE,
            f"key {args.key!r} is used by runs of {len(runs)} sagas ({names}): "
            "pick one with --saga NAME",
        )
    return runs[0].id


async def _stats(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    counts = await count_runs_by_saga(
        orch, saga=args.saga, older_than=args.older_than, newer_than=args.newer_than
    )
    total = {s: sum(by_status[s] for by_status in counts.values()) for s in RunStatus}
    if ctx.as_json:

        def row(by_status: dict[RunStatus, int]) -> dict[str, int]:
            return {**{s.value: n for s, n in by_status.items()}, "total": sum(by_status.values())}

        ctx.emit({"sagas": {name: row(c) for name, c in counts.items()}, "total": row(total)})
        return EXIT_OK
    rows = [
        [label, *(str(by_status[s]) for s in RunStatus), str(sum(by_status.values()))]
        for label, by_status in [*counts.items(), ("(total)", total)]
    ]
    _table(ctx, ["SAGA", *(s.value.upper() for s in RunStatus), "TOTAL"], rows)
    return EXIT_OK


async def _retry(ctx: _Ctx, orch: Client) -> int:
    handle = orch.get_run(ctx.args.run)
    before = await handle.info()  # where it stopped: a worker may move it on at once
    await handle.retry()
    if ctx.as_json:
        ctx.emit({"run": _info_json(await handle.info()), "action": "retry"})
    else:
        where = "compensation" if before.compensation_error is not None else "step"
        ctx.say(f"run {before.id}: retrying, resuming at {where} {_clean(before.step or '-')!r}")
    return EXIT_OK


async def _cancel(ctx: _Ctx, orch: Client) -> int:
    handle = orch.get_run(ctx.args.run)
    await handle.cancel()
    info = await handle.info()
    if ctx.as_json:
        ctx.emit({"run": _info_json(info), "action": "cancel"})
    else:
        ctx.say(f"run {info.id}: cancel requested; completed steps will be compensated")
    return EXIT_OK


async def _prune(ctx: _Ctx, orch: Client) -> int:
    args = ctx.args
    statuses = (*PRUNABLE_BY_DEFAULT, RunStatus.FAILED) if args.include_failed else None
    result = await prune(
        orch,
        older_than=args.older_than,
        status=statuses or PRUNABLE_BY_DEFAULT,
        batch_size=args.batch_size,
        dry_run=args.dry_run,
    )
    if ctx.as_json:
        ctx.emit(
            {
                "runs": result.runs,
                "events": result.events,
                "batches": result.batches,
                "dry_run": result.dry_run,
            }
        )
    else:
        verb = "would delete" if result.dry_run else "deleted"
        batches = "" if result.dry_run else f" in {result.batches} batch(es)"
        ctx.say(
            f"{verb} {result.runs} runs and {result.events} events{batches} "
            f"(finished more than {_duration(args.older_than)} ago)"
        )
    return EXIT_OK


#: The operator commands by name, for saga._cli's dispatch.
COMMANDS: dict[str, Callable[[_Ctx, Client], Awaitable[int]]] = {
    "runs": _runs,
    "show": _show,
    "stats": _stats,
    "retry": _retry,
    "cancel": _cancel,
    "prune": _prune,
}
