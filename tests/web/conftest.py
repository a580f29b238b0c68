"""Fixtures of the dashboard tests: the dashboard mounted at ``/saga`` in a real
Starlette app, over a real orchestrator on the test database, reached through httpx's
ASGI transport (no server, no mocks).

Who is signed in is the ``X-User`` header: ``alice`` may act, ``rita`` only reads, no
header is nobody (401).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

import saga
from saga.web import Operator, dashboard

BASE = "http://testserver"
ALICE = {"X-User": "alice"}
RITA = {"X-User": "rita"}


async def authorize(request: Request) -> Operator | None:
    user = request.headers.get("x-user")
    if user == "alice":
        return Operator("alice")
    if user == "rita":
        return Operator("rita", can_act=False)
    return None


def mounted(client: saga.Client, **options: Any) -> Starlette:
    """A host application with the dashboard mounted at /saga."""
    options.setdefault("authorize", authorize)
    return Starlette(routes=[Mount("/saga", app=dashboard(client, **options))])


Browser = Callable[..., Any]


@pytest.fixture
async def browse() -> AsyncIterator[Browser]:
    """``await browse(client, **dashboard_options)``: an httpx client on the host app
    (closed at teardown), as alice unless the test passes other headers."""
    opened: list[httpx.AsyncClient] = []

    async def open_(client: saga.Client, **options: Any) -> httpx.AsyncClient:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=mounted(client, **options)), base_url=BASE
        )
        opened.append(http)
        return http

    try:
        yield open_
    finally:
        for http in opened:
            await http.aclose()


def csrf(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no form with a CSRF token on the page"
    return match[1]
