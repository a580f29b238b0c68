"""The README's demo runs: one order completes, one is compensated, timelines print."""

from __future__ import annotations

from tests import _harness


async def test_demo_completes_one_order_and_compensates_the_other(dsn: str) -> None:
    """The demo (`python -m saga demo`, as scripts/demo.sh runs it, on SAGA_DSN) prints a
    completed run and a compensated one whose refund and release ran newest first, each
    with its timeline."""
    done = await _harness.run("-m", "saga", "demo", env=_harness.python_env(dsn), timeout=50)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "completed: parcel for rsv-o-1001" in out
    assert "compensated: saga.PermanentError in step 'ship'" in out
    assert out.index("refunded ch-o-1002-nowhere") < out.index("released reservation")
    assert out.count("timeline:") == 2
    assert "run_compensated" in out
