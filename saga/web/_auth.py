"""Who may do what, and the checks around every request: operators, CSRF tokens bound
to the operator, the cross-site check, signed flash messages and the security headers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saga import _checks
from saga._acting import MAX_BY_LENGTH
from saga._checks import show
from saga._errors import ConfigurationError

#: What every response carries: no inline script or style, nothing from elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True, slots=True)
class Operator:
    """The person (or script) using the dashboard, as the app's ``authorize`` names it.

    ``name`` is recorded in the history of every run they act on (``data.by``), so it
    must be a non-empty str that an action can record (at most 200 characters, no NUL,
    valid Unicode); ``can_act`` is a bool, ``False`` makes them read-only: every POST
    answers 403. Anything else is a ``ConfigurationError`` here, at construction, not a
    failure at the first action.
    """

    name: str
    can_act: bool = True

    def __post_init__(self) -> None:
        _checks.who("the operator's name", self.name, ConfigurationError, max_length=MAX_BY_LENGTH)
        _checks.flag("can_act", self.can_act, ConfigurationError)


Authorize = Callable[[Request], Awaitable[Operator | None]]


def check_authorize(authorize: Any) -> Authorize:
    if authorize is None or not callable(authorize):
        raise ConfigurationError(
            "dashboard() needs authorize=: an async function (request) -> saga.web.Operator "
            "| None that applies the app's own authentication (None answers 401); the "
            f"dashboard has no open mode (got {show(authorize)})"
        )
    checked: Authorize = authorize
    return checked


class Signer:
    """HMACs with one secret per dashboard app: CSRF tokens and flash messages."""

    def __init__(self, secret: str | bytes | None) -> None:
        if secret is None:
            secret = secrets.token_bytes(32)
        elif isinstance(secret, str):
            secret = secret.encode("utf-8", "surrogatepass")  # a str is its UTF-8 bytes
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ConfigurationError("secret must be a str or bytes of at least 16 bytes")
        self._secret = secret

    def _mac(self, purpose: str, value: bytes) -> str:
        digest = hmac.new(self._secret, purpose.encode() + b"\0" + value, hashlib.sha256)
        return digest.hexdigest()

    def csrf_token(self, operator: Operator) -> str:
        """The token an operator's forms carry: bound to the operator's name."""
        return self._mac("csrf", operator.name.encode("utf-8", "surrogatepass"))

    def csrf_ok(self, operator: Operator, token: str | None) -> bool:
        return token is not None and _same(self.csrf_token(operator), token)

    def sign(self, message: str) -> str:
        """A cookie-safe, signed form of ``message`` (a flash message)."""
        data = message.encode("utf-8", "replace")[:1000]
        encoded = base64.urlsafe_b64encode(data).decode().rstrip("=")
        return f"{encoded}.{self._mac('flash', data)}"

    def unsign(self, value: str | None) -> str | None:
        if not value or "." not in value:
            return None
        encoded, mac = value.rsplit(".", 1)
        try:
            data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return None
        if not _same(self._mac("flash", data), mac):
            return None
        return data.decode("utf-8", "replace")


def _same(expected: str, given: str) -> bool:
    """Constant-time equality of a MAC and what a request carries, which may be any text:
    ``hmac.compare_digest`` raises TypeError for a str that is not ASCII."""
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


def cross_site(request: Request) -> bool:
    """Whether the browser says this request comes from another site (Fetch metadata:
    its own verdict, which no page can forge), or, from a browser that does not send
    it, whether its ``Origin`` names another host. The scheme is not compared: behind a
    proxy that terminates TLS the dashboard sees ``http`` where the browser says
    ``https``."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc != request.url.netloc


class SecurityHeaders:
    """ASGI middleware: the CSP and friends on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in _HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k not in names]
                message = {**message, "headers": headers + _HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)
