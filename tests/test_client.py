"""The client is not a worker; definitions hold no runtime; each orchestrator owns its
telemetry."""

from __future__ import annotations

import gc
import uuid
from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
from tests.conftest import OrchestratorFactory


class Job(BaseModel):
    n: int


def one_step(name: str = "clienty", version: int = 1) -> saga.Saga[Job]:
    s = saga.Saga(name, input=Job, version=version)

    @s.step()
    async def double(ctx: saga.Context[Job]) -> int:
        return ctx.input.n * 2

    return s


async def test_a_client_starts_and_waits_but_executes_nothing(dsn: str) -> None:
    """A Client starts runs, reads them and cancels them, but never claims: its run stays
    pending with no attempt until an orchestrator runs it, and the client's result()
    then returns the typed output."""
    s = one_step()
    async with saga.Client(dsn, sagas=[s], poll_interval=0.1) as client:
        run = await client.start(s, Job(n=21))
        await anyio.sleep(0.3)
        info = await run.info()
        assert (info.status, info.attempt, info.worker) == (saga.RunStatus.PENDING, 0, None)
        assert [e.kind for e in await client.history(run.id)] == ["run_started"]
        async with saga.Orchestrator(dsn, sagas=[s], poll_interval=0.1):
            with anyio.fail_after(5):
                assert await client.result(run.id) == 42


async def test_result_reads_a_waited_run_once_it_ended(dsn: str) -> None:
    """result() on a run still pending sets its watch and waits: it reads the run once,
    when its end is notified (not also right after the watch); on a run that already
    ended, it reads it at once; and with a deadline that has passed, it reads the run
    to say where it is. (Private: the store's reads, counted.)"""
    s = one_step()
    async with saga.Client(dsn, sagas=[s], poll_interval=5) as client:
        store = client._store
        assert store is not None
        reads: list[uuid.UUID] = []
        get_run = store.get_run

        async def counted(run_id: uuid.UUID) -> Any:
            reads.append(run_id)
            return await get_run(run_id)

        store.get_run = counted  # type: ignore[method-assign]
        run = await client.start(s, Job(n=21))
        with pytest.raises(saga.RunTimeoutError, match="still pending"):
            await client.result(run.id, timeout=0.2)
        assert len(reads) == 1  # read when the deadline passed, not also before
        reads.clear()
        waited: list[int] = []
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_append, waited, client.result(run.id, timeout=10), done)
            await anyio.sleep(0.3)
            assert reads == []  # watched and waiting: nothing read
            async with saga.Orchestrator(dsn, sagas=[s], poll_interval=0.1):
                with anyio.fail_after(10):
                    await done.wait()
        assert waited == [42]
        assert reads == [run.id]
        reads.clear()
        assert await client.result(run.id) == 42
        assert reads == [run.id]


async def _append(into: list[Any], result: Any, done: anyio.Event) -> None:
    into.append(await result)
    done.set()


async def test_opening_a_client_logs_nothing_about_others_definitions(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """With active runs of sagas a client did not register in the database, opening it
    and using it (as `saga runs` does) logs no unknown_definition_waiting warning: only
    orchestrators report work they cannot execute."""
    other = one_step("someone_else")
    starter = await orchestrator(other, concurrency=0)
    for n in range(3):
        await starter.start(other, Job(n=n))
    with capture_logs() as logs:
        async with saga.Client(dsn) as client:
            page = await saga.list_runs(client)
            assert len(page.runs) == 3
            await anyio.sleep(0.2)
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []


async def test_saga_start_finds_its_client_and_the_definition_holds_none(dsn: str) -> None:
    """checkout.start() works through the one open client that registered the saga; with
    none it says so, with two it asks to choose; through a closed one it says that one
    is closed (LifecycleError, as the client's own start); the definition object itself
    keeps no reference to any runtime, and a client nobody holds is forgotten."""
    s = one_step()
    with pytest.raises(saga.DefinitionError, match="not registered with an open"):
        await s.start(Job(n=1))
    async with saga.Client(dsn, sagas=[s]) as client:
        run = await s.start(Job(n=1))
        assert (await client.info(run.id)).saga == "clienty"
        assert not any(isinstance(v, saga.Client) for v in vars(s).values())
        async with saga.Client(dsn, sagas=[s]):
            with pytest.raises(saga.DefinitionError, match="2 open clients"):
                await s.start(Job(n=2))
        assert (await s.start(Job(n=3))).created
    with pytest.raises(saga.LifecycleError, match="closed"):
        await s.start(Job(n=4))
    del client
    gc.collect()
    from saga import _registry  # private: the registry's weakness is what this checks

    assert _registry.open_clients(s) == []


async def test_client_lifecycle_is_explicit(dsn: str) -> None:
    """A client used before it opens, or after it closed, raises LifecycleError; it
    cannot be reopened; aclose() may be called twice."""
    client = saga.Client(dsn)
    with pytest.raises(saga.LifecycleError, match="not open"):
        client.get_run("0b6c2d6e-7f1a-4a51-9d0e-2f4b8c1e9a37")
    async with client:
        pass
    await client.aclose()
    with pytest.raises(saga.LifecycleError, match="closed"):
        await client.info(uuid.uuid4())
    with pytest.raises(saga.LifecycleError, match="create a new one"):
        async with client:
            pass


def _gauge_points(reader: InMemoryMetricReader, name: str) -> list[dict[str, Any]]:
    data = reader.get_metrics_data()
    points: list[dict[str, Any]] = []
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    points += [dict(p.attributes or {}) for p in metric.data.data_points]
    return points


async def test_two_orchestrators_never_share_or_clear_each_others_gauges(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Two orchestrators in one process on one meter provider, on two schemas and then
    on the same one: each reports its schema's gauges, and closing one leaves the
    other's gauges reported."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    await saga.migrate(dsn, schema="other")
    s = one_step()
    opts: dict[str, Any] = {"meter_provider": provider, "census_interval": 0.05}
    a = saga.Orchestrator(dsn, sagas=[s], **opts)
    b = saga.Orchestrator(dsn, sagas=[s], schema="other", **opts)
    c = saga.Orchestrator(dsn, sagas=[s], **opts)
    async with a, b:
        await anyio.sleep(0.3)
        schemas = {p["saga.schema"] for p in _gauge_points(reader, "saga.scheduler.lag")}
        assert schemas == {"saga", "other"}
        async with c:
            await anyio.sleep(0.3)
        await anyio.sleep(0.1)
        # c (schema saga) closed: a still reports schema saga, b still reports other.
        schemas = {p["saga.schema"] for p in _gauge_points(reader, "saga.scheduler.lag")}
        assert schemas == {"saga", "other"}
        await a.aclose()
        await anyio.sleep(0.1)
        schemas = {p["saga.schema"] for p in _gauge_points(reader, "saga.scheduler.lag")}
        assert schemas == {"other"}
    await anyio.sleep(0.1)
    assert _gauge_points(reader, "saga.scheduler.lag") == []
    provider.shutdown()
