"""The dashboard's documented usage, type-checked by mypy --strict (see [tool.mypy]
files): mounting ``saga.web.dashboard`` in a FastAPI app behind the app's own
authentication. Not collected by pytest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

import saga
from saga.web import Operator, dashboard

orchestrator = saga.Orchestrator("postgresql://localhost/app", sagas=[])


async def authorize(request: Request) -> Operator | None:
    # The app's own authentication: here, a header set by the app's auth proxy.
    user = request.headers.get("x-forwarded-user")
    if user is None:
        return None  # 401
    return Operator(user, can_act=user in {"alice", "bob"})  # others: read only


def redact(path: str, value: Any) -> Any:
    # path: "input", "result.<step>", "output" (decoded JSON), or "error" (a message)
    if path == "input" and isinstance(value, dict):
        return {**value, "card_number": "****"}
    return value


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with orchestrator:
        yield


app = FastAPI(lifespan=lifespan)
app.mount(
    "/saga",
    dashboard(orchestrator, authorize=authorize, show_payloads=True, redact=redact),
)
