"""Prune and concurrency keys: a run prune cannot delete keeps its key."""

from __future__ import annotations

from datetime import timedelta

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import ONCE, Job, permanent, small_saga
from tests.conftest import OrchestratorFactory


async def test_a_prune_that_skips_a_held_key_holder_does_not_free_its_key(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """README (Retention): "A run pruned still holding its concurrency key frees it in
    the same transaction as its deletion"; (Traffic control) "A run that ends `failed`
    or `stopped` keeps its key (the account's state is uncertain) until an operator
    resolves it ..., or retries or cancels it"; (Operator API, prune) "each one short
    statement that skips rows another transaction holds"; `retry()` "resumes a `failed`
    run at the compensation that gave up".

    A keyed run fails (its compensation gave up) and holds its key; a second run of the
    key queues. `saga.prune(status=["failed"])` runs while another transaction holds
    the failed run's row (a caller's transaction that signalled it, say): prune skips
    it without waiting, deletes nothing, and the run keeps its key (its key is freed
    only in the transaction that deletes it). The queued run still waits, and the
    failed run's `retry()` works."""
    broken = {"on": True}
    s = small_saga(
        "holder", ["debit", "credit"], compensate={"debit"},
        fail={"credit": permanent("no", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"debit": permanent("undo broken", when=lambda ctx: broken["on"])},
        undo_retry=ONCE, traffic={"concurrency_key": lambda job: "acct"},
    )  # fmt: skip
    orch = await orchestrator(s)
    with anyio.fail_after(30):
        failing = await orch.start(s, Job(n=1))
        with pytest.raises(saga.RunFailedError):
            await failing.result(timeout=10)
        queued = await orch.start(s, Job(n=2))
        await anyio.sleep(0.3)
        assert (await queued.info()).waiting_for_key
        holder = await asyncpg.connect(dsn)
        tx = holder.transaction()
        await tx.start()  # another transaction holds the failed run's row meanwhile
        await holder.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", failing.id)
        try:
            with anyio.fail_after(5):  # skipped, never waited for
                pruned = await saga.prune(orch, older_than=timedelta(0), status=["failed"])
        finally:
            await tx.rollback()
            await holder.close()
        assert pruned.runs == 0  # the held row was skipped, as documented
        info = await failing.info()
        assert info.status is saga.RunStatus.FAILED
        assert not info.resolved
        assert (await queued.info()).waiting_for_key, "the key went to the next run"
        broken["on"] = False
        await failing.retry(by="ana", note="undo works again")
        with pytest.raises(saga.RunCompensatedError):
            await failing.result(timeout=10)
