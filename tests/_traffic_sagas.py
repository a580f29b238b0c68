"""Sagas of the traffic-control tests, at module level so that a `saga worker` process
can name them: ``limited`` calls a provider limited to 50 requests/s (burst 10);
``transfers`` runs one at a time per account."""

from __future__ import annotations

import random

import anyio

import saga
from tests._sagas import Job

PROVIDER = saga.RateLimit("provider", per_second=50, burst=10)

limited = saga.Saga("limited", input=Job)


@limited.step(rate_limit=PROVIDER)
async def call_provider(ctx: saga.Context[Job]) -> int:
    return ctx.input.n


def _account(job: Job) -> str:
    return f"account-{job.n % 10}"


#: One at a time per account (n % 10): reserve -> transfer (fails for good when n % 7 is
#: 0: the reservation is compensated, still holding the account).
transfers = saga.Saga("transfers", input=Job, concurrency_key=_account)


@transfers.step()
async def reserve(ctx: saga.Context[Job]) -> int:
    await anyio.sleep(random.uniform(0.02, 0.08))
    return ctx.input.n


@reserve.compensate
async def release(ctx: saga.Context[Job], n: int) -> None:
    await anyio.sleep(random.uniform(0.005, 0.02))


@transfers.step()
async def transfer(ctx: saga.Context[Job]) -> int:
    await anyio.sleep(random.uniform(0.02, 0.08))
    if ctx.input.n % 7 == 0:
        raise saga.PermanentError("account frozen")
    return ctx.input.n
