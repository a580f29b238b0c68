"""Payloads and exception messages stay out of logs."""

from __future__ import annotations

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
from saga.testing import Faults
from tests._sagas import fast
from tests.conftest import OrchestratorFactory

SECRET = "sentinel-4242-do-not-log"


class Card(BaseModel):
    number: str


async def test_secrets_in_inputs_results_and_errors_never_reach_logs(
    orchestrator: OrchestratorFactory,
) -> None:
    """A sentinel placed in the input, in step results, and in the messages of transient,
    permanent and compensation errors appears in no log entry, while the log still names
    every failure by its type."""
    s = saga.Saga("secretive", input=Card)  # written out: where the secret flows is the point

    @s.step(retry=fast(2))
    async def tokenize(ctx: saga.Context[Card]) -> str:
        if ctx.attempt == 1:
            raise ConnectionError(f"gateway rejected {ctx.input.number}")
        return f"token-for-{ctx.input.number}"

    @tokenize.compensate(retry=fast(2))
    async def forget(ctx: saga.Context[Card], token: str) -> None:
        if ctx.attempt == 1:
            raise RuntimeError(f"could not forget {token}")

    @s.step()
    async def charge(ctx: saga.Context[Card]) -> None:
        raise saga.PermanentError(f"declined card {ctx.input.number}")

    faults = Faults()
    faults.drop_connection_at_commit("tokenize", committed=False)
    orch = await orchestrator(s)
    faults.attach(orch)
    with capture_logs() as logs:
        run = await s.start(Card(number=SECRET))
        with pytest.raises(saga.RunCompensatedError, match=SECRET):
            await run.result(timeout=10)  # the caller may see it; logs may not
    assert logs, "nothing was logged: the check below would prove nothing"
    leaked = [entry for entry in logs if SECRET in repr(entry)]
    assert leaked == []
    error_types = {entry.get("error_type") for entry in logs}
    assert {"ConnectionError", "RuntimeError", "saga.PermanentError"} <= error_types
