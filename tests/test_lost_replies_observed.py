"""A write whose reply was lost (the connection broke after the commit) is observed as one
whose reply came: the same log lines, spans and metrics, linear and graph runs alike.

README ("Tracing and metrics", "Logging"): `saga.outcome` tells `retry` from `failure`,
`saga.step.attempts` counts attempts "by outcome and error type", `saga.run.duration` is
"start to terminal state, by the database clock", "a run's end is counted once however it
ends: by a worker, after a write whose reply was lost"; "a run that waits for an operator
logs an error, `run_failed` or `run_stopped`, naming the step (or wait), attempt and error
type that stopped it".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

import saga
from saga.testing import Faults
from tests._sagas import Fail, Job, permanent, small_saga
from tests.conftest import OrchestratorFactory
from tests.test_telemetry import Tracing, points, total

_GRAPH = {"b": ["a"], "c": ["a"], "d": ["b", "c"]}
_ENDED = {
    "completed": None,
    "compensated": saga.RunCompensatedError,
    "failed": saga.RunFailedError,
}


@dataclass(frozen=True)
class Case:
    """A saga a, b, c, d (graph: a, then b and c, then d) and the write whose reply is
    lost: the one recording ``step``'s outcome (its compensation's, ``compensation``)."""

    name: str
    step: str
    ends: str
    compensation: bool = False
    fail: dict[str, Fail] = field(default_factory=dict)
    fail_undo: dict[str, Fail] = field(default_factory=dict)


CASES = [
    Case("completes", "d", "completed"),  # the write that ends the run
    Case("branch_done", "b", "completed"),  # a write in the middle
    Case("retry", "b", "completed", fail={"b": Fail(ConnectionError, "flaky", attempts=1)}),
    Case("fails", "c", "compensated", fail={"c": permanent("no")}),
    Case(
        "undo_gives_up",
        "a",
        "failed",
        compensation=True,
        fail={"c": permanent("no")},
        fail_undo={"a": Fail(KeyError, "gone")},
    ),
]


@dataclass
class Observed:
    lines: Counter[tuple[Any, ...]]
    spans: Counter[tuple[Any, ...]]
    metrics: dict[str, Any]
    duration: float  # saga.run.duration's sum
    took: float  # the run's start to end, by the database clock


async def _observe(
    orchestrator: OrchestratorFactory, case: Case, graph: bool, lose_reply: bool
) -> Observed:
    name = f"lost_{case.name}_{'g' if graph else 'l'}{'x' if lose_reply else ''}"
    s = small_saga(
        name,
        ["a", "b", "c", "d"],
        after=_GRAPH if graph else None,
        compensate={"a"},
        fail=case.fail,
        fail_undo=case.fail_undo,
        undo_retry=saga.Retry(max_attempts=1),
        delay={"a": 0.5},
    )
    tracing, reader = Tracing(), InMemoryMetricReader()
    faults = Faults()
    if lose_reply:
        faults.drop_connection_at_commit(case.step, compensation=case.compensation)
    with capture_logs() as logs:
        orch = await orchestrator(
            s, tracer_provider=tracing.provider, meter_provider=MeterProvider([reader])
        )
        faults.attach(orch)
        run = await s.start(Job())
        error = _ENDED[case.ends]
        if error is None:
            await run.result(timeout=30)
        else:
            with pytest.raises(error):
                await run.result(timeout=30)
        counted = f"saga.runs.{case.ends}"
        with anyio.fail_after(10):  # (a worker counts and logs after its write)
            while total(points(reader), counted) < 1:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.02)
        await anyio.sleep(0.2)
    if lose_reply:
        assert faults.fired["drop_connection_at_commit"] == 1
        resolved = [line for line in logs if line["event"] == "ambiguous_commit_resolved"]
        assert [line["committed"] for line in resolved] == [True]
    info = await run.info()
    assert info.status.value == case.ends
    assert info.finished_at is not None
    found = points(reader)
    return Observed(
        lines=Counter(
            _line(line)
            for line in logs
            if line.get("run_id") == str(run.id)
            and line["log_level"] != "debug"
            and line["event"] != "ambiguous_commit_resolved"
        ),
        spans=Counter(
            (
                sp.name.replace(name, "S"),
                (sp.attributes or {}).get("saga.outcome"),
                (sp.attributes or {}).get("error.type"),
                (sp.attributes or {}).get("saga.run.status"),
            )
            for sp in tracing.spans()
        ),
        metrics={
            metric: sorted(
                (tuple(sorted((k, v) for k, v in a.items() if k != "saga.name")), value)
                for a, value in found.get(metric, [])
            )
            for metric in (
                "saga.step.attempts",
                "saga.compensation.attempts",
                f"saga.runs.{case.ends}",
                "saga.run.duration",
            )
        },
        duration=_sum(reader, "saga.run.duration"),
        took=(info.finished_at - info.created_at).total_seconds(),
    )


def _line(line: dict[str, Any]) -> tuple[Any, ...]:
    fields = ("event", "log_level", "step", "attempt", "error_type")
    return tuple(line.get(f) for f in fields)


def _sum(reader: InMemoryMetricReader, name: str) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        point.sum  # type: ignore[union-attr]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "linear"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_write_whose_reply_was_lost_is_logged_traced_and_counted_as_any(
    orchestrator: OrchestratorFactory, case: Case, graph: bool
) -> None:
    """The same run twice, once with the reply of one write lost after its commit: the
    same non-debug log lines for the run (event, level, step, attempt, error type), the
    same spans (name, outcome, error type, run status), the same attempt and end
    counters, and a run duration covering the run by the database clock. Before, a
    graph run's lost reply logged none of the write's events (no `run_failed` for a run
    waiting for an operator), traced a retried attempt as a `failure`, and timed the run
    from its latest step's claim (0.10 s for a run of 1.66 s)."""
    seen = await _observe(orchestrator, case, graph, lose_reply=False)
    lost = await _observe(orchestrator, case, graph, lose_reply=True)
    assert lost.lines == seen.lines
    assert lost.spans == seen.spans
    assert lost.metrics.keys() == seen.metrics.keys()
    for metric, values in seen.metrics.items():
        if metric == "saga.run.duration":  # (a histogram: its count)
            assert [a for a, _ in lost.metrics[metric]] == [a for a, _ in values]
            assert [n for _, n in lost.metrics[metric]] == [1]
        else:
            assert lost.metrics[metric] == values, metric
    for observed in (seen, lost):
        assert observed.duration == pytest.approx(observed.took, abs=0.25)
