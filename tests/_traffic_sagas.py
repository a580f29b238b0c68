"""Sagas of the traffic-control tests, at module level so that a `saga worker` process
can name them: ``limited`` calls a provider limited to 50 requests/s (burst 10)."""

from __future__ import annotations

import saga
from tests._sagas import Job

PROVIDER = saga.RateLimit("provider", per_second=50, burst=10)

limited = saga.Saga("limited", input=Job)


@limited.step(rate_limit=PROVIDER)
async def call_provider(ctx: saga.Context[Job]) -> int:
    return ctx.input.n
