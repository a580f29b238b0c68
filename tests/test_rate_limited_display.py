"""An attempt waiting for its rate limit's token has not started its step: `saga show`,
its JSON and the timeline say it waits (for which limit, until when), not "running"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

import saga
from tests._sagas import Job
from tests.conftest import Cli, OrchestratorFactory


@pytest.mark.timeout(60)
async def test_show_says_an_attempt_waits_for_its_token_until_it_starts(
    orchestrator: OrchestratorFactory, cli: Cli
) -> None:
    """A limit of one call per 4 s: the second run's attempt waits about 4 s for its
    token. Meanwhile README's "The step has not started while it waits" holds in what
    an operator reads: `saga show` gives its outcome as "rate limited (slow, starts
    ...)", `--json` has `rate_limit` and `rate_limited_until`, and `saga.timeline()`
    says so (`waits_for_token`); once it ran, it is "completed". Before, the attempt
    showed "running" from the claim."""
    slow = saga.RateLimit("slow", per_second=0.25, burst=1)
    s = saga.Saga("paced_show", input=Job)

    @s.step(rate_limit=slow)
    async def call(ctx: saga.Context[Job]) -> int:
        return 1

    orch = await orchestrator(s)
    first = await orch.start(s, Job(n=1))
    assert await first.result(timeout=10) == 1
    second = await orch.start(s, Job(n=2))
    with anyio.fail_after(10):
        while True:
            if any(e.kind == "rate_limited" for e in await second.history()):
                break
            await anyio.sleep(0.02)
    code, out, _ = await cli("show", str(second.id))
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("call "))
    assert "rate limited (slow, starts " in row
    assert "running" not in row
    shown = await cli.json("show", str(second.id))
    attempt = shown["attempts"][0]
    assert attempt["outcome"] == "running"
    assert attempt["rate_limit"] == "slow"
    until = datetime.fromisoformat(attempt["rate_limited_until"])
    assert timedelta(seconds=2) < until - datetime.now(UTC) < timedelta(seconds=5)
    [a] = saga.timeline(await second.history())
    assert a.waits_for_token(datetime.now(UTC))
    assert not a.waits_for_token(until)
    assert await second.result(timeout=10) == 1
    code, out, _ = await cli("show", str(second.id))
    row = next(line for line in out.splitlines() if line.startswith("call "))
    assert "completed" in row
    assert "rate limited" not in row
