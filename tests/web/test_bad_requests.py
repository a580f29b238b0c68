"""Bad settings and hostile requests.

``dashboard()`` checks the type of every flag and setting: ``show_payloads="false"``
must not show payloads. Whatever a request holds (a form body of any bytes, any number
of fields, any size or content type; any query string, path or header), the dashboard
answers it with a page and a 4xx saying why, never a 500 or an exception.

Requests go straight to the ASGI app with a raw scope, so that bytes no HTTP client
would send (invalid percent escapes, invalid UTF-8, non-ASCII cookies) reach it as a
server would pass them on. The host app (Starlette) re-raises an unhandled exception
after its 500: ``call`` fails the test on either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from starlette.applications import Starlette
from starlette.requests import Request

import saga
from saga.web import Operator, dashboard
from tests.web.conftest import csrf, mounted

ALICE = (b"x-user", b"alice")
FORM = (b"content-type", b"application/x-www-form-urlencoded")
#: Inner hypothesis tests run in a worker thread, each example one request.
#: The most fields a form may have (saga.web._site.MAX_FORM_FIELDS).
MAX_FIELDS = 200
HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def call(
    app: Starlette,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (ALICE,),
    body: bytes | Sequence[bytes] = b"",
) -> tuple[int, str]:
    """One request (``body`` as one chunk or several); its status and page. An
    exception out of the app, or a 5xx, fails the test."""
    chunks = [body] if isinstance(body, bytes) else list(body)
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    status: int = sent[0]["status"]
    page = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert status < 500, (method, path, query, status, page[-2000:])
    return status, page


async def _app(client: saga.Client) -> tuple[Starlette, str]:
    """The dashboard mounted at /saga, and alice's CSRF token."""
    app = mounted(client)
    status, page = await call(app, "GET", "/saga/runs")
    assert status == 200
    return app, csrf(page)


def in_thread(check: Callable[[], None]) -> Any:
    """Run a hypothesis test (sync) in a worker thread, whose examples call back into
    the event loop with ``anyio.from_thread.run``."""
    return anyio.to_thread.run_sync(check)


# -- dashboard()'s settings ---------------------------------------------------------------


async def _anyone(request: Request) -> Operator:
    return Operator("x")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("show_payloads", "false"),
        ("show_payloads", "no"),
        ("show_payloads", ""),
        ("show_payloads", 1),
        ("show_payloads", 0),
        ("show_payloads", None),
        ("show_payloads", [True]),
        ("bulk_limit", True),
        ("bulk_limit", "10"),
        ("bulk_limit", 1.5),
        ("title", None),
        ("title", 42),
        ("title", ""),
        ("title", "t" * 201),
        ("title", "\ud800"),
        ("redact", "no"),
        ("secret", 12345),
        ("secret", bytearray(32)),
    ],
)
async def test_every_flag_and_setting_is_checked_by_type(
    open_client: Any, option: str, value: Any
) -> None:
    """A flag that is not a bool (``show_payloads="false"`` would show every input and
    result: a non-empty str is truthy) and a setting of the wrong type or out of bounds
    raise ConfigurationError naming the argument, before anything is served."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match=option):
        dashboard(client, authorize=_anyone, **{option: value})


async def test_any_str_or_bytes_secret_of_16_bytes_keys_the_tokens(open_client: Any) -> None:
    """A str secret is its UTF-8 bytes, whatever it holds (a lone surrogate from a
    mis-decoded environment variable included): no UnicodeEncodeError."""
    client = await open_client()
    for secret in ("\ud800" * 8, "s" * 16, b"\xff" * 16):
        dashboard(client, authorize=_anyone, secret=secret)


@pytest.mark.parametrize(
    ("name", "can_act"),
    [
        *[("", True), ("n" * 201, True), ("a\x00b", True), ("\udcff", True), (None, True)],
        *[("ops", "false"), ("ops", 1), ("ops", None)],
    ],
)
def test_an_operator_is_checked_when_made(name: Any, can_act: Any) -> None:
    """Operator's name must be one an action can record (non-empty, at most 200
    characters, no NUL, valid Unicode) and can_act a bool (``can_act="false"`` would
    let a read-only operator act): anything else is a ConfigurationError at once, the
    rule the guard relies on for what authorize() returns."""
    with pytest.raises(saga.ConfigurationError):
        Operator(name, can_act=can_act)
