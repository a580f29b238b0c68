"""examples/tracing.py runs and its console exporter shows the run's spans."""

from __future__ import annotations

import pytest

from tests import _harness

EXAMPLE = _harness.ROOT / "examples" / "tracing.py"


@pytest.mark.timeout(90)
async def test_tracing_example_exports_the_runs_spans(dsn: str) -> None:
    """Run as its own process (it sets the global providers), the example completes one
    order, compensates the other, and exports saga's spans and metrics to the console."""
    result = await _harness.run(str(EXAMPLE), env=_harness.python_env(dsn), timeout=80)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert "o-1 -> ch-1" in out
    assert "o-2-declined -> compensated" in out
    for name in ('"saga.start checkout"', '"saga.step reserve"', '"saga.compensate reserve"'):
        assert name in out
    assert '"saga.runs.started"' in out
