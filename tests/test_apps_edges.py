"""The commands and example apps as a new user meets them: `saga demo`'s options and
errors, `saga worker` targets, names, signals at start-up and shutdown, schema names,
and the approval example's answers to odd requests."""

from __future__ import annotations

import glob
import json
import signal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import asyncpg
import pytest

from tests import _harness
from tests._harness import Children
from tests.examples._http import UNREADABLE_BODIES

UNREACHABLE = "postgresql://postgres@/postgres?host=/nonexistent-socket-dir&port=1"


async def saga_cmd(*argv: str, env: dict[str, str] | None = None, timeout: float = 50) -> Any:
    return await _harness.run(
        "-m", "saga", *argv, env=env or _harness.python_env(), timeout=timeout
    )


async def schemas(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch("SELECT nspname FROM pg_namespace")
    return {r["nspname"] for r in rows}


# -- saga demo ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_demo_honours_dsn_option(dsn: str, db: asyncpg.Connection) -> None:
    """README "Command line": "`saga` (or `python -m saga`) takes the database from
    `--dsn` or `SAGA_DSN`", and `saga demo --help` lists `--dsn DSN`. With SAGA_DSN
    pointing nowhere and `--dsn` at a live database, the demo must use `--dsn`."""
    env = _harness.python_env(UNREACHABLE)
    done = await saga_cmd("demo", "--dsn", dsn, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "completed: parcel for rsv-o-1001" in done.stdout
    assert "saga_demo" in await schemas(db)


@pytest.mark.timeout(90)
async def test_demo_honours_schema_option(dsn: str, db: asyncpg.Connection) -> None:
    """README "Command line": the schema comes "from `--schema` or `SAGA_SCHEMA`", and
    `saga demo --help` lists `--schema SCHEMA  schema holding saga's tables`. The demo's
    tables must land in the schema given, not in a hard-coded one."""
    done = await saga_cmd("demo", "--schema", "shop_demo", env=_harness.python_env(dsn))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shop_demo" in await schemas(db), sorted(await schemas(db))


@pytest.mark.timeout(90)
async def test_demo_json_prints_json(dsn: str) -> None:
    """README "Command line": "`--json` prints JSON for scripts instead of tables", and
    `saga demo --help` offers `--json  print JSON for scripts instead of tables`."""
    done = await saga_cmd("demo", "--json", env=_harness.python_env(dsn))
    assert done.returncode == 0, done.stderr[-2000:]
    json.loads(done.stdout)


@pytest.mark.timeout(60)
async def test_demo_with_a_malformed_dsn_exits_2_without_a_traceback() -> None:
    """README "Command line": "Exit codes: ... `2` usage (bad option, DSN, ...)". `saga
    demo` on a SAGA_DSN that is no postgresql:// URI must exit 2 with a one-line
    message, as every other command does, not crash with a traceback."""
    done = await saga_cmd("demo", env=_harness.python_env("mysql://shop@localhost/shop"))
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.returncode == 2, done.stderr[-1500:]


@pytest.mark.timeout(60)
async def test_demo_with_an_unreachable_database_exits_1_without_a_traceback() -> None:
    """README "Command line": "Exit codes: ... `1` error (database unreachable, ...)",
    said in one line like every command (`saga runs` says `saga runs: error: ...`)."""
    done = await saga_cmd("demo", env=_harness.python_env(UNREACHABLE))
    assert done.returncode == 1, done.stderr[-1500:]
    assert "Traceback" not in done.stderr, done.stderr[-1500:]


# -- saga worker targets ------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_worker_with_a_relative_module_target_is_a_usage_error(dsn: str) -> None:
    """README "Command line": exit `2` is "usage (bad option, DSN, duration, run id,
    schema name or target ...)". `saga worker .checkout:SAGAS` (a relative module name,
    which no `python -m` can import) is a bad target: exit 2, like
    `examples..checkout:SAGAS` already is, not 1 ("importing failed")."""
    done = await saga_cmd("worker", ".checkout:SAGAS", "--dsn", dsn, timeout=30)
    assert done.returncode == 2, done.stderr


# -- saga worker: graceful shutdown ----------------------------------------------------------


@pytest.mark.timeout(60)
async def test_worker_ready_line_escapes_control_characters(dsn: str, children: Children) -> None:
    """README "Command line": "Names and messages are printed with control characters
    escaped." `saga worker --worker-id` accepts a name with a newline and an ANSI escape
    (it is stored and shown escaped by `saga show`), but the worker's own "ready" line
    prints it raw: a terminal obeys the escape, a log reader sees a forged line."""
    worker = children.saga_worker(
        dsn, "examples.checkout:SAGAS", "--worker-id", "w1\nFAKE LOG LINE\x1b[2J", "--no-migrate"
    )
    await worker.wait_ready()
    assert worker.alive
    assert "\x1b" not in worker.output, worker.output
    assert "\nFAKE LOG LINE" not in worker.output, worker.output


@pytest.mark.timeout(60)
async def test_an_empty_schema_option_is_a_usage_error(dsn: str) -> None:
    """README "Command line": the schema comes "from `--schema` or `SAGA_SCHEMA` (default
    `saga`)", and exit `2` is "usage (bad option, ... schema name ...)". `--schema ""`
    (say `--schema "$SCHEMA"` with the variable unset) is no valid schema name; the
    command must refuse it, not silently act on the default schema `saga` (here: list,
    and could prune or cancel, another schema's runs)."""
    import saga
    from examples.checkout import Order, checkout

    async with saga.Orchestrator(dsn, sagas=[checkout], poll_interval=0.2) as orch:
        run = await orch.start(checkout, Order(order_id="default-schema", amount_cents=1))
        await run.result(timeout=20)
    done = await saga_cmd("runs", "--schema", "", "--json", "--dsn", dsn, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stdout[:500], done.stderr)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_worker_sigterm_while_starting_up_stops_it(
    dsn: str, db: asyncpg.Connection, children: Children
) -> None:
    """`saga worker` stops on SIGTERM also while still starting (its start-up migration
    waiting for the lock another deploy's `saga migrate` holds): it exits 0 within
    seconds, rather than only to SIGKILL. (A migration recorded without its checksum
    makes the worker's migrate take the lock: on an up-to-date schema it takes none.)"""
    await db.execute("UPDATE saga.migrations SET checksum = NULL WHERE version = 1")
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT pg_advisory_xact_lock(hashtext('saga.migrate:saga'))")
        worker = children.saga_worker(dsn, "examples.checkout:SAGAS", "--shutdown-timeout", "2")
        blocked = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
        )
        with anyio.fail_after(20):
            while not await db.fetchval(blocked):  # noqa: ASYNC110 - polling the server
                await anyio.sleep(0.05)
        worker.send(signal.SIGTERM)
        try:
            code = await worker.wait(timeout=10)
        except TimeoutError:
            pytest.fail(f"SIGTERM ignored for 10 s while starting up:\n{worker.output[-2000:]}")
        assert code in (0, 130), worker.output
    finally:
        holder.terminate()


# -- hostile schema names -----------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_system_schema_name_is_refused_or_its_data_is_backed_up(
    dsn: str, db: asyncpg.Connection
) -> None:
    """DESIGN: schema names are validated. `information_schema`, PostgreSQL's other system
    schema (pg_dump never dumps it), is refused as `pg_*` is: runs stored there would
    silently be missing from backups."""
    done = await saga_cmd("migrate", "--schema", "information_schema", "--dsn", dsn, timeout=40)
    if done.returncode == 2:
        return  # refused, as pg_catalog is
    assert done.returncode == 0, done.stderr
    import saga
    from examples.checkout import Order, checkout

    async with saga.Orchestrator(
        dsn, sagas=[checkout], schema="information_schema", poll_interval=0.2
    ) as orch:
        run = await orch.start(checkout, Order(order_id="backup-me", amount_cents=1))
        await run.result(timeout=20)
    assert await db.fetchval("SELECT count(*) FROM information_schema.runs") == 1
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    pg_dump = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))[-1]
    dump = await anyio.run_process(
        [
            pg_dump,
            "-h",
            query.get("host", "localhost"),
            "-p",
            query.get("port", "5432"),
            "-U",
            parts.username or "postgres",
            parts.path.lstrip("/"),
        ],
        check=True,
    )
    assert b"information_schema.runs" in dump.stdout, "saga's runs table is missing from pg_dump"


# -- examples/approval.py -----------------------------------------------------------------


async def _approval(dsn: str) -> Any:
    from examples.approval import create_app

    return create_app(dsn, concurrency=2, poll_interval=0.2, shutdown_timeout=2)


@pytest.mark.timeout(60)
async def test_approval_a_valid_refund_request_is_not_a_500(
    dsn: str, db: asyncpg.Connection
) -> None:
    """examples/approval.py: `POST /refunds` answers 202 for any request `RefundRequest`
    accepts, a large amount (2**40 cents) included: the app's table holds it."""
    import httpx

    app = await _approval(dsn)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            body = {"refund_id": "big", "order_id": "o-big", "amount_cents": 2**40}
            response = await http.post("/refunds", json=body)
    assert response.status_code in (202, 413, 422), (response.status_code, response.text)


@pytest.mark.timeout(60)
async def test_approval_bad_requests_are_4xx_not_500(dsn: str) -> None:
    """examples/approval.py maps saga's errors as the shop app does: a `refund_id` reused
    for another refund is 409, NUL characters in ids or a decision 422 or 404 (an
    unknown refund), never a 500; a body no JSON parser reads is a 422 ValidationError
    (before, FastAPI's own 400)."""
    import httpx

    app = await _approval(dsn)
    answers: dict[str, int] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            first = {"refund_id": "r1", "order_id": "o-1", "amount_cents": 100}
            assert (await http.post("/refunds", json=first)).status_code == 202
            other = {**first, "amount_cents": 200}
            answers["same refund_id, other amount"] = (
                await http.post("/refunds", json=other)
            ).status_code
            nul = {"refund_id": "r\x00", "order_id": "o-2", "amount_cents": 100}
            answers["NUL in refund_id"] = (await http.post("/refunds", json=nul)).status_code
            decision = {"approved": True, "manager": "a"}
            answers["decision, unknown refund with %00"] = (
                await http.post("/refunds/r%00/decision", json=decision)
            ).status_code
            answers["GET unknown refund with %00"] = (await http.get("/refunds/r%00")).status_code
            bad = {"approved": True, "manager": "a\x00"}
            answers["decision with NUL manager"] = (
                await http.post("/refunds/r1/decision", json=bad)
            ).status_code
            for what, body in UNREADABLE_BODIES.items():
                answer = await http.post(
                    "/refunds", content=body, headers={"content-type": "application/json"}
                )
                assert answer.status_code == 422, (what, answer.text[:200])
                assert answer.json()["error"] == "ValidationError"
    assert {k: v for k, v in answers.items() if v >= 500} == {}, answers


@pytest.mark.timeout(60)
async def test_approval_requests_json_cannot_echo_are_422_not_500(dsn: str) -> None:
    """README (Web apps): FastAPI's own 422 handler answers 500 for input JSON cannot
    encode, since it echoes it, so the examples leave the input out. A refund request
    or a decision holding NaN or a lone surrogate is a malformed request: 422."""
    import httpx

    app = await _approval(dsn)
    json_type = {"content-type": "application/json"}
    answers: dict[str, int] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            ok = '{"refund_id":"r1","order_id":"o-1","amount_cents":100}'
            assert (await http.post("/refunds", content=ok, headers=json_type)).status_code == 202
            decide = "/refunds/r1/decision"
            bodies = {
                "refund, NaN amount": (
                    "/refunds",
                    '{"refund_id":"r2","order_id":"o","amount_cents":NaN}',
                ),
                "refund, lone surrogate id": (
                    "/refunds",
                    '{"refund_id":"\\ud800","order_id":"o","amount_cents":1}',
                ),
                "decision, NaN approved": (decide, '{"approved":NaN,"manager":"a"}'),
                "decision, lone surrogate manager": (
                    decide,
                    '{"approved":true,"manager":"\\ud800"}',
                ),
            }
            for label, (path, body) in bodies.items():
                response = await http.post(path, content=body, headers=json_type)
                answers[label] = response.status_code
    assert answers == dict.fromkeys(answers, 422), answers


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_worker_starts_no_new_step_after_sigterm(
    dsn: str, db: asyncpg.Connection, children: Children
) -> None:
    """`saga worker --help`: "Execute the runs of the given sagas until SIGTERM or SIGINT,
    then shut down gracefully: running steps get --shutdown-timeout seconds to finish,
    the rest are handed back to other workers." After SIGTERM, the step in flight
    finishes, but the worker must not begin the run's *next* step (which the shutdown
    timeout may then cut off mid-side-effect): it hands the run back instead."""
    import saga
    from examples.checkout import Order, checkout

    worker = children.saga_worker(
        dsn,
        "examples.checkout:SAGAS",
        "--worker-id",
        "draining",
        "--concurrency",
        "2",
        "--poll-interval",
        "0.2",
        "--shutdown-timeout",
        "8",
    )
    await worker.wait_ready()
    async with saga.Client(dsn, sagas=[checkout], poll_interval=0.2) as client:
        run = await client.start(checkout, Order(order_id="drain-1", amount_cents=1, step_delay=2))
        started = "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'step_started'"
        with anyio.fail_after(10):
            while not await db.fetchval(started, run.id):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        signalled_at = await db.fetchval("SELECT now()")
        worker.send(signal.SIGTERM)
        assert await worker.wait(timeout=30) == 0, worker.output[-2000:]
    rows = await db.fetch(
        "SELECT kind, step, at FROM saga.events WHERE run_id = $1 AND worker = 'draining'"
        " AND kind = 'step_started' AND at > $2 ORDER BY id",
        run.id,
        signalled_at,
    )
    assert [(r["kind"], r["step"]) for r in rows] == [], "steps begun after SIGTERM"
