"""Rolling deploys: operator actions and signals from clients whose definition of a run's
saga differs (same name and version, another fingerprint), a parent whose child saga's
version changed, fingerprint stability (import order, read before registration), and a
schema migrated by a newer release.

DESIGN.md, "Deploys are safe": a run records the saga name, version and a fingerprint of
the definition it started with; an orchestrator executes only work whose definition it
has, fingerprint included; other work waits (counted and logged). Migrations move
existing installations over without downtime for running sagas. Every test here states
the promise it checks.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import ONCE, Job, Ledger, permanent, small_saga, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

TERMINAL = (
    saga.RunStatus.COMPLETED,
    saga.RunStatus.COMPENSATED,
    saga.RunStatus.FAILED,
    saga.RunStatus.CANCELLED,
)


# -- operator actions from a client holding another definition ------------------------------


def _skipper(ledger: Ledger, compensate: list[str]) -> saga.Saga[Any]:
    """reserve -> charge -> ship (ship fails for good; charge's compensation gives up at
    once). ``compensate`` names the steps that have a compensation."""
    return small_saga(
        "skipper",
        ["reserve", "charge", "ship"],
        compensate=compensate,
        ledger=ledger,
        fail={"ship": permanent()},
        fail_undo={"charge": permanent("cannot refund")},
        retry=ONCE,
        undo_retry=ONCE,
    )


@pytest.mark.timeout(60)
async def test_skip_compensation_from_a_client_with_another_fingerprint_skips_nothing_else(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """DESIGN "Deploys are safe" (work runs only by the definition it started with) and
    "Compensation ... Nothing is ever silently skipped": an operator skipping the
    compensation that gave up, from a client whose definition of the same name and
    version has another fingerprint (here: ``reserve`` has no compensation in it), must
    not plan the rest of the rollback from that other definition. Either the skip is
    refused, or the run goes on to undo ``reserve`` (its own definition compensates it)."""
    ledger = Ledger()
    mine = _skipper(ledger, ["reserve", "charge"])
    other = _skipper(Ledger(), ["charge"])
    assert mine.fingerprint != other.fingerprint
    with anyio.fail_after(45):
        worker = await orchestrator(mine)
        run = await worker.start(mine, Job(n=1))
        info = await until_status(run, saga.RunStatus.FAILED)
        assert ledger.trace(run.id) == ["reserve", "charge", "ship", "undo charge"]
        operator = await open_client(other)
        try:
            await operator.skip_compensation(run.id, note="refunded by hand", by="ops")
        except (saga.ConfigurationError, saga.DefinitionError):
            return  # refused: the acting client lacks the run's definition
        info = await until_status(run, *TERMINAL)
        await anyio.sleep(0.5)
    assert "undo reserve" in ledger.trace(run.id), (
        f"the skip planned from another definition ended the run {info.status} without "
        f"undoing 'reserve': {ledger.trace(run.id)}"
    )


# -- signals from a client holding another definition ---------------------------------------


class DecisionA(BaseModel):
    approved: bool


class DecisionB(BaseModel):
    amount: int


def _approval(model: type[BaseModel], ledger: Ledger) -> tuple[saga.Saga[Any], Any]:
    s = saga.Saga("approval", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    wait = s.wait_for("decision", model, timeout=3600)

    @s.step(retry=ONCE)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        got = ctx.result(wait)
        return str(got.approved if model is DecisionA else got.amount)

    return s, wait


@pytest.mark.timeout(60)
async def test_signal_from_a_client_with_another_fingerprint_is_not_validated_against_its_wait(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """DESIGN "Runs can wait ... a named, typed signal" and "Deploys are safe": a client
    registering another definition of the run's (name, version) (its wait ``decision``
    takes another model, so the fingerprint differs) must not accept a payload the run's
    own wait model refuses, named or given its own Wait object (refused by the database
    then: nothing is written). Either the signal is refused before anything is written,
    or the run completes with it."""
    ledger = Ledger()
    mine, _ = _approval(DecisionA, ledger)
    other, other_wait = _approval(DecisionB, Ledger())
    assert mine.fingerprint != other.fingerprint
    with anyio.fail_after(45):
        worker = await orchestrator(mine)
        run = await worker.start(mine, Job(n=1))
        await until_status(run, saga.RunStatus.WAITING)
        web = await open_client(other)
        with pytest.raises(saga.InvalidInputError, match="fingerprint"):
            await web.signal(run.id, other_wait, DecisionB(amount=5))
        assert not [e for e in await run.history() if e.kind.startswith("signal_")]
        try:
            accepted = await web.signal(run.id, "decision", {"amount": 5})
        except (saga.DefinitionError, saga.InvalidInputError):
            return  # refused: fine
        info = await until_status(run, *TERMINAL)
    assert info.status is saga.RunStatus.COMPLETED, (
        f"the signal was accepted ({accepted}) after validation against another "
        f"definition's wait model; the run then ended {info.status}: {info.error}"
    )


# -- children steps: the child saga's version ------------------------------------------------


class KidV2(BaseModel):
    n: int
    currency: str


def _kid(version: int) -> saga.Saga[Any]:
    kid = saga.Saga("kid", input=Job if version == 1 else KidV2, version=version, output=int)

    @kid.step()
    async def work(ctx: saga.Context[Any]) -> int:
        return int(ctx.input.n) * 10

    return kid


def _parent(kid: saga.Saga[Any]) -> saga.Saga[Any]:
    parent = saga.Saga("parent", input=Job)

    @parent.step()
    async def split(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    def inputs(ctx: saga.Context[Job]) -> list[dict[str, Any]]:
        item: dict[str, Any] = {"n": ctx.result(split)}
        if kid.version == 2:
            item["currency"] = "EUR"
        return [item]

    parent.children("kids", kid, inputs, after=[split])
    return parent


@pytest.mark.timeout(60)
async def test_a_children_steps_child_version_is_part_of_the_parents_definition(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, dsn: str
) -> None:
    """DESIGN "Deploys are safe": a run is executed only by the definition it started
    with. A parent whose children step starts ``kid`` v1, redeployed to start ``kid`` v2
    (its input model changed, so it got a version bump), is another definition of the
    parent: the fingerprint includes the child saga (``children:<name>``) but not its
    version. A parent run started under the old definition must not be executed by the
    new one (which starts children of the other version, with inputs the new code
    computes)."""
    kid1, kid2 = _kid(1), _kid(2)
    old, new = _parent(kid1), _parent(kid2)
    with anyio.fail_after(45):
        web_old = await open_client(old, kid1)  # the previous release's web process
        run = await web_old.start(old, Job(n=3))
        worker_new = await orchestrator(new, kid2)  # the new release's only worker
        await anyio.sleep(3)
        conn = await asyncpg.connect(dsn)
        try:
            versions = [
                r["saga_version"]
                for r in await conn.fetch(
                    "SELECT saga_version FROM saga.runs WHERE parent_id = $1", run.id
                )
            ]
        finally:
            await conn.close()
        info = await run.info()
        unclaimable = await worker_new.unclaimable_runs()
    assert old.fingerprint != new.fingerprint, (
        f"both parent definitions share fingerprint {old.fingerprint}; the new worker ran the "
        f"old parent run (now {info.status}) and started children of kid v{versions}; "
        f"unclaimable={unclaimable}"
    )


# -- fingerprint stability -------------------------------------------------------------------

FORWARD = """
from __future__ import annotations
from pydantic import BaseModel
import saga

class Order(BaseModel):
    order_id: str

definition = saga.Saga("forward", input=Order)

@definition.step()
async def charge(ctx) -> Receipt:  # a model defined further down the module
    return Receipt(charge_id="c")

class Receipt(BaseModel):
    charge_id: str
"""


def _define(monkeypatch: pytest.MonkeyPatch, module: str, source: str) -> Any:
    namespace = types.ModuleType(module)
    monkeypatch.setitem(sys.modules, module, namespace)
    exec(source, namespace.__dict__)
    return namespace.definition


@pytest.mark.timeout(30)
def test_fingerprint_of_identical_definitions_read_before_registration_is_equal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: ``saga.fingerprint`` "is the definition's fingerprint, as recorded with
    its runs", and identical code gives identical fingerprints (else every run is
    stranded). Two identical definitions whose step's return annotation names a model
    defined further down its module (legal: resolved at registration) must have the same
    fingerprint when read before registration (a deploy script comparing fingerprints
    with ``unclaimable_runs()`` reads it so)."""
    first = _define(monkeypatch, "h7_forward_a", FORWARD)
    second = _define(monkeypatch, "h7_forward_b", FORWARD)
    assert first.fingerprint == second.fingerprint


@pytest.mark.timeout(30)
async def test_fingerprint_read_before_registration_is_the_one_recorded(
    monkeypatch: pytest.MonkeyPatch, open_client: ClientFactory
) -> None:
    """README: ``saga.fingerprint`` (a property of every Saga) "is the definition's
    fingerprint, as recorded with its runs": the value read before the saga is
    registered is the one its runs record, for a step annotated with a model defined
    further down the module, and for a linear saga with a children step."""
    forward = _define(monkeypatch, "h7_forward_c", FORWARD)
    kid = _kid(1)
    linear = saga.Saga("linear_parent", input=Job)
    linear.children("kids", kid, lambda ctx: [Job(n=1)])
    before = {"forward": forward.fingerprint, "linear_parent": linear.fingerprint}
    await open_client(forward, linear, kid)
    after = {"forward": forward.fingerprint, "linear_parent": linear.fingerprint}
    assert before == after


# -- draining without an old worker ----------------------------------------------------------


# -- migrations under processes of the previous release --------------------------------------

#: start_run as the release before migration 0009 sends it (saga/sql/queries.sql at
#: 53418c8~1), schema "saga".
PREVIOUS_START_RUN = """
WITH ins AS (
    INSERT INTO saga.runs
        (id, saga_name, saga_version, idempotency_key, input, step_name, due_at,
         trace_context, fingerprint, graph, status, pivot, parent_id, parent_step,
         priority, concurrency_key, key_state)
    VALUES ($1, $2, $3, $4, $5, $6,
            CASE WHEN $11::boolean OR $16::text IS NOT NULL THEN 'infinity'::timestamptz
                 ELSE now() END,
            $8::jsonb, $10, $11::boolean,
            CASE WHEN $11::boolean THEN 'running' ELSE 'pending' END, $12, $13, $14,
            $15, $16, CASE WHEN $16::text IS NOT NULL THEN 'queued' END)
    ON CONFLICT (saga_name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), ev AS (
    INSERT INTO saga.events (run_id, kind, data)
    SELECT id, 'run_started',
           jsonb_build_object('saga', $2::text, 'version', $3::integer, 'key', $4::text,
                              'fingerprint', $10::text)
    FROM ins
)
SELECT id, CASE WHEN $9 THEN pg_notify($7, $2)::text END AS notified FROM ins;
"""


# -- fingerprint stability: import order -----------------------------------------------------

CIRCULAR = """
from __future__ import annotations
from pydantic import BaseModel
import saga
import h7_models as models  # app/models.py, which imports this module too

class Order(BaseModel):
    order_id: str

definition = saga.Saga("circular", input=Order)

@definition.step()
async def charge(ctx) -> models.Receipt:
    return models.Receipt(charge_id="c")
"""


class Receipt(BaseModel):
    charge_id: str


def _import_sagas(monkeypatch: pytest.MonkeyPatch, models_first: bool) -> Any:
    """The sagas module imported in a process where ``h7_models`` is complete (imported
    first, e.g. `saga worker app.sagas:SAGAS`), or still being initialised when the
    sagas module is declared (a circular import: the web app imports its models first,
    the models import the sagas module, whose step annotations name ``models.Receipt``,
    defined below that import in the models module)."""
    models = types.ModuleType("h7_models")
    if models_first:
        models.Receipt = Receipt  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "h7_models", models)
    definition = _define(monkeypatch, "h7_sagas", CIRCULAR)
    models.Receipt = Receipt  # type: ignore[attr-defined]  # the models module completes
    return definition


@pytest.mark.timeout(30)
async def test_fingerprint_does_not_depend_on_import_order(
    monkeypatch: pytest.MonkeyPatch, open_client: ClientFactory
) -> None:
    """DESIGN "Deploys are safe" / README: the fingerprint of an unchanged definition is
    stable (a fingerprint that differs between two processes running identical code
    strands every run). The same sagas module, registered in two processes that imported
    it in a different order (a circular import between models and sagas, as a web app
    and a `saga worker` may), must give one fingerprint and one result type. Here a
    return annotation that raised AttributeError while the models module was still
    initialising became ``Any`` for good (only a NameError is resolved at registration)."""
    worker_side = _import_sagas(monkeypatch, models_first=True)
    await open_client(worker_side)
    web_side = _import_sagas(monkeypatch, models_first=False)
    await open_client(web_side)
    assert (web_side.steps[0].result_type, web_side.fingerprint) == (
        worker_side.steps[0].result_type,
        worker_side.fingerprint,
    )


async def test_a_schema_a_newer_release_migrated_is_refused(dsn: str) -> None:
    """A process of an earlier release (one knowing fewer migrations than the schema
    has) is refused when it opens, with migrate=True or False, and by saga.migrate():
    a MigrationError naming both versions, rather than statements failing later."""
    from saga._db import latest_migration

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        newer = latest_migration() + 1
        await pool.execute(
            "INSERT INTO saga.migrations (version, name, checksum) VALUES ($1, 'future', 'x')",
            newer,
        )
        with pytest.raises(saga.MigrationError, match=rf"migration {newer}; this one knows"):
            await saga.migrate(pool)
        for migrate in (True, False):
            client = saga.Client(dsn, migrate=migrate)
            with pytest.raises(saga.MigrationError, match="newer release"):
                await client.__aenter__()
    finally:
        await pool.close()
