"""The README's demo runs: one order completes, one is compensated, timelines print."""

from __future__ import annotations

import pytest

from saga._demo import run_demo


async def test_demo_completes_one_order_and_compensates_the_other(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo prints a completed run and a compensated one whose refund and release ran
    newest first, each with its timeline."""
    assert await run_demo(dsn) == 0
    out = capsys.readouterr().out
    assert "completed: parcel for rsv-o-1001" in out
    assert "compensated: saga.PermanentError in step 'ship'" in out
    assert out.index("refunded ch-o-1002-nowhere") < out.index("released reservation")
    assert out.count("timeline:") == 2
    assert "run_compensated" in out
