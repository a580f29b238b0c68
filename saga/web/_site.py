"""One dashboard app's settings and the page pipeline every handler runs in: the
operator's context, the CSRF check of forms, errors as pages with their HTTP status,
rendering and redirects with a flash message."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from saga._client import Client
from saga._errors import (
    ConfigurationError,
    DatabaseError,
    DefinitionError,
    InvalidInputError,
    InvalidRunStateError,
    LifecycleError,
    RunNotFoundError,
    SerializationError,
)
from saga.web._auth import Authorize, Operator, Signer
from saga.web._filters import Fields, PageError
from saga.web._hub import Hub
from saga.web._render import Redact, environment
from saga.web._views import RecentCache

#: Largest form body accepted (a signal's payload included).
MAX_FORM_BYTES = 1024 * 1024
#: Most fields a form may have (the dashboard's own forms have under ten).
MAX_FORM_FIELDS = 200
#: Where the guard leaves the request's operator in the ASGI scope.
OPERATOR = "saga.operator"
_FLASH = "saga_flash"


@dataclass(frozen=True, slots=True)
class Ctx:
    """One request as a page sees it."""

    request: Request
    operator: Operator
    base: str  # where the dashboard is mounted ("" at the root)
    csrf: str
    form: Fields = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.base + path


Handler = Callable[["Dashboard", Ctx], Awaitable[Response]]


class Dashboard:
    """One dashboard app's settings and shared pieces (its hub, its signer)."""

    def __init__(
        self,
        client: Client,
        authorize: Authorize,
        *,
        show_payloads: bool,
        redact: Redact | None,
        bulk_limit: int,
        title: str,
        secret: str | bytes | None,
    ) -> None:
        self.client = client
        self.authorize = authorize
        self.show_payloads = show_payloads
        self.redact = redact
        self.bulk_limit = bulk_limit
        self.title = title
        self.signer = Signer(secret)
        self.hub = Hub(client)
        self.recent = RecentCache()

    def render(
        self, ctx: Ctx | None, template: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        values.setdefault("page", "")
        flash = None
        # A live refresh (X-Saga-Refresh) leaves the flash to the page it answers: one
        # fetched by the page an action is leaving, as its redirect is followed, would
        # otherwise take the new page's message.
        refresh = ctx is not None and "x-saga-refresh" in ctx.request.headers
        if ctx is not None and ctx.request.method == "GET" and not refresh:
            flash = self.signer.unsign(ctx.request.cookies.get(_FLASH))
        page = (
            environment()
            .get_template(template)
            .render(
                title=self.title,
                ctx=ctx,
                base=ctx.base if ctx else "",
                operator=ctx.operator if ctx else None,
                flash=flash,
                **values,
            )
        )
        response = HTMLResponse(page, status_code=status)
        response.headers["cache-control"] = "no-store"
        if flash is not None and ctx is not None:
            response.delete_cookie(_FLASH, path=ctx.base or "/")
        return response

    def redirect(self, ctx: Ctx, path: str, flash: str) -> Response:
        """303 back to a page, which shows ``flash`` once."""
        response = RedirectResponse(ctx.url(path), status_code=303)
        response.set_cookie(
            _FLASH,
            self.signer.sign(flash),
            path=ctx.base or "/",
            httponly=True,
            samesite="strict",
        )
        return response

    def endpoint(self, handler: Handler, *, write: bool = False) -> Callable[..., Any]:
        async def run(request: Request) -> Response:
            operator: Operator = request.scope[OPERATOR]
            base = request.scope.get("root_path", "")
            ctx = Ctx(request, operator, base, self.signer.csrf_token(operator))
            try:
                if write:
                    ctx = Ctx(request, operator, base, ctx.csrf, await _form(request))
                    token = (ctx.form.get("csrf") or [""])[0]
                    if not self.signer.csrf_ok(operator, token):
                        raise PageError(403, "the form's CSRF token is missing or wrong: reload")
                return await handler(self, ctx)
            except PageError as exc:
                return self.render(ctx, "error.html", exc.status, message=exc.message)
            except Exception as exc:
                status = _status(exc)
                if status is None:
                    raise
                return self.render(ctx, "error.html", status, message=str(exc))

        return run


def _status(exc: Exception) -> int | None:
    """The HTTP status of an error the core API raises."""
    if isinstance(exc, RunNotFoundError):
        return 404
    if isinstance(exc, InvalidRunStateError | DefinitionError):
        return 409
    if isinstance(exc, InvalidInputError | ConfigurationError | SerializationError):
        return 400  # SerializationError: a signal's payload above max_payload_bytes
    if isinstance(exc, DatabaseError | LifecycleError):
        return 503
    return None


async def _form(request: Request) -> dict[str, list[str]]:
    """The urlencoded form of a POST (no multipart), at most MAX_FORM_BYTES and
    MAX_FORM_FIELDS: anything else is a PageError saying what is wrong (413, 415, 400),
    whatever the body holds."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PageError(413, f"the form is too large (at most {MAX_FORM_BYTES} bytes)")
    if body and kind != "application/x-www-form-urlencoded":
        raise PageError(415, "forms must be sent as application/x-www-form-urlencoded")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PageError(400, "the form is not UTF-8") from None
    try:  # percent escapes that are not UTF-8 become U+FFFD, as a browser's would
        return parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # the only one parse_qs raises without strict_parsing
        raise PageError(400, f"the form has too many fields (at most {MAX_FORM_FIELDS})") from None
