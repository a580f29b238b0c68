"""Bad input at the public entry points, as classes: deep or hostile signal payloads on
the command line, schedule anchors at the edge of time, intervals that would make an
idle process spin, a children step's outputs above the payload limit, a schedule input
that hangs, saga.testing counts, and the operator functions given something else than a
client. DESIGN.md: "Bad input gets a clear error, and nothing is lost" and "no setting a
user can pass can stop an orchestrator"; the README adds that bad input on the command
line is a usage error (exit 2) with a one-line message and no traceback.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import saga
from tests._sagas import Job, parked_saga, until_status
from tests._wait_sagas import SAGAS, Decision, approval
from tests.conftest import Cli, ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(90)

TARGET = "tests._wait_sagas:SAGAS"


class Tagged(BaseModel):
    """A signal payload whose mapping keys come from the sender."""

    approved: bool
    tags: dict[str, int] = {}


tagged = saga.Saga("tagged", input=Job)


@tagged.step()
async def tagged_first(ctx: saga.Context[Job]) -> int:
    return ctx.input.n


tagged_decision = tagged.wait_for("decision", Tagged, timeout=timedelta(hours=1))


@tagged.step()
async def tagged_last(ctx: saga.Context[Job]) -> bool:
    return ctx.result(tagged_decision).approved


HOSTILE_TARGET = "tests.test_bad_input_edges:TAGGED"
TAGGED = [tagged]


async def _waiting(orch: saga.Orchestrator) -> saga.RunHandle:
    run = await orch.start(approval, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    return run


# -- CLI: `saga signal --payload` ---------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [5_000, 100_000])
@pytest.mark.parametrize("via", ["argument", "stdin"])
async def test_cli_signal_deeply_nested_payload_is_a_usage_error(
    cli: Cli,
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    depth: int,
    via: str,
) -> None:
    """README (Command line): for `saga signal`, "bad JSON" is exit 2 (usage), nothing is
    written, and messages are one line without a traceback. A payload of nested arrays
    (``[[[[...]]]]``, valid JSON syntax but deeper than Python's json can parse) must be
    refused the same way, whether given in --payload or on stdin (``--payload -``)."""
    orch = await orchestrator(*SAGAS)
    run = await _waiting(orch)
    payload = "[" * depth + "]" * depth
    if via == "stdin":
        monkeypatch.setattr("sys.stdin", io.StringIO(payload))
        argv = ["signal", "decision", str(run.id), "--payload", "-", "--target", TARGET]
    else:
        argv = ["signal", "decision", str(run.id), "--payload", payload, "--target", TARGET]
    try:
        code, _out, err = await cli(*argv)
    except RecursionError as exc:  # main() let it out: a traceback, exit 1
        pytest.fail(f"saga signal raised {exc!r} instead of exiting 2")
    assert "Traceback" not in err, err[-600:]
    assert code == 2, (code, err[-600:])
    assert len(err.strip().splitlines()) == 1, err[-600:]
    assert "JSON" in err
    assert await db.fetchval("SELECT count(*) FROM saga.signals WHERE payload IS NOT NULL") == 0
    assert await run.status() is saga.RunStatus.WAITING


@pytest.mark.timeout(60)
async def test_cli_signal_refusal_escapes_control_characters_of_the_payload(
    cli: Cli, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Command line): "Names and messages are printed with control characters
    escaped", and a payload the wait's model refuses is exit 2 with nothing written. A
    payload key holding terminal escape sequences (ESC, BEL, newline) reaches the
    refusal message through pydantic's error location: it must come out escaped, on
    one line, not as raw control characters that drive the operator's terminal."""
    orch = await orchestrator(tagged)
    run = await orch.start(tagged, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    hostile = "\x1b]0;owned\x07\x1b[2J\nsaga: signal recorded"
    payload = json.dumps({"approved": True, "tags": {hostile: "not an int"}})
    code, _out, err = await cli(
        "signal", "decision", str(run.id), "--payload", payload, "--target", HOSTILE_TARGET
    )
    assert code == 2, err
    assert await db.fetchval("SELECT count(*) FROM saga.signals WHERE payload IS NOT NULL") == 0
    controls = sorted({c for c in err.rstrip("\n") if not c.isprintable()})
    assert not controls, f"raw control characters {controls!r} printed: {err!r}"


# -- Schedules ----------------------------------------------------------------------------

EDGE_ANCHORS = [
    pytest.param(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), id="year1_plus1h"),
    pytest.param(datetime(1, 1, 1, tzinfo=ZoneInfo("Asia/Tokyo")), id="year1_tokyo"),
    pytest.param(
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1))),
        id="year9999_minus1h",
    ),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("anchor", EDGE_ANCHORS)
def test_every_with_an_anchor_at_the_edge_of_time_is_a_definition_error(anchor: datetime) -> None:
    """README (Schedules): bad schedules are "refused at definition with a
    DefinitionError naming what is wrong". An aware anchor whose UTC form is outside
    datetime's range must be a DefinitionError about ``anchor``, not an OverflowError."""
    with pytest.raises(saga.DefinitionError, match="anchor"):
        saga.Schedule.every(timedelta(hours=1), anchor=anchor)


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    anchor=st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))]
        ),
    ).map(lambda d: d.replace(microsecond=0)),
    hours=st.integers(min_value=1, max_value=24 * 366),
)
def test_every_accepts_or_refuses_any_aware_anchor_cleanly(anchor: datetime, hours: int) -> None:
    """README (Schedules): any anchor either gives a schedule whose next slot can be
    computed, or is refused with a DefinitionError; never another exception."""
    try:
        schedule = saga.Schedule.every(timedelta(hours=hours), anchor=anchor)
    except saga.DefinitionError:
        return
    now = datetime(2026, 6, 1, tzinfo=UTC)
    assert schedule.next_after(now) > now


# -- Orchestrator and Client settings ----------------------------------------------------


async def _transactions(base_dsn: str, database: str) -> int:
    """Transactions Postgres counted in ``database`` (its statistics flush within ~1 s
    of a session's end)."""
    admin = await asyncpg.connect(base_dsn)
    try:
        await asyncio.sleep(1.2)
        value = await admin.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            database,
        )
        return int(value or 0)
    finally:
        await admin.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "setting",
    [
        pytest.param({}, id="defaults_control"),
        pytest.param({"poll_interval": 1e-6}, id="poll_interval_1us"),
        pytest.param({"census_interval": 1e-3}, id="census_interval_1ms"),
    ],
)
async def test_an_idle_orchestrator_cannot_be_set_to_spin(
    base_dsn: str, dsn: str, setting: dict[str, float]
) -> None:
    """_checks: "Every setting a user can pass is checked where it is given ... a value
    that cannot work must fail at once, never later inside a loop of a worker"; DESIGN:
    no setting can stop an orchestrator. An interval of a microsecond (poll) or a
    millisecond (census) is accepted without a ConfigurationError, so it must at least
    not turn an idle orchestrator into a loop hammering Postgres: with the defaults an
    idle orchestrator runs ~15 transactions a second; allow 10x that."""
    from tests._sagas import small_saga

    database = dsn.split("?")[0].rsplit("/", 1)[1]
    try:
        orch = saga.Orchestrator(dsn, sagas=[small_saga("idle")], **setting)
    except saga.ConfigurationError:
        return  # refused at once: fine
    before = await _transactions(base_dsn, database)
    async with orch:
        await anyio.sleep(3)
    spent = await _transactions(base_dsn, database) - before
    assert spent < 3 * 150, f"{setting}: {spent} transactions in 3 s of idling"


@pytest.mark.timeout(60)
async def test_an_idle_client_cannot_be_set_to_spin(dsn: str) -> None:
    """As above, for ``saga.Client(poll_interval=)``: a client that waits for nothing
    must not burn a CPU core when given a microsecond poll interval (the default idles
    at ~0 % CPU); either refuse the value or stay idle."""
    import time

    try:
        client = saga.Client(dsn, poll_interval=1e-6)
    except saga.ConfigurationError:
        return
    async with client:
        started = time.process_time()
        await anyio.sleep(3)
        cpu = time.process_time() - started
    assert cpu < 1.0, f"an idle client used {cpu:.2f} s of CPU in 3 s"


# -- Rate limits ----------------------------------------------------------------------------


# -- Payload size ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_cli_views_escape_control_characters_of_recorded_errors(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """README (Command line): "Names and messages are printed with control characters
    escaped". A step's error message (user text, recorded as given) holding terminal
    escapes and newlines must come out escaped in every human view of the run."""
    hostile = "\x1b]0;owned\x07\x1b[2J\nstatus: completed"
    boom = saga.Saga("boom", input=Job)

    @boom.step(retry=saga.Retry(max_attempts=1))
    async def explode(ctx: saga.Context[Job]) -> int:
        raise saga.PermanentError(hostile)

    orch = await orchestrator(boom)
    run = await orch.start(boom, Job(n=1), key="hostile-key\x1b[31m")
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    for argv in (
        ["show", str(run.id)],
        ["show", str(run.id), "--events"],
        ["runs"],
        ["runs", "--saga", "boom"],
    ):
        code, out, err = await cli(*argv)
        assert code == 0, err
        controls = sorted({c for c in out if not c.isprintable() and c != "\n"})
        assert not controls, f"saga {' '.join(argv)}: raw {controls!r} in {out!r}"
        assert "\nstatus: completed" not in out, f"saga {' '.join(argv)}: forged line"


# -- Schedules at run time ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hangs", [False, True], ids=["control", "hung_input"])
async def test_a_hanging_schedule_input_does_not_stop_the_other_schedules(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, hangs: bool
) -> None:
    """DESIGN: nothing durable is stuck, and no setting a user can pass stops an
    orchestrator; README (Schedules): a slot whose input function raises is logged and
    tried again, and each slot starts "exactly one [run] while at least one
    [orchestrator] is up". An input function that never returns (a hung HTTP call) is
    user input too: it must not stop *another* schedule, due at the same time, from
    firing. The scheduler handles every due schedule in one transaction, serially,
    holding all their rows locked (SKIP LOCKED hides them from other orchestrators
    too), so one hung input function stops them all."""
    gate = anyio.Event()

    async def never(slot: datetime) -> Job:
        await gate.wait()
        return Job(n=0)

    ticks = saga.Saga("ticks", input=Job)

    @ticks.step()
    async def tick(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    every_second = saga.Schedule.every(timedelta(seconds=1))
    hung = saga.Scheduled("a-hung", ticks, every_second, never if hangs else Job(n=0))
    healthy = saga.Scheduled("b-healthy", ticks, every_second, Job(n=1))
    await orchestrator(ticks, schedules=[hung, healthy])
    try:
        with anyio.move_on_after(6):
            while not await db.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM saga.runs WHERE idempotency_key LIKE 'schedule:b-healthy:%'"
            ):
                await anyio.sleep(0.1)
        fired = await db.fetchval(
            "SELECT count(*) FROM saga.runs WHERE idempotency_key LIKE 'schedule:b-healthy:%'"
        )
        assert fired > 0, "schedule 'b-healthy' never fired in 6 s: 'a-hung' holds the scheduler"
    finally:
        gate.set()


@pytest.mark.timeout(60)
async def test_cli_views_escape_control_characters_of_keys(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """README (Command line): "Names and messages are printed with control characters
    escaped". Idempotency and concurrency keys are any non-empty str without NUL (user
    data: a business id from a webhook); every human view must print them escaped."""
    hostile = "acct\x1b[2J\x1b]0;owned\x07\nforged"
    gate = anyio.Event()
    keyed = saga.Saga("keyed", input=Job, concurrency_key=lambda job: hostile)

    @keyed.step()
    async def hold(ctx: saga.Context[Job]) -> int:
        await gate.wait()
        return ctx.input.n

    orch = await orchestrator(keyed)
    try:
        first = await orch.start(keyed, Job(n=1), key=hostile)
        second = await orch.start(keyed, Job(n=2), key=hostile + "2")
        await until_status(first, saga.RunStatus.RUNNING)
        for argv in (
            ["show", str(second.id)],
            ["show", "--key", hostile, "--saga", "keyed"],
            ["runs"],
            ["queues"],
            ["attention"],
        ):
            code, out, err = await cli(*argv)
            assert code == 0, (argv, err)
            controls = sorted({c for c in out + err if not c.isprintable() and c != "\n"})
            assert not controls, f"saga {argv[0]}: raw {controls!r} in {out!r}"
            assert "\nforged" not in out, f"saga {argv[0]}: a forged line in {out!r}"
    finally:
        gate.set()


# -- saga.testing ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "times", [math.nan, 1.5, True, "2"], ids=["nan", "fraction", "bool", "str"]
)
def test_faults_refuse_a_count_that_cannot_work(times: Any) -> None:
    """README (Testing your sagas) documents ``fail_compensation(step, times=None,
    ...)``; DESIGN: bad input gets a clear error (a SagaError). A ``times`` that is not
    a whole count must be refused: NaN is accepted and the fault then never fires (a
    test of a compensation's retries passes without any fault injected), 1.5 fires
    twice, True once, and "2" raises a bare TypeError from a comparison."""
    from saga.testing import Faults

    with pytest.raises(saga.SagaError):
        Faults().fail_compensation("s1", times=times)


# -- Operator API ---------------------------------------------------------------------------

NOT_A_CLIENT: list[Any] = [None, 5, "postgresql://postgres@/postgres"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("client", NOT_A_CLIENT, ids=["none", "int", "dsn"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: saga.list_runs(c), id="list_runs"),
        pytest.param(lambda c: saga.count_runs(c), id="count_runs"),
        pytest.param(lambda c: saga.queues(c), id="queues"),
        pytest.param(lambda c: saga.list_schedules(c), id="list_schedules"),
        pytest.param(lambda c: saga.needs_attention(c), id="needs_attention"),
    ],
)
async def test_operator_functions_name_a_wrong_client(client: Any, call: Any) -> None:
    """README (Operator API): the functions "take an open saga.Client"; DESIGN: bad
    input gets a clear error naming what is wrong. Given something else (None, a DSN
    string instead of a client) they raise AttributeError about a private method
    (``'str' object has no attribute '_store_or_raise'``) instead of a SagaError
    saying a saga.Client is needed."""
    with pytest.raises(saga.SagaError):
        await call(client)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "history", [None, 5, [5], ["run_started"]], ids=["none", "int", "ints", "strs"]
)
def test_timeline_names_a_wrong_history(history: Any) -> None:
    """README (Operator API): ``timeline(history) -> list[StepAttempt]`` of a run's
    ``history()``. Anything else must be a clear error (a SagaError), not a bare
    TypeError/AttributeError from inside (``'int' object has no attribute 'kind'``)."""
    with pytest.raises(saga.SagaError):
        saga.timeline(history)


# -- model instances that were never validated ---------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("built", ["model_construct", "changed_after"])
async def test_an_instance_that_does_not_validate_is_invalid_input_and_writes_nothing(
    open_client: Any, built: str
) -> None:
    """DESIGN.md: "Bad input gets a clear error, and nothing is lost". An input or signal
    payload given as an instance of its model that does not validate (built with
    ``model_construct``, or a field set to another type after it was built) is bad input:
    ``InvalidInputError`` naming the field, as the same values given as a mapping are,
    and nothing is written. (It was a SerializationError, a "cannot be stored" error.)"""

    def bad_job() -> Job:
        if built == "model_construct":
            return Job.model_construct(n="many", fail="")
        job = Job(n=1)
        job.n = "many"  # type: ignore[assignment]
        return job

    client = await open_client(approval)
    with pytest.raises(saga.InvalidInputError, match=r"(?s)input for saga 'approval'.*\bn\b"):
        await client.start(approval, bad_job())
    assert await saga.count_matching(client, saga="approval") == 0

    run = await client.start(approval, Job(n=1))
    bad = Decision.model_construct(approved="perhaps", by="x")
    if built == "changed_after":
        bad = Decision(approved=True)
        bad.approved = "perhaps"  # type: ignore[assignment]
    refused = r"(?s)payload for signal 'decision'.*approved"
    with pytest.raises(saga.InvalidInputError, match=refused):
        await run.signal("decision", bad)
    assert not [e for e in await run.history() if "signal" in e.kind]


class _Item(BaseModel):
    """A field of _Basket."""

    sku: str


class _Basket(BaseModel):
    """An input holding a model."""

    item: _Item


async def test_an_unvalidated_instance_inside_a_mapping_is_invalid_input(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """DESIGN.md: "Bad input gets a clear error, and nothing is lost"; an input is
    validated by pydantic first, invalid input raises `InvalidInputError`.

    An instance that does not validate, built with `model_construct`, is invalid input
    wherever it is: the whole input, or a field of a mapping
    (`{"item": _Item.model_construct(sku=5)}`), as the same values as plain mappings
    are; nothing is written. Before, the nested one was a SerializationError (pydantic
    takes an instance as it is)."""
    s = parked_saga("nested_instance", input=_Basket)
    await open_client(s)
    for bad in (
        _Basket.model_construct(item=_Item.model_construct(sku=5)),
        {"item": {"sku": 5}},
        {"item": _Item.model_construct(sku=5)},
    ):
        with pytest.raises(saga.InvalidInputError, match=r"item\.sku"):
            await s.start(bad)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0
