"""The dashboard as an ASGI app: the guard (authorization before anything else), the
static files, the event stream and the routes."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from saga import _checks
from saga._bulk import MAX_BULK
from saga._checks import show
from saga._client import Client
from saga._errors import ConfigurationError
from saga.web import _actions, _pages
from saga.web._auth import Authorize, Operator, SecurityHeaders, check_authorize, cross_site
from saga.web._render import Redact, environment
from saga.web._site import OPERATOR, Dashboard, Handler

#: Longest title: it heads every page and tab.
MAX_TITLE_LENGTH = 200
_STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}


class Guard:
    """ASGI middleware: every request is authorized first (static files and the event
    stream too): 401 without an operator; a POST needs ``can_act`` (else 403) and must
    not come from another site (403)."""

    def __init__(self, app: ASGIApp, dash: Dashboard) -> None:
        self.app = app
        self.dash = dash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        answer: Any = self.dash.authorize(request)
        operator = await answer if inspect.isawaitable(answer) else answer  # (or a plain def)
        if operator is not None and not isinstance(operator, Operator):
            raise ConfigurationError(
                f"authorize() must return a saga.web.Operator or None, got {show(operator)}"
            )
        response: Response | None = None
        if operator is None:
            response = self._refuse(401, "Sign in to use this dashboard.")
        elif scope["method"] not in ("GET", "HEAD"):
            if not operator.can_act:
                response = self._refuse(403, f"{operator.name} may look but not act.")
            elif cross_site(request):
                response = self._refuse(403, "Cross-site requests are refused.")
        if response is not None:
            await response(scope, receive, send)
            return
        scope[OPERATOR] = operator
        await self.app(scope, receive, send)

    def _refuse(self, status: int, message: str) -> Response:
        page = (
            environment()
            .get_template("error.html")
            .render(
                title=self.dash.title, ctx=None, base="", operator=None, flash=None, message=message
            )
        )
        return HTMLResponse(page, status_code=status)


@cache
def _asset(name: str) -> bytes:
    return (resources.files("saga.web") / "static" / name).read_bytes()


async def _static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(_asset(name), media_type=_STATIC[name], headers={"cache-control": "no-cache"})


class EventStream:
    """``/events``: server-sent events, one ``change`` event per announcement of the
    hub, and a comment every 15 s so that closed connections are noticed."""

    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        async with anyio.create_task_group() as tg:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnect)
            async with self.dash.hub.subscribe() as subscription:
                await _chunk(send, "retry: 3000\n\n")
                hub = self.dash.hub
                while not hub.closed:
                    if await subscription.changed(15) and not hub.closed:
                        await _chunk(send, f"event: change\ndata: {hub.version}\n\n")
                    elif not hub.closed:
                        await _chunk(send, ": ping\n\n")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()


async def _chunk(send: Send, text: str) -> None:
    await send({"type": "http.response.body", "body": text.encode(), "more_body": True})


def dashboard(
    client: Client,
    *,
    authorize: Authorize | None = None,
    show_payloads: bool = False,
    redact: Redact | None = None,
    bulk_limit: int = 1000,
    title: str = "saga",
    secret: str | bytes | None = None,
) -> DashboardApp:
    """The dashboard as an ASGI app, to mount in the application (FastAPI, Starlette):
    ``app.mount("/saga", dashboard(client, authorize=authorize))``.

    ``client`` is an open :class:`saga.Client` (or :class:`saga.Orchestrator`) the
    application owns. ``authorize(request)`` is required: the application's own
    authentication, returning a :class:`Operator` (``can_act=False``: read only) or None
    (401). Inputs and results are hidden unless ``show_payloads``; shown, they pass
    through ``redact(path, value)`` first (path: ``"input"``, ``"result.<step>"``,
    ``"output"``), and error messages through ``redact("error", message)``. Bulk actions
    act on at most ``bulk_limit`` runs. ``secret`` keys the CSRF tokens (random per app
    by default: set it when several processes serve the same dashboard).
    """
    checked = check_authorize(authorize)
    if not isinstance(client, Client):
        raise ConfigurationError(f"client must be a saga.Client, got {show(client)}")
    _checks.flag("show_payloads", show_payloads, ConfigurationError)
    _checks.integer("bulk_limit", bulk_limit, ConfigurationError, minimum=1, maximum=MAX_BULK)
    if redact is not None and not callable(redact):
        raise ConfigurationError(
            f"redact must be a function (path, value) -> value, got {_checks.show(redact)}"
        )
    _checks.text("title", title, ConfigurationError, max_length=MAX_TITLE_LENGTH)
    dash = Dashboard(
        client,
        checked,
        show_payloads=show_payloads,
        redact=redact,
        bulk_limit=bulk_limit,
        title=title,
        secret=secret,
    )
    get = dash.endpoint

    def post(handler: Handler) -> Callable[..., Any]:
        return dash.endpoint(handler, write=True)

    routes = [
        Route("/", get(_pages.overview), methods=["GET"]),
        Route("/runs", get(_pages.runs), methods=["GET"]),
        Route("/runs/bulk", post(_actions.bulk), methods=["POST"]),
        Route("/runs/{run_id}", get(_pages.run), methods=["GET"]),
        Route("/runs/{run_id}/{action}", post(_actions.act), methods=["POST"]),
        Route("/attention", get(_pages.attention), methods=["GET"]),
        Route("/traffic", get(_pages.traffic), methods=["GET"]),
        Route("/schedules/{name}/{action}", post(_actions.schedule), methods=["POST"]),
        Route("/events", EventStream(dash), methods=["GET"]),
        Route("/static/{name}", _static, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return DashboardApp(SecurityHeaders(Guard(app, dash)), dash)


class DashboardApp:
    """The dashboard as an ASGI app (what :func:`dashboard` returns)."""

    def __init__(self, app: ASGIApp, dash: Dashboard) -> None:
        self._app = app
        self._dash = dash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def close_streams(self) -> None:
        """End every open event stream now (pages reconnect by themselves): call it
        when the server starts shutting down, whose graceful shutdown would otherwise
        wait for them until its timeout."""
        self._dash.hub.close()
