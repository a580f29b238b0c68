"""The operator actions of ``saga``: ``cancel``, ``retry`` (one run, or every run of a
filter with ``--all``), ``resolve``, ``skip-compensation``, and ``attention`` (the runs
waiting for an operator).

Each is a thin layer over the Python API (:class:`~saga.RunHandle`, :func:`saga.cancel_runs`,
:func:`saga.retry_runs`, :func:`saga.needs_attention`), and records who acted (``--by``,
by default the user running the command) and why (``--note``) in the run's history.
A bulk action first prints how many runs match and changes nothing; ``--expect N``
(the count it printed) or ``--yes`` makes it act.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from saga._bulk import BulkResult, cancel_runs, count_matching, needs_attention, retry_runs
from saga._cli_args import EXIT_OK, EXIT_USAGE
from saga._cli_ops import runs_table
from saga._cli_render import _clean, _Ctx, _info_json
from saga._client import Client
from saga._model import RunStatus


def _filters(ctx: _Ctx) -> dict[str, Any]:
    args = ctx.args
    statuses = None if args.status is None else [s for group in args.status for s in group]
    return {
        "saga": args.saga,
        "status": statuses,
        "key": args.key,
        "older_than": args.older_than,
        "newer_than": args.newer_than,
    }


def _check_target(ctx: _Ctx) -> None:
    """RUN or --all with filters, not both (usage errors, exit 2)."""
    args = ctx.args
    if (args.run is None) == (not args.all):
        ctx.fail(EXIT_USAGE, "name one run (RUN) or act on every match of the filters (--all)")
    if args.run is not None and any(v is not None for v in _filters(ctx).values()):
        ctx.fail(EXIT_USAGE, "filters (--saga, --status, ...) go with --all")
    if args.run is not None and (args.yes or args.expect is not None):
        ctx.fail(EXIT_USAGE, "--yes and --expect go with --all")


async def _bulk(
    ctx: _Ctx, orch: Client, verb: str, act: Callable[..., Awaitable[BulkResult]]
) -> int:
    args = ctx.args
    where = _filters(ctx)
    if not args.yes and args.expect is None:
        count = await count_matching(orch, cap=args.limit, **where)
        over = count > args.limit
        shown = f"more than {args.limit}" if over else str(count)
        if ctx.as_json:
            ctx.emit({"action": verb, "matching": count, "over_limit": over, "changed": 0})
        else:
            ctx.say(
                f"{shown} runs match; nothing changed. To {verb} them: add --expect {count}"
                if not over
                else f"{shown} runs match (--limit {args.limit}); nothing changed: narrow "
                "the filters or raise --limit"
            )
        return EXIT_OK
    result = await act(
        orch, limit=args.limit, expect=args.expect, by=ctx.by, note=args.note, **where
    )
    if ctx.as_json:
        refused = {str(run): why for run, why in result.refused.items()}
        ctx.emit({"action": verb, "acted": [str(r) for r in result.acted], "refused": refused})
        return EXIT_OK
    ctx.say(f"{verb}: {len(result.acted)} runs; refused: {len(result.refused)}")
    for run, why in result.refused.items():
        ctx.say(f"  {run}: {_clean(why)}")
    return EXIT_OK


async def _retry(ctx: _Ctx, orch: Client) -> int:
    _check_target(ctx)
    if ctx.args.all:
        return await _bulk(ctx, orch, "retry", retry_runs)
    handle = orch.get_run(ctx.args.run)
    before = await handle.info()  # where it stopped: a worker may move it on at once
    await handle.retry(by=ctx.by, note=ctx.args.note)
    if ctx.as_json:
        ctx.emit({"run": _info_json(await handle.info()), "action": "retry"})
    elif before.status is RunStatus.STOPPED and before.wait is not None:
        ctx.say(f"run {before.id}: waiting again for signal {before.wait!r}, with a fresh timeout")
    else:
        where = "compensation" if before.compensation_error is not None else "step"
        ctx.say(f"run {before.id}: retrying, resuming at {where} {_clean(before.step or '-')!r}")
    return EXIT_OK


async def _cancel(ctx: _Ctx, orch: Client) -> int:
    _check_target(ctx)
    if ctx.args.all:
        return await _bulk(ctx, orch, "cancel", cancel_runs)
    handle = orch.get_run(ctx.args.run)
    await handle.cancel(by=ctx.by, note=ctx.args.note)
    info = await handle.info()
    if ctx.as_json:
        ctx.emit({"run": _info_json(info), "action": "cancel"})
    else:
        ctx.say(f"run {info.id}: cancel requested; completed steps will be compensated")
    return EXIT_OK


async def _resolve(ctx: _Ctx, orch: Client) -> int:
    handle = orch.get_run(ctx.args.run)
    await handle.resolve(note=ctx.args.note, by=ctx.by)
    info = await handle.info()
    if ctx.as_json:
        ctx.emit({"run": _info_json(info), "action": "resolve"})
    else:
        ctx.say(f"run {info.id}: {info.status}, marked resolved")
    return EXIT_OK


async def _skip(ctx: _Ctx, orch: Client) -> int:
    handle = orch.get_run(ctx.args.run)
    before = await handle.info()
    await handle.skip_compensation(note=ctx.args.note, by=ctx.by)
    info = await handle.info()
    if ctx.as_json:
        ctx.emit({"run": _info_json(info), "action": "skip-compensation"})
    else:
        step = _clean(before.step or "-")
        ctx.say(f"run {info.id}: compensation of {step!r} skipped; the run is {info.status}")
    return EXIT_OK


async def _attention(ctx: _Ctx, orch: Client) -> int:
    page = await needs_attention(orch, limit=ctx.args.limit, after=ctx.args.after)
    if ctx.as_json:
        ctx.emit({"runs": [_info_json(r) for r in page.runs], "next_after": page.next_before})
        return EXIT_OK
    if not page.runs:
        ctx.note("no run needs attention")
        return EXIT_OK
    runs_table(ctx, page.runs)
    if page.next_before is not None:
        ctx.note(f"more: add --after {page.next_before}")
    return EXIT_OK


ACTIONS: dict[str, Callable[[_Ctx, Client], Awaitable[int]]] = {
    "retry": _retry,
    "cancel": _cancel,
    "resolve": _resolve,
    "skip-compensation": _skip,
    "attention": _attention,
}
