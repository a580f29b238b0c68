"""Fixtures of the browser tests: Debian's Chromium driven by Playwright (the system
browser: nothing is downloaded), against the dashboard mounted at ``/saga`` in a real
Starlette app served by uvicorn on a loopback port, over a real orchestrator on the test
database.

Who is signed in is the ``X-User`` header the browser context sends: ``alice`` may act,
``rita`` only reads, no header is nobody (401). Without Chromium the tests are skipped,
except under ``CI=true`` (``scripts/test.sh`` installs it as root), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import uvicorn
from playwright.async_api import Browser, BrowserContext, async_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

import saga
from saga.web import Operator, dashboard

#: Flags that keep a headless Chromium off the network and quiet in a sandbox (as root
#: it needs --no-sandbox).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

ALICE = {"X-User": "alice"}
RITA = {"X-User": "rita"}

pytestmark = pytest.mark.timeout(60)


async def authorize(request: Request) -> Operator | None:
    user = request.headers.get("x-user")
    if user == "alice":
        return Operator("alice")
    if user == "rita":
        return Operator("rita", can_act=False)
    return None


def _chromium() -> str | None:
    for candidate in (os.environ.get("SAGA_TEST_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _chromium()
    if path is None:
        message = "no Chromium (Debian: apt-get install chromium; scripts/test.sh does as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(client, **dashboard_options)``: the host app served on a free
    loopback port; returns the dashboard's URL (``http://127.0.0.1:PORT/saga``)."""
    # Plain asyncio tasks: a fixture's setup and teardown may run in different tasks, which
    # a task group (a cancel scope) does not allow.
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def serve_(client: saga.Client, **options: Any) -> str:
        options.setdefault("authorize", authorize)
        app = Starlette(routes=[Mount("/saga", app=dashboard(client, **options))])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        running.append((server, asyncio.create_task(server.serve([sock]))))
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                await anyio.sleep(0.02)
        return f"http://127.0.0.1:{port}/saga"

    try:
        yield serve_
    finally:
        for server, _ in running:
            server.should_exit = True
            server.force_exit = True  # open event streams must not hold it up
        for _, task in running:
            with anyio.fail_after(10):
                await task


Context = Callable[..., Awaitable[BrowserContext]]


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[Context]:
    """``await context(headers)``: a fresh browser context (its own cookies) sending
    ``headers`` with every request; closed at teardown."""
    opened: list[BrowserContext] = []

    async def open_(headers: dict[str, str] | None = None) -> BrowserContext:
        ctx = await browser.new_context(extra_http_headers=headers or {})
        opened.append(ctx)
        return ctx

    try:
        yield open_
    finally:
        for ctx in opened:
            await ctx.close()
