"""Every error message a run's page shows goes through ``redact("error", message)``,
wherever in the run's history the error sits."""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Job, permanent, small_saga
from tests.web.conftest import ALICE, Browser

pytestmark = pytest.mark.timeout(60)


async def test_a_failing_childs_error_in_the_history_is_redacted(
    orchestrator: Any, browse: Browser
) -> None:
    """README (Dashboard): shown payloads pass through redact(path, value) "and error
    messages through redact("error", message)". A children step whose child failed for
    good records the child's error in its ``children_waiting`` event (``failing``): the
    history's details show it redacted, with its type. Before, the details printed every
    field but ``error`` verbatim, so this message, redacted everywhere else, leaked."""
    secret = "SECRET-4111"
    child = small_saga(
        "chunk",
        ["load", "check"],
        compensate={"load"},
        fail={"load": permanent(f"card {secret} declined", when=lambda ctx: ctx.input.n == 1)},
        delay={"check": 1.0},  # the siblings still run when n=1 fails: they are undone
    )
    parent = small_saga("imp", ["split"], compensate=True)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(3)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(30), pytest.raises(saga.RunError):
        await run.result()
    history = await run.history()
    assert any("failing" in e.data for e in history if e.kind == "children_waiting")

    def redact(path: str, value: Any) -> Any:
        return "[redacted]"

    http = await browse(orch, redact=redact)
    with anyio.fail_after(20):
        page = (await http.get(f"/saga/runs/{run.id}", headers=ALICE)).text
    leaks = [page[max(0, m.start() - 120) : m.end()] for m in re.finditer(secret, page)]
    assert leaks == []
    assert "failing=saga.ChildFailed: [redacted]" in page
