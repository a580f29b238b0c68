"""A children step's list of children is the one its inputs gave: a key taken by a run
started outside the step, or a retry whose inputs changed length, fails the step for
good (its children undone) instead of joining another list; inputs raising
PermanentError fail it at once."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Gate, Job, Ledger, small_saga
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]


def _chunk(ledger: Ledger) -> saga.Saga[Job]:
    """A child: load (compensated) returns 10 x its input's n."""
    return small_saga(
        "chunk", ["load"], compensate=True, ledger=ledger,
        result=lambda ctx: ctx.input.n * 10,
    )  # fmt: skip


@pytest.mark.timeout(60)
async def test_a_run_already_holding_a_childs_key_does_not_silently_shrink_the_result(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "Each child is started with the key
    `<run>:child:<step>:<count>:<index>` ... the first input given for a key wins." and
    "All completed: the step's result is the list of their outputs, in input order."

    A run of the child saga started (by anyone: the key is documented) with the key of
    child 0 before the children step runs. Before, the step started child 1 only,
    ignored the run holding key 0 (it is not linked to the parent), and completed with
    ``[20]``: one output for two inputs. Now the step fails for good
    (``saga.TakenKey``, naming the key), child 1 is undone, and the other run is left
    alone."""
    ledger, gate = Ledger(), Gate("split")
    child = _chunk(ledger)
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger, gate=gate)
    parent.children("chunks", child, lambda ctx: [Job(n=1), Job(n=2)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    squatter = await orch.start(child, Job(n=7), key=f"{run.id}:child:chunks:2:0")
    assert await squatter.result(timeout=10) == 70
    gate.release.set()
    with pytest.raises(saga.RunCompensatedError) as ended:
        await run.result(timeout=20)
    assert ended.value.error is not None
    assert ended.value.error.type == "saga.TakenKey", ended.value.error
    assert f"{run.id}:child:chunks:2:0" in ended.value.error.message
    assert (await squatter.info()).status is saga.RunStatus.COMPLETED  # not the step's
    kids = [k for k in (await saga.list_runs(orch, saga="chunk")).runs if k.id != squatter.id]
    assert [k.status for k in kids] == [saga.RunStatus.CANCELLED], kids  # child 1, undone


@pytest.mark.timeout(90)
async def test_a_retried_children_step_whose_inputs_changed_length_starts_no_second_child(
    orchestrator: OrchestratorFactory, db: Any
) -> None:
    """README, Child sagas: "Each child is started with the key
    `<run>:child:<step>:<count>:<index>`, so a retried step (a crash, an expired lease)
    never starts a second child; the first input given for a key wins."

    The first attempt computes 3 inputs and starts child 0; the start of child 1 meets
    a database outage (a trigger raises, twice) and the attempt's lease expires. The
    next attempt calls ``inputs`` again, which now returns 2 items (an external listing
    changed). Before, it started them under keys with count 2, so input 0 got a second
    child, and the step completed with 3 outputs, ``[0, 0, 10]``, for a list of 2. Now
    the step fails for good (``saga.InputsChanged``, README: inputs must return the same
    list on every attempt): child 0 is undone (cancelled) and no second child starts."""
    await db.execute(
        """
        CREATE SEQUENCE saga.h30_seq;
        CREATE FUNCTION saga.h30_outage() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.idempotency_key LIKE '%:child:chunks:3:1'
               AND nextval('saga.h30_seq') <= 2 THEN
                RAISE EXCEPTION 'h30 injected outage';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER h30_outage BEFORE INSERT ON saga.runs
            FOR EACH ROW EXECUTE FUNCTION saga.h30_outage();
        """
    )
    ledger = Ledger()
    calls: list[int] = []
    child = _chunk(ledger)
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)

    def inputs(ctx: Ctx) -> list[Job]:
        calls.append(ctx.attempt)
        return [Job(n=i) for i in range(3 if len(calls) == 1 else 2)]

    parent.children("chunks", child, inputs, after=["split"])
    orch = await orchestrator(parent, child, lease_seconds=1)
    run = await orch.start(parent, Job())
    with pytest.raises(saga.RunCompensatedError) as ended:
        await run.result(timeout=40)
    assert len(calls) >= 2, "premise: the step was retried"
    assert ended.value.error is not None
    assert ended.value.error.type == "saga.InputsChanged", ended.value.error
    kids = (await saga.list_runs(orch, saga="chunk")).runs
    assert [k.status for k in kids] == [saga.RunStatus.CANCELLED], kids


@pytest.mark.timeout(60)
async def test_inputs_raising_permanent_error_fail_the_children_step_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "`inputs(ctx)` (sync or async) returns the children's
    inputs"; README, Retries: "`saga.PermanentError` and the `non_retryable` types fail
    at once."

    An ``inputs`` function raising ``saga.PermanentError`` fails the step at its first
    attempt. Before, it was called on 3 attempts (``[1, 2, 3]``, with backoffs between
    them): the children step classified every exception of ``inputs`` but its own
    refusals as retryable, without asking the step's policy."""
    ledger = Ledger()
    calls: list[int] = []
    child = _chunk(ledger)
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)

    async def inputs(ctx: Ctx) -> list[Job]:
        calls.append(ctx.attempt)
        raise saga.PermanentError("no inputs today")

    parent.children("chunks", child, inputs, after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with pytest.raises(saga.RunCompensatedError, match="no inputs today"):
        await run.result(timeout=20)
    assert calls == [1], f"inputs called on attempts {calls}"
