"""The benchmarks at smoke size (``python -m benchmarks.run --smoke``) against the test
server: they still run end to end on this saga, and the report still renders.

Benchmarks are code like the rest: without this, a reshaped core (a renamed column, a
changed statement) breaks them silently until the next full run. No timing is asserted:
figures from a shared CI machine and a non-durable test cluster mean nothing.
"""

from __future__ import annotations

import pytest

from benchmarks import _versus
from benchmarks._options import parse_args
from benchmarks.run import run_suite


@pytest.mark.timeout(180)
async def test_smoke_run_completes_every_run_and_renders_the_report(base_dsn: str) -> None:
    """With ``--smoke --dsn``, the hand-written queue, the saga throughput and drain rows,
    the versus rows (both hand-written queues drained, saga drained in 1 and 4 processes
    and embedded), the waits rows (2-step sagas with and without a signal wait, commits
    per run), the scale section (finished runs cloned into a past day's partitions,
    EXPLAIN of the claim reading that partition through its due index) and the profile
    (saga's Store calls counted in the worker) each finish every run as expected (the
    harness checks every run's final state and raises otherwise), with positive runs/s;
    the retention section prunes its loaded day whole (one day, every run, no dead row
    left, the tables smaller) and, loaded into the DEFAULT partitions, row by row (dead
    rows left); the report renders those sections and says the ceiling (pgbench) was
    skipped."""
    opts, dsn, output = parse_args(["--smoke", "--dsn", base_dsn])
    assert dsn == base_dsn
    assert output is None, "a smoke run never writes RESULTS.md"
    assert "ceiling" not in opts.sections

    results, report = await run_suite(opts, base_dsn, cluster=None)

    t = results.throughput
    assert set(t.queue) == {16}
    assert set(t.saga) == {(16, 1)}
    assert set(t.drain) == {(64, 1)}
    assert results.scale is not None
    assert results.waits is not None
    measured = [*t.queue[16], *t.saga[(16, 1)], *t.drain[(64, 1)]]
    measured += [row.measured for row in [*results.waits.plain, *results.waits.waits]]
    measured += [*results.scale.empty, *results.scale.big]
    measured += [row.measured for row in results.profile.values()]
    for m in measured:
        assert m.runs_per_s > 0
        assert m.seconds > 0
        assert m.worker_cpu >= 0
    assert all(m.runs == opts.runs for m in measured[:5])
    (waited,) = results.waits.waits
    # Every run's signal was written, by at most one commit per signal (group commit).
    assert 1 <= waited.by_events.get("signal_received", 0) <= opts.runs
    assert waited.claims > 0
    assert results.ceiling is None

    versus = results.versus
    assert set(versus) == set(_versus.SPECS)
    for spec, reps in versus.items():
        (m,) = reps
        assert m.runs == spec.runs(opts.runs)
        assert m.runs_per_s > 0
        assert m.worker_cpu > 0
    batched = versus[_versus.Spec("batched", 16)][0]
    assert batched.writes_per_item < 1, "16 jobs per claim and per completion"
    assert [t.ok for t in _versus.targets(versus)].count(None) == 0

    assert results.scale.load.runs == opts.scale_runs + 1  # the clones and their template
    assert "runs" in results.scale.custom_plan
    assert "runs" in results.scale.generic_plan
    assert len(results.scale.load.days) == 1
    assert results.scale.uses_due_index, results.scale.custom_plan
    retention = results.retention
    assert retention is not None
    whole, rowwise = retention.whole, retention.rowwise
    assert (whole.result.runs, whole.result.days) == (opts.retention_runs, 1)
    assert whole.result.events == opts.retention_runs * whole.load.per_run
    assert whole.dead_left == 0
    assert whole.bytes_after < whole.bytes_before
    assert (rowwise.result.runs, rowwise.result.days) == (opts.retention_rowwise_runs, 0)
    assert rowwise.result.batches >= 1
    assert rowwise.dead_left > 0, "deleted rows stay until vacuum"
    for row in results.profile.values():
        assert row.measured.calls.get("claim", 0) > 0
        assert row.measured.calls.get("transition", 0) > 0

    for heading in (
        "## Targets",
        "## Throughput: 3-step no-op chains",
        "| queue (no framework), 1 process x 16",
        "| saga, 1 process x 16",
        "| saga drain, 1 process x 64",
        "## Versus: saga beside hand-written queues (issue 15)",
        "| issue 15, saga beside hand-written queues (section Versus) |",
        "| queue batched (16 per claim), drain, 1 process x 16",
        "| saga embedded (32 starters in the process), 1 process x 64",
        "| 4 worker processes ≥ 1 process (drain) |",
        "## Waits: what a wait costs",
        "| 2-step with a wait, 1 process x 64",
        "| entering a wait adds no commit",
        "## Scale",
        "## Retention: pruning a day of",
        f"| pruning a day of {opts.retention_runs:,} runs takes seconds",
        "| pruning leaves no bloat",
        "## Where the time goes",
        "SMOKE RUN",
        "the ceiling (pgbench) is skipped",
    ):
        assert heading in report
    assert "## Ceiling" not in report


@pytest.mark.timeout(120)
def test_span_cost_setups_export_every_span_and_render() -> None:
    """The tracing section's breakdown of a traced attempt's CPU (benchmarks/_spancost):
    every setup measures a positive cost, its exporter receives every span it should
    (none dropped, even when more attempts are made than the processor's queue holds,
    and the sampled setup's share only), and the table renders a row per setup."""
    import threading
    from http.server import ThreadingHTTPServer

    from benchmarks import _spancost
    from benchmarks._otel import MAX_QUEUE, _Discard

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        costs: dict[str, list[float]] = {}
        for name, _ in _spancost.SETUPS:
            attempts = 2 * MAX_QUEUE if name == "encode" else 300
            cost, lost = _spancost._measure(name, endpoint, attempts)
            assert cost > 0, name
            assert lost == 0, (name, lost)
            costs[name] = [cost]
    finally:
        server.shutdown()
        server.server_close()
    table = "\n".join(_spancost.render(costs, 0, 300, 60.0, 160.0))
    for name, _ in _spancost.SETUPS:
        assert f"| {name}: " in table
