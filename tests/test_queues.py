"""What waits, visible: work due per saga and priority with its oldest wait, runs queued
behind their key, rate limits' buckets, from Python (saga.queues), the command line
(saga queues) and the metrics."""

from __future__ import annotations

import anyio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import saga
from tests._sagas import Job, small_saga
from tests.conftest import Cli, ClientFactory, OrchestratorFactory
from tests.test_telemetry import points, total


async def test_queues_show_due_work_keyed_runs_and_rate_limits(
    open_client: ClientFactory, orchestrator: OrchestratorFactory, cli: Cli
) -> None:
    """With no worker for them: 3 runs at priority 0 and 2 at priority 5 are due;
    3 runs of one key: the first is due, 2 wait for the key. A limit of 1/s (burst 1)
    taken by 3 attempts at once is in debt: the next would wait about 2 s. saga.queues,
    `saga queues --json` and the gauges all say so."""
    bulk = small_saga("bulk", 1, traffic={"priority": lambda job: job.n})
    keyed = small_saga("keyed", 1, traffic={"concurrency_key": lambda job: "acct"})
    client = await open_client(bulk, keyed)
    for n in (0, 0, 0, 5, 5):
        await client.start(bulk, Job(n=n))
    for _ in range(3):
        await client.start(keyed, Job())
    slow = saga.Saga("slow", input=Job)

    @slow.step(rate_limit=saga.RateLimit("one", per_second=1, burst=1))
    async def call(ctx: saga.Context[Job]) -> int:
        return 1

    reader = InMemoryMetricReader()
    worker = await orchestrator(
        slow, meter_provider=MeterProvider(metric_readers=[reader]), census_interval=0.1
    )
    for _ in range(3):
        await worker.start(slow, Job())
    await anyio.sleep(0.3)  # the three attempts took their tokens
    q = await saga.queues(client)
    due = {(d.saga, d.priority): d.runs for d in q.due}
    assert due[("bulk", 0)] == 3
    assert due[("bulk", 5)] == 2
    assert due[("keyed", 0)] == 1
    assert [(k.saga, k.runs, k.keys) for k in q.waiting_for_key] == [("keyed", 2, 1)]
    (limit,) = q.rate_limits
    assert (limit.name, limit.per_second, limit.burst) == ("one", 1.0, 1)
    assert 1.0 < limit.delay <= 3.0
    shown = await cli.json("queues")
    assert {(d["saga"], d["priority"], d["runs"]) for d in shown["due"]} >= {
        ("bulk", 0, 3),
        ("bulk", 5, 2),
    }
    assert shown["waiting_for_key"] == [{"saga": "keyed", "runs": 2, "keys": 1}]
    assert shown["rate_limits"][0]["name"] == "one"
    code, out, _ = await cli("queues")
    assert code == 0
    assert "WAITING FOR A KEY" in out
    with anyio.fail_after(5):
        while not points(reader).get("saga.runs.waiting_for_key"):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    found = points(reader)
    assert total(found, "saga.queue.depth", **{"saga.name": "bulk", "saga.priority": 5}) == 2
    assert total(found, "saga.runs.waiting_for_key", **{"saga.name": "keyed"}) == 2
    with anyio.fail_after(10):
        while not points(reader).get("saga.rate_limit.delay"):  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_a_rate_limits_delay_is_what_the_next_attempt_waits(
    orchestrator: OrchestratorFactory,
) -> None:
    """A limit of one call per 10 s (burst 1) whose token one attempt just took:
    saga.queues says the next attempt would wait about 10 s, and the next attempt's
    rate_limited event records that wait (within a second). The bucket's figure once
    came a whole token short (it said 0 s)."""
    s = saga.Saga("paced_view", input=Job)

    @s.step(rate_limit=saga.RateLimit("slow_view", per_second=0.1, burst=1))
    async def call(ctx: saga.Context[Job]) -> int:
        return 1

    orch = await orchestrator(s)
    with anyio.fail_after(10):
        await (await orch.start(s, Job())).result()
    (limit,) = (await saga.queues(orch)).rate_limits
    assert 9.0 < limit.delay <= 10.0
    second = await orch.start(s, Job())
    with anyio.fail_after(10):
        while not (waited := [e for e in await second.history() if e.kind == "rate_limited"]):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert abs(waited[0].data["delay"] - limit.delay) < 1.0
