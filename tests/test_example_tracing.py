"""examples/tracing.py runs and its console exporter shows the run's spans."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "tracing.py"


@pytest.mark.timeout(90)
async def test_tracing_example_exports_the_runs_spans(dsn: str) -> None:
    """Run as its own process (it sets the global providers), the example completes one
    order, compensates the other, and exports saga's spans and metrics to the console."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"SAGA_DSN": dsn, "PYTHONPATH": str(EXAMPLE.parent.parent)}
    result = await anyio.run_process([sys.executable, str(EXAMPLE)], env=env, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "o-1 -> ch-1" in out
    assert "o-2-declined -> compensated" in out
    for name in ('"saga.start checkout"', '"saga.step reserve"', '"saga.compensate reserve"'):
        assert name in out
    assert '"saga.runs.started"' in out
