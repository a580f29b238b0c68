"""The runtime API as README's API section writes it: a resolved run without a key, an
output that no longer reads, and the signal's parameter names."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, field_validator

import saga
from tests.test_definition_edges import Decision, Order, _one_step_saga


async def test_cancel_of_resolved_failed_run_without_key_does_not_blame_a_key(
    orchestrator: Any,
) -> None:
    """README, API/Runtime, resolve(): a later `retry()` or `cancel()` makes it unresolved
    again, "except on a run with a concurrency key ... (saying so)". Refusing cancel()
    of a resolved failed run of a saga without a key does not blame a key. Before, the
    message said resolving it had freed its concurrency key."""
    s = saga.Saga("nokey", input=Order)

    @s.step()
    async def book(ctx: saga.Context[Order]) -> str:
        return "b"

    @book.compensate(retry=saga.Retry(max_attempts=1))
    async def unbook(ctx: saga.Context[Order], booking: str) -> None:
        raise RuntimeError("cannot undo")

    @s.step()
    async def pay(ctx: saga.Context[Order]) -> str:
        raise saga.PermanentError("declined")

    await orchestrator(s)
    run = await s.start(Order())
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=15)
    await run.resolve(note="refunded by hand")
    with pytest.raises(saga.InvalidRunStateError) as caught:
        await run.cancel()
    assert "concurrency key" not in str(caught.value), str(caught.value)


_STRICT = {"on": False}


class Voucher(BaseModel):
    code: str

    @field_validator("code")
    @classmethod
    def _current_format(cls, code: str) -> str:
        if _STRICT["on"]:  # e.g. a validator tightened in a deploy, or one reading a clock
            raise ValueError("voucher codes now start with 'v-'")
        return code


async def test_result_of_an_output_that_no_longer_validates_raises_a_saga_error(
    orchestrator: Any,
) -> None:
    """README, API/Errors: what saga raises has one root, `SagaError`. When a completed
    run's stored output no longer validates as the output type (a validator tightened
    under an unchanged fingerprint), `result()` raises a SerializationError saying so.
    Before, pydantic's ValidationError escaped `except saga.SagaError`."""
    s = saga.Saga("voucher", input=Order, output=Voucher)

    @s.step()
    async def issue(ctx: saga.Context[Order]) -> Voucher:
        return Voucher(code="old-1")

    await orchestrator(s)
    run = await s.start(Order())
    try:
        assert await run.result(timeout=15) == Voucher(code="old-1")
        _STRICT["on"] = True
        with pytest.raises(saga.SagaError):
            await run.result(timeout=15)  # raises pydantic.ValidationError instead
    finally:
        _STRICT["on"] = False


async def test_signal_takes_the_documented_wait_or_name_keyword(orchestrator: Any) -> None:
    """README, API/Runtime: `orch.signal(run_id, wait_or_name, payload, *, ...)` and
    RunHandle `signal(wait_or_name, payload, *, ...)`: the keyword works (it was named
    `signal` in the code)."""
    s = _one_step_saga("signal_kw")
    decision = s.wait_for("decision", Decision)

    @s.step()
    async def act(ctx: saga.Context[Order]) -> bool:
        return ctx.result(decision).ok

    orch = await orchestrator(s)
    run = await s.start(Order())
    assert await orch.signal(run.id, wait_or_name="decision", payload={"ok": True}) is True
    assert await run.signal(wait_or_name=decision, payload=Decision(ok=True)) is False
    assert await run.result(timeout=15) is True
