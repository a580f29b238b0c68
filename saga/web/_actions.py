"""The actions (POST): on one run, and in bulk over the runs filter. Each calls the
core API with the operator's name and note, then redirects (303) back with a flash
message; a refusal changes nothing and answers with its status (400, 404, 409)."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

import saga
from saga._acting import operator_data
from saga._model import RunStatus
from saga.web._filters import PageError, field, form_filters, run_id
from saga.web._site import Ctx, Dashboard

_DONE = {
    "cancel": "Cancel requested",
    "retry": "Retried",
    "resolve": "Marked resolved",
    "skip": "Compensation skipped",
}


def _note(ctx: Ctx, required: bool) -> str | None:
    note = field(ctx.form, "note")
    if required and not note:
        raise PageError(400, "a note is required: say why, it goes into the run's history")
    return note or None


async def act(dash: Dashboard, ctx: Ctx) -> Response:
    """POST /runs/{id}/{action}: cancel, retry, resolve, skip, signal."""
    rid = run_id(ctx.request.path_params["run_id"])
    action = ctx.request.path_params["action"]
    client, by = dash.client, ctx.operator.name
    if action == "cancel":
        if not await client._cancel(rid, by, _note(ctx, False)):
            flash = "A cancel was requested before: the run is being cancelled, nothing changed."
            return dash.redirect(ctx, f"/runs/{rid}", flash)
    elif action == "retry":
        await client.retry(rid, by=by, note=_note(ctx, False))
    elif action == "resolve":
        note = _note(ctx, True)
        assert note is not None
        await client.resolve(rid, note=note, by=by)
    elif action == "skip":
        note = _note(ctx, True)
        assert note is not None
        await client.skip_compensation(rid, note=note, by=by)
    elif action == "signal":
        return await _signal(dash, ctx, rid)
    else:
        raise PageError(404, f"no action {action[:40]!r}")
    return dash.redirect(ctx, f"/runs/{rid}", f"{_DONE[action]} by {by}.")


async def schedule(dash: Dashboard, ctx: Ctx) -> Response:
    """POST /schedules/{name}/{pause|resume}."""
    name, action = ctx.request.path_params["name"], ctx.request.path_params["action"]
    if action not in ("pause", "resume"):
        raise PageError(404, f"no action {action[:40]!r}")
    change = saga.pause_schedule if action == "pause" else saga.resume_schedule
    try:
        await change(dash.client, name)
    except saga.ConfigurationError:
        raise PageError(404, f"no schedule named {name[:100]!r}") from None
    done = "paused" if action == "pause" else "resumed"
    return dash.redirect(ctx, "/traffic", f"Schedule {name} {done} by {ctx.operator.name}.")


async def _signal(dash: Dashboard, ctx: Ctx, rid: Any) -> Response:
    name = field(ctx.form, "name")
    if not name:
        raise PageError(400, "the signal's name is required")
    text = (ctx.form.get("payload") or [""])[0].strip() or "{}"
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise PageError(400, f"the payload is not valid JSON: {exc}") from None
    except RecursionError:  # json's own limit: ``[[[[...`` a thousand deep
        raise PageError(400, "the payload is nested too deeply") from None
    if not isinstance(payload, dict):
        raise PageError(400, "the payload must be a JSON object")
    by, client = ctx.operator.name, dash.client
    info = await client.info(rid)
    if client.definition(info.saga, info.version) is not None:
        recorded = await client.signal(rid, name, payload, by=by, note=_note(ctx, False))
    elif info.wait == name and info.status is not RunStatus.SLEEPING:
        # The dashboard does not know the wait's model: sent as given (a sleep, whose
        # name RunInfo.wait also holds, takes no signal).
        saga = (info.saga, info.version)
        recorded = await client._signal_unchecked(
            rid, name, payload, saga, by=by, note=_note(ctx, False)
        )
    elif info.status.is_terminal:
        raise PageError(409, f"run {rid} has ended {info.status}: it takes no signal")
    else:
        now = f"the one it waits for now, {info.wait!r}" if info.wait else "it waits for none now"
        raise PageError(
            400,
            f"saga {info.saga!r} is not registered with this dashboard (saga dashboard "
            f"--target): only the signal the run waits for can be sent, unchecked ({now})",
        )
    if recorded:
        flash = f"Signal {name!r} sent by {by}."
    else:
        flash = f"A signal {name!r} was recorded before: the first one wins, nothing changed."
    return dash.redirect(ctx, f"/runs/{rid}", flash)


async def bulk(dash: Dashboard, ctx: Ctx) -> Response:
    """POST /runs/bulk: the first POST counts and asks to confirm; the second (with
    ``confirm`` and the count seen, ``expect``) acts, unless the count changed."""
    action = field(ctx.form, "action")
    if action not in ("cancel", "retry"):
        raise PageError(400, "bulk action must be cancel or retry")
    filters = form_filters(ctx.form)
    arguments = filters.arguments()
    if field(ctx.form, "confirm") != "yes":
        count = await saga.count_matching(dash.client, cap=dash.bulk_limit, **arguments)
        return dash.render(
            ctx,
            "confirm.html",
            page="runs",
            action=action,
            filters=filters,
            count=count,
            bulk_limit=dash.bulk_limit,
            note=field(ctx.form, "note"),
        )
    try:
        expect = int(field(ctx.form, "expect"))
    except ValueError:
        expect = -1
    if expect < 0:
        raise PageError(400, "the confirmation carries no count: start again")
    note = _note(ctx, False)
    try:  # bad input is the operator's to fix (400): what is left is the runs moving
        operator_data(ctx.operator.name, note)
    except saga.ConfigurationError as exc:
        raise PageError(400, str(exc)) from None
    act_on = saga.cancel_runs if action == "cancel" else saga.retry_runs
    try:
        result = await act_on(
            dash.client,
            limit=dash.bulk_limit,
            expect=expect,
            by=ctx.operator.name,
            note=note,
            **arguments,
        )
    except saga.ConfigurationError as exc:  # the input was checked: the count moved
        raise PageError(409, str(exc)) from None
    verb = "Cancelled" if action == "cancel" else "Retried"
    acted = len(result.acted)
    flash = f"{verb} {acted} run{'' if acted == 1 else 's'}."
    if result.refused:
        reasons = sorted(set(result.refused.values()))[:3]
        flash += f" {len(result.refused)} refused: " + "; ".join(reasons)
    return dash.redirect(ctx, "/runs?" + filters.query(), flash)
