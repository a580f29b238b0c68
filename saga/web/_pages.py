"""The pages (GET): overview, runs, one run, needs attention, traffic."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.responses import Response

import saga
from saga._model import RunStatus
from saga.web._filters import PageError, field, parse_filters, run_id
from saga.web._site import Ctx, Dashboard
from saga.web._views import CHILDREN_SHOWN, run_view
from saga.web._views import overview as gather_overview

PAGE_SIZE = 50


def _query(ctx: Ctx) -> dict[str, list[str]]:
    params = ctx.request.query_params
    return {name: params.getlist(name) for name in params}


async def overview(dash: Dashboard, ctx: Ctx) -> Response:
    data = await gather_overview(dash.client, dash.recent)
    return dash.render(ctx, "overview.html", page="overview", data=data, now=datetime.now(UTC))


async def runs(dash: Dashboard, ctx: Ctx) -> Response:
    now = datetime.now(UTC)
    query = _query(ctx)
    filters = parse_filters(query)
    cursor_text = field(query, "cursor")
    cursor = None
    if cursor_text:
        try:
            cursor = run_id(cursor_text)
        except PageError:
            raise PageError(400, f"bad page cursor (not a run id): {cursor_text[:100]!r}") from None
    try:
        page = await saga.list_runs(
            dash.client, before=cursor, limit=PAGE_SIZE, **filters.arguments()
        )
    except saga.RunNotFoundError:
        raise PageError(
            404, "the page cursor names no run (pruned meanwhile?): start from the first page"
        ) from None
    return dash.render(
        ctx,
        "runs.html",
        page="runs",
        filters=filters,
        runs=page.runs,
        next_before=page.next_before,
        paged=cursor is not None,
        statuses=[s.value for s in RunStatus],
        bulk_limit=dash.bulk_limit,
        now=now,
    )


async def run(dash: Dashboard, ctx: Ctx) -> Response:
    rid = run_id(ctx.request.path_params["run_id"])
    try:
        view = await run_view(
            dash.client, rid, show_payloads=dash.show_payloads, redact=dash.redact
        )
    except saga.RunNotFoundError:
        raise PageError(404, f"no run {rid} (never started, or pruned)") from None
    return dash.render(
        ctx,
        "run.html",
        page="runs",
        view=view,
        show_payloads=dash.show_payloads,
        now=datetime.now(UTC),
        children_shown=CHILDREN_SHOWN,
    )


async def traffic(dash: Dashboard, ctx: Ctx) -> Response:
    queues = await saga.queues(dash.client)
    schedules = await saga.list_schedules(dash.client)
    return dash.render(
        ctx, "traffic.html", page="traffic", queues=queues, schedules=schedules,
        now=datetime.now(UTC),
    )  # fmt: skip


async def attention(dash: Dashboard, ctx: Ctx) -> Response:
    query = _query(ctx)
    after_text = field(query, "after")
    after = None
    if after_text:
        try:
            after = run_id(after_text)
        except PageError:
            raise PageError(400, f"bad page cursor (not a run id): {after_text[:100]!r}") from None
    try:
        page = await saga.needs_attention(dash.client, limit=PAGE_SIZE, after=after)
    except saga.RunNotFoundError:
        raise PageError(
            404, "the page cursor names no run (pruned meanwhile?): start from the first page"
        ) from None
    return dash.render(
        ctx,
        "attention.html",
        page="attention",
        runs=page.runs,
        next_after=page.next_before,
        paged=after is not None,
        now=datetime.now(UTC),
    )
