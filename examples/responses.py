"""Framework-neutral JSON bodies for the web examples: a run's outcome and timeline."""

from __future__ import annotations

from typing import Any

import saga

#: The longest a request may wait for a run's outcome, in seconds.
MAX_WAIT = 30.0


async def outcome(run: saga.RunHandle, timeout: float) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for a run's outcome: 200 once it ended, 202 while it runs."""
    try:
        output = await run.result(timeout=timeout)
    except saga.RunTimeoutError:
        return 202, {"run_id": str(run.id), "status": str(await run.status())}
    except saga.RunError as exc:
        return 200, {
            "run_id": str(run.id),
            "status": exc.status,
            "error": str(exc.error) if exc.error else None,
            "compensation_error": str(exc.compensation_error) if exc.compensation_error else None,
        }
    return 200, {"run_id": str(run.id), "status": "completed", "output": output.model_dump()}


def describe(info: saga.RunInfo, history: list[saga.HistoryEvent]) -> dict[str, Any]:
    """A run as JSON: state, error, and the timeline (one entry per history event)."""
    return {
        "run_id": str(info.id),
        "status": str(info.status),
        "step": info.step,
        "completed_steps": list(info.completed_steps),
        "error": str(info.error) if info.error else None,
        "compensation_error": str(info.compensation_error) if info.compensation_error else None,
        "created_at": info.created_at.isoformat(),
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "timeline": [
            {
                "at": event.at.isoformat(),
                "kind": event.kind,
                "step": event.step,
                "attempt": event.attempt,
                "worker": event.worker,
                "error": str(event.error) if event.error else None,
            }
            for event in history
        ],
    }
