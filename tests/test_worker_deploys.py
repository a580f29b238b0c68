"""Deploys: `saga worker` processes stopped by SIGTERM (while they run parallel branches,
a rate limit's wait, a step ignoring its cancellation, or while they still import their
application) exit 0 in time, leave nothing leased and count no attempt."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._harness import Children, python_env

# -- sagas shared by the worker processes (imported as tests.test_worker_deploys:...) --------

SLOW = "DEPLOY_SLOW"  # set in a worker's environment: its steps block (until a deploy)


class J(BaseModel):
    n: int = 0


async def _work() -> None:
    if os.environ.get(SLOW):
        await asyncio.sleep(3600)


GRAPH = saga.Saga("deploy_graph", input=J)


@GRAPH.step(retry=saga.Retry(max_attempts=1))
async def left(ctx: saga.Context[J]) -> int:
    await _work()
    return 1


@GRAPH.step(after=[], retry=saga.Retry(max_attempts=1))
async def right(ctx: saga.Context[J]) -> int:
    await _work()
    return 2


@GRAPH.step(after=[left, right], retry=saga.Retry(max_attempts=1))
async def join(ctx: saga.Context[J]) -> int:
    return ctx.result(left) + ctx.result(right)


BUCKET = saga.RateLimit("deploy_bucket", per_second=0.02, burst=1)
RATED = saga.Saga("deploy_rated", input=J)


@RATED.step(rate_limit=BUCKET, retry=saga.Retry(max_attempts=1))
async def rated(ctx: saga.Context[J]) -> int:
    await _work()
    return 1


ALL: list[Any] = [GRAPH, RATED]


# -- helpers --------------------------------------------------------------------------------


def _worker(children: Children, dsn: str, *options: str, name: str = "w1", slow: bool = True):
    extra = {SLOW: "1"} if slow else {}
    return children.python(
        "-m",
        "saga",
        "worker",
        "tests.test_worker_deploys:ALL",
        "--dsn",
        dsn,
        "--worker-id",
        name,
        "--lease-seconds",
        "60",
        "--poll-interval",
        "0.2",
        *options,
        name=name,
        env=python_env(dsn, **extra),
        ready=" ready: ",
    )


async def _wait_for(db: asyncpg.Connection, sql: str, *args: Any, timeout: float = 20) -> Any:
    with anyio.fail_after(timeout):
        while not (value := await db.fetchval(sql, *args)):  # noqa: ASYNC110 - polling
            await anyio.sleep(0.05)
    return value


async def _leased_to(db: asyncpg.Connection, worker: str) -> list[Any]:
    runs = await db.fetch("SELECT id, step_name FROM saga.runs WHERE lease_owner = $1", worker)
    items = await db.fetch(
        "SELECT run_id, step, phase FROM saga.items WHERE lease_owner = $1", worker
    )
    return [*runs, *items]


async def _counted_give_backs(db: asyncpg.Connection) -> list[Any]:
    return await db.fetch(
        "SELECT run_id, step, attempt, data FROM saga.events WHERE kind = 'lease_released' "
        "AND coalesce((data->>'counted')::boolean, false)"
    )


async def _start(dsn: str, s: saga.Saga[Any], count: int = 1) -> list[Any]:
    async with saga.Client(dsn, sagas=ALL) as client:
        return [(await client.start(s, J(n=i))).id for i in range(count)]


async def _status(db: asyncpg.Connection, run_id: Any) -> str:
    return await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run_id)


async def _complete(
    dsn: str, db: asyncpg.Connection, run_ids: list[Any], within: float
) -> list[str]:
    async with saga.Orchestrator(
        dsn, sagas=ALL, lease_seconds=60, poll_interval=0.2, worker_id="w2"
    ):
        with anyio.move_on_after(within):
            while True:
                done = [await _status(db, r) for r in run_ids]
                if all(s in ("completed", "compensated", "failed", "cancelled") for s in done):
                    break
                await anyio.sleep(0.1)
    return [await _status(db, r) for r in run_ids]


async def _sigterm_and_check(db: asyncpg.Connection, worker: Any, limit: float) -> float:
    began = time.monotonic()
    code = await worker.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - began
    assert code == 0, f"exit {code}:\n{worker.output[-3000:]}"
    assert took < limit, f"exit took {took:.1f}s:\n{worker.output[-3000:]}"
    assert await _leased_to(db, "w1") == [], "leases left to the stopped worker"
    assert await _counted_give_backs(db) == [], "a graceful give-back was counted"
    return took


@pytest.mark.timeout(90)
async def test_sigterm_graph_branches_given_back_and_taken_at_once(
    dsn: str, db: asyncpg.Connection, children: Children
) -> None:
    """README, Runtime: "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest and releases their leases so another
    process takes them at once"; Retries: "gives its leases back without counting the
    interrupted attempts". A graph run with two parallel branches (max_attempts=1) both
    running in a `saga worker` process that gets SIGTERM with --shutdown-timeout 0."""
    [run] = await _start(dsn, GRAPH)
    w = _worker(children, dsn, "--shutdown-timeout", "0.1")
    await w.wait_ready()
    await _wait_for(db, "SELECT count(*) = 2 FROM saga.events WHERE kind = 'step_started'")
    await _sigterm_and_check(db, w, limit=8)
    assert await _complete(dsn, db, [run], within=15) == ["completed"]


STUBBORN = saga.Saga("deploy_stubborn", input=J)


@STUBBORN.step(retry=saga.Retry(max_attempts=2))
async def stubborn(ctx: saga.Context[J]) -> int:
    if os.environ.get(SLOW):
        print("stubborn step running", flush=True)  # (the test's SIGTERM comes after)
        deadline = time.monotonic() + 60  # swallows every cancellation, for 60 s
        while time.monotonic() < deadline:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.3)
    return 1


ALL += [STUBBORN]


@pytest.mark.timeout(120)
async def test_sigterm_with_a_step_that_swallows_cancellation(
    dsn: str, db: asyncpg.Connection, children: Children
) -> None:
    """README, Runtime: "A step that swallows its cancellation cannot hold the close: 15 s
    past `shutdown_timeout` its lease is given back anyway, `orchestrator_close_abandoned`
    is logged, and the close returns"; Command line: "... then shut down gracefully and
    exit 0". A `saga worker` (--shutdown-timeout 1) whose step swallows cancellation
    (for 60 s here; a stuck one forever).

    Before, `orchestrator_close_abandoned` and "saga worker: stopped" were printed 16 s
    after SIGTERM as promised, but the process only exited once the step's code ended
    (60 s: the event loop's teardown waited for the abandoned task): a step that never
    ends kept the stopped worker alive for ever, for a supervisor to SIGKILL. It now
    leaves at once, exit 0, and another worker completes the run."""
    [run] = await _start(dsn, STUBBORN)
    w = _worker(children, dsn, "--shutdown-timeout", "1")
    await w.wait_ready()
    # In the step's code, not only leased (the claim records step_started before the
    # step begins: a SIGTERM then cancels it before it swallows anything).
    with anyio.fail_after(20):
        while "stubborn step running" not in w.output:  # noqa: ASYNC110 - polling a process
            await anyio.sleep(0.05)
    began = time.monotonic()
    w.send(signal.SIGTERM)
    limit = 1 + 15 + 5 + 3
    with anyio.move_on_after(limit + 5):
        while w.alive:  # noqa: ASYNC110 - polling a process
            await anyio.sleep(0.1)
    took = time.monotonic() - began
    out = w.output
    assert "orchestrator_close_abandoned" in out, out
    assert "saga worker: stopped" in out, out
    assert not w.alive, out
    assert took < limit, (
        f"`saga worker` still running {took:.1f}s after SIGTERM (exit code {w.returncode}), "
        f"although its close returned:\n{out[-2000:]}"
    )
    assert await _complete(dsn, db, [run], within=15) == ["completed"]


@pytest.mark.timeout(60)
async def test_sigterm_while_the_target_module_imports(
    dsn: str, children: Children, tmp_path: Any
) -> None:
    """README, Command line: `saga worker MODULE:OBJECT` executes runs "until
    SIGTERM/SIGINT, then shut down gracefully and exit 0". A deploy stopping a worker
    that is still starting: importing a large application module takes seconds.

    Before, the worker's signal handlers were installed only once the target was
    imported and the Orchestrator built, so SIGTERM while the MODULE imported killed the
    process by the signal (exit -15 / 143), not exit 0. It is noted and the worker
    leaves once the import ended, exit 0."""
    mark = tmp_path / "importing"
    (tmp_path / "deploy_slowimport.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path(os.environ['H39_MARK']).write_text('x')\n"
        "time.sleep(4)\n"
        "from tests.test_worker_deploys import ALL\n"
    )
    env = python_env(dsn, H39_MARK=str(mark))
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{tmp_path}"
    w = children.python(
        "-m", "saga", "worker", "deploy_slowimport:ALL", "--dsn", dsn, name="slow", env=env
    )
    await w.wait_until(mark.exists, "waiting for the import", timeout=30)
    code = await w.stop(signal.SIGTERM, timeout=30)
    assert code == 0, f"exit {code}:\n{w.output[-2000:]}"


ROLE = "H39_ROLE"


def _role_worker(children: Children, dsn: str, name: str, role: str):
    return children.python(
        "-m",
        "saga",
        "worker",
        "tests.test_worker_deploys:ALL",
        "--dsn",
        dsn,
        "--worker-id",
        name,
        "--lease-seconds",
        "60",
        "--poll-interval",
        "0.2",
        "--shutdown-timeout",
        "0.1",
        name=name,
        env=python_env(dsn, **{ROLE: role}),
        ready=" ready: ",
    )


SUICIDE = saga.Saga("deploy_suicide", input=J)


@SUICIDE.step(retry=saga.Retry(max_attempts=2, initial_delay=0.1, jitter=0))
async def takes_worker_down(ctx: saga.Context[J]) -> int:
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(3600)
    return 1


ALL += [SUICIDE]


@pytest.mark.timeout(180)
async def test_a_step_that_sigterms_its_worker_is_ended_by_the_attempt_limit(
    dsn: str, db: asyncpg.Connection, children: Children
) -> None:
    """README, Retries: "an attempt given back a second time before any outcome (a step
    that takes its worker down gracefully, or never ends within `shutdown_timeout`)
    counts, so the attempt limit ends that too". A step (max_attempts=2) that sends
    SIGTERM to its own `saga worker`, under a supervisor restarting the worker: the run
    must end (failed over: compensated) after a bounded number of restarts."""
    [run] = await _start(dsn, SUICIDE)
    for i in range(10):
        w = _role_worker(children, dsn, f"r{i}", "")
        with anyio.move_on_after(30):
            while w.alive and await _status(db, run) in ("pending", "running"):  # noqa: ASYNC110
                await anyio.sleep(0.1)
        assert await w.stop(signal.SIGTERM, timeout=20) == 0, w.output[-2000:]
        if await _status(db, run) not in ("pending", "running"):
            break
    history = await db.fetch(
        "SELECT kind, attempt, worker, data FROM saga.events WHERE run_id = $1 ORDER BY id", run
    )
    assert await _status(db, run) == "compensated", [tuple(h) for h in history]
    assert i <= 5, i


@pytest.mark.timeout(120)
async def test_a_token_wait_given_back_by_three_deploys_is_never_counted(
    dsn: str, db: asyncpg.Connection, children: Children
) -> None:
    """README, Rate limits: "The step has not started while it waits: a worker shutting
    down gives the attempt back uncounted however many times". Two runs of a step
    (max_attempts=1) behind a bucket of one token per 50 s: the second waits for its
    token while three `saga worker` processes in turn get SIGTERM."""
    runs = await _start(dsn, RATED, 2)
    for i in range(3):
        w = _role_worker(children, dsn, f"d{i}", "")
        await w.wait_ready()
        await _wait_for(
            db,
            "SELECT count(*) >= 1 FROM saga.events WHERE kind = 'rate_limited' AND worker = $1",
            f"d{i}",
        )
        await anyio.sleep(0.3)
        assert await w.stop(signal.SIGTERM, timeout=20) == 0, w.output[-2000:]
        assert await _leased_to(db, f"d{i}") == []
    released = [
        tuple(r)
        for r in await db.fetch(
            "SELECT attempt, worker, data FROM saga.events WHERE kind = 'lease_released'"
            " ORDER BY id"
        )
    ]
    assert await _counted_give_backs(db) == [], released
    statuses = [await _status(db, r) for r in runs]
    assert "compensated" not in statuses, statuses
    assert "failed" not in statuses, statuses
