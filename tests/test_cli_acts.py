"""`saga cancel`, `retry`, `resolve`, `skip-compensation` and `attention` on a real
PostgreSQL: each records who acted and why, and bulk actions (`--all`) count first and
act only when told how many runs to expect."""

from __future__ import annotations

import uuid

import pytest

import saga
from tests._sagas import Job
from tests._wait_sagas import trip
from tests.conftest import Cli, OrchestratorFactory

TARGET = "tests._wait_sagas:trip"


async def _failed(orch: saga.Orchestrator) -> saga.RunHandle:
    run = await orch.start(trip, Job(n=1))
    with pytest.raises(saga.RunFailedError, match="hotel desk closed"):
        await run.result(timeout=10)
    return run


def _data(history: list[saga.HistoryEvent], kind: str) -> list[dict[str, object]]:
    return [dict(e.data or {}) for e in history if e.kind == kind]


async def test_resolve_and_attention(cli: Cli, orchestrator: OrchestratorFactory) -> None:
    """`saga attention` lists the failed runs oldest first; `saga resolve RUN --note`
    marks one resolved with the note and --by in its history, and it leaves the list;
    without --note it is a usage error (exit 2) and nothing changes."""
    orch = await orchestrator(trip)
    first, second = await _failed(orch), await _failed(orch)
    listed = await cli.json("attention")
    assert [r["id"] for r in listed["runs"]] == [str(first.id), str(second.id)]
    code, _, err = await cli("resolve", str(first.id))
    assert code == 2
    assert "--note" in err
    assert not (await first.info()).resolved
    code, out, err = await cli("resolve", str(first.id), "--note", "refunded", "--by", "ann")
    assert code == 0, err
    assert "marked resolved" in out
    assert _data(await first.history(), "run_resolved") == [{"by": "ann", "note": "refunded"}]
    listed = await cli.json("attention")
    assert [r["id"] for r in listed["runs"]] == [str(second.id)]
    code, _, err = await cli("resolve", str(first.id), "--note", "again")
    assert code == 4
    assert "resolved already" in err


async def test_skip_compensation_from_the_command_line(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga skip-compensation RUN --note --target` skips the compensation that gave up:
    the run ends compensated and the history says who skipped it (the user running the
    command by default). A run that is not failed exits 4; an unknown one 3."""
    orch = await orchestrator(trip)
    run = await _failed(orch)
    code, out, err = await cli(
        "skip-compensation", str(run.id), "--note", "by hand", "--target", TARGET
    )
    assert code == 0, err
    assert "skipped; the run is compensated" in out
    skipped = _data(await run.history(), "compensation_skipped")
    assert len(skipped) == 1
    assert skipped[0]["note"] == "by hand"
    assert skipped[0]["by"]  # the user name
    code, _, err = await cli("skip-compensation", str(run.id), "--note", "x", "--target", TARGET)
    assert code == 4, err
    unknown = str(uuid.uuid4())
    code, _, err = await cli("skip-compensation", unknown, "--note", "x", "--target", TARGET)
    assert code == 3, err


async def test_cancel_and_retry_record_the_operator(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga retry RUN --by --note` resumes a failed run and records both in its
    run_retried event."""
    orch = await orchestrator(trip)
    run = await _failed(orch)
    code, _, err = await cli("retry", str(run.id), "--by", "bea", "--note", "desk open")
    assert code == 0, err
    assert _data(await run.history(), "run_retried") == [{"by": "bea", "note": "desk open"}]


async def test_bulk_retry_counts_first_and_acts_on_the_expected_count(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga retry --all --saga trip --status failed` prints how many runs match and
    changes nothing; with the wrong --expect it refuses (exit 2), nothing changed; with
    the right one it retries them all; a run id with --all, or filters without it, is a
    usage error."""
    orch = await orchestrator(trip)
    runs = [await _failed(orch) for _ in range(2)]
    filters = ["--saga", "trip", "--status", "failed"]
    code, out, err = await cli("retry", "--all", *filters)
    assert code == 0, err
    assert "2 runs match; nothing changed" in out
    assert "--expect 2" in out
    code, _, err = await cli("retry", "--all", *filters, "--expect", "3", "--note", "n")
    assert code == 2
    assert "2 runs match now, not the 3 expected" in err
    for run in runs:
        assert _data(await run.history(), "run_retried") == []
    result = await cli.json("retry", "--all", *filters, "--expect", "2", "--by", "cy")
    assert sorted(result["acted"]) == sorted(str(r.id) for r in runs)
    for run in runs:
        assert _data(await run.history(), "run_retried") == [{"by": "cy"}]
    code, _, _ = await cli("retry", str(runs[0].id), "--all")
    assert code == 2
    code, _, _ = await cli("cancel", str(runs[0].id), "--saga", "trip")
    assert code == 2
    code, out, _ = await cli("cancel", "--all", "--saga", "trip", "--limit", "1")
    assert code == 0
    assert "more than 1 runs match" in out
