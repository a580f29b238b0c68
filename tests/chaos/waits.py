"""The chaos suite's waiting runs: the signaller that sends ``approval`` signals to runs
of ``chaos_wait`` at random moments, and the invariants of those runs.

Each waiting run gets a plan: its signal right after the start (before it reaches the
wait, often while it sleeps), at a random later moment, once it is seen waiting, once
its timeout has passed (refused once a worker decided it), or never (its wait times
out and it compensates); a share of the signalled ones get a second signal. Every
signal carries a nonce of its own; sends broken by the chaos are repeated with the same
nonce (an ambiguous commit then comes back as a repeat).
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg

import saga
from tests.chaos.rig import CONNECTION_ERRORS, Rig
from tests.chaos.sagas import WAIT_NAME, WAIT_SAGA, WAIT_TIMEOUT, Approval

PLANS = ("before", "later", "waiting", "late", "never")
PLAN_WEIGHTS = (0.2, 0.2, 0.2, 0.2, 0.2)
REPEAT_SHARE = 0.3
ACTIVE = ("pending", "running", "sleeping", "waiting", "compensating")


@dataclass
class Send:
    """One signal the signaller sent: its nonce, and what became of it (``accepted``,
    ``repeat``, ``ended``, ``decided``; ``retried`` counts sends broken by the chaos and
    repeated with the same nonce)."""

    nonce: str
    outcome: str = ""
    retried: int = 0


@dataclass
class SignalPlan:
    when: str  # one of PLANS
    delay: float  # seconds after the start ("before", "later"), or after the run was
    # seen waiting ("waiting", "late")
    repeat_after: float | None  # a second signal this long after the first, or none
    sends: list[Send] = field(default_factory=list)


def draw_plan(rng: random.Random) -> SignalPlan:
    when = rng.choices(PLANS, PLAN_WEIGHTS)[0]
    delay = {
        "before": rng.uniform(0, 0.2),
        "later": rng.uniform(0.5, 5.0),
        "waiting": rng.uniform(0, 1.5),
        "late": WAIT_TIMEOUT + rng.uniform(0.5, 3.0),
        "never": 0.0,
    }[when]
    repeat = rng.uniform(0, 1.0) if when != "never" and rng.random() < REPEAT_SHARE else None
    return SignalPlan(when, delay, repeat)


async def signaller(rig: Rig, client: saga.Client, run_id: uuid.UUID, plan: SignalPlan) -> None:
    """Send ``run_id`` its signal(s) as ``plan`` says."""
    if plan.when == "never":
        return
    if plan.when in ("waiting", "late"):
        with anyio.move_on_after(60):
            while True:
                rows = await rig.query("SELECT status FROM saga.runs WHERE id = $1", run_id)
                if rows[0]["status"] not in ACTIVE or rows[0]["status"] == "waiting":
                    break
                await anyio.sleep(0.3)
    await anyio.sleep(plan.delay)
    await _send(client, run_id, plan)
    if plan.repeat_after is not None:
        await anyio.sleep(plan.repeat_after)
        await _send(client, run_id, plan)


async def _send(client: saga.Client, run_id: uuid.UUID, plan: SignalPlan) -> None:
    sent = Send(uuid.uuid4().hex)
    plan.sends.append(sent)
    payload = Approval(run_id=str(run_id), nonce=sent.nonce)
    for _ in range(200):
        try:
            accepted = await client.signal(run_id, WAIT_NAME, payload)
        except saga.InvalidRunStateError as exc:
            text = str(exc)
            sent.outcome = (
                "ended"
                if "has ended" in text
                else "rolling_back"
                if "rolling back" in text
                else "decided"
            )
        except (saga.DatabaseError, *CONNECTION_ERRORS):
            sent.retried += 1  # maybe committed: the same nonce again tells
            await anyio.sleep(0.3)
            continue
        else:
            sent.outcome = "accepted" if accepted else "repeat"
        return
    sent.outcome = "gave_up"


def check_waits(
    run: asyncpg.Record,
    history: list[asyncpg.Record],
    execs: list[asyncpg.Record],
    signal: asyncpg.Record | None,
    plan: SignalPlan,
) -> list[str]:
    """The invariants of one terminal run of ``chaos_wait``: it received at most one
    signal, and only one the signaller sent; a send reported accepted is the one it
    received; a signalled run never timed out; a run that timed out never ran the step
    after the wait; a completed run was signalled, and every execution of the step after
    the wait saw that signal's payload."""
    problems: list[str] = []
    status = run["status"]
    kinds = Counter(e["kind"] for e in history)
    woke = Counter(e["step"] for e in history if e["kind"] == "woke")
    payload = signal["payload"] if signal is not None else None
    winner = None if payload is None else json.loads(payload)["nonce"]
    nonces = {s.nonce for s in plan.sends}
    accepted = [s.nonce for s in plan.sends if s.outcome == "accepted"]
    if kinds["signal_received"] != (winner is not None):
        problems.append(f"{kinds['signal_received']} signal_received, signal row {payload}")
    if winner is not None and winner not in nonces:
        problems.append(f"received a signal nobody sent: {winner}")
    if len(accepted) > 1 or (accepted and accepted != [winner]):
        problems.append(f"sends accepted {accepted}, received {winner}")
    if any(n > 1 for n in woke.values()):
        problems.append(f"woke {dict(woke)}")
    if any(s.outcome in ("gave_up", "") for s in plan.sends):
        problems.append(f"a send never got an answer: {plan.sends}")
    if any(s.outcome == "repeat" for s in plan.sends) and winner is None:
        problems.append("a send was told it repeats a signal, but none was received")
    # Each refusal a sender was told of is in the history (twice at most for a send
    # repeated after the chaos broke its answer).
    refused = Counter(
        json.loads(e["data"])["reason"] for e in history if e["kind"] == "signal_refused"
    )
    told = Counter(
        "wait_decided" if s.outcome == "decided" else s.outcome
        for s in plan.sends
        if s.outcome in ("ended", "decided", "rolling_back")
    )
    if told - refused or (refused - told and not any(s.retried for s in plan.sends)):
        problems.append(f"refusals in the history {dict(refused)}, sends {plan.sends}")
    timed_out = kinds["wait_timed_out"]
    if timed_out and winner is not None:
        problems.append("a signalled run timed out")
    if timed_out > 1:
        problems.append(f"{timed_out} wait_timed_out")
    if any(s.outcome == "decided" for s in plan.sends) and not (
        timed_out or run["cancel_requested"]
    ):
        problems.append(
            "a signal was refused as decided; the wait neither timed out nor was cancelled"
        )
    after = [e for e in history if e["kind"] == "step_started" and e["step"] == "s3"]
    ran_after = after or any(x["step"] == "s3" and x["kind"] == "step" for x in execs)
    if timed_out and ran_after:
        problems.append("the step after a timed-out wait ran")
    if timed_out and status not in ("compensated", "cancelled", "failed"):
        problems.append(f"timed out, yet {status}")
    if status == "completed" and (winner is None or plan.when == "never"):
        problems.append(f"completed without a signal (plan {plan.when})")
    seen = {x["note"] for x in execs if x["step"] == "s3" and x["kind"] == "step"}
    if seen - {winner}:
        problems.append(f"the step after the wait saw {seen}, received {winner}")
    if (WAIT_NAME in run["completed_steps"]) != (woke[WAIT_NAME] == 1):
        problems.append(f"completed_steps {run['completed_steps']}, woke {dict(woke)}")
    return problems


def figures(
    started: dict[uuid.UUID, Any],
    runs: dict[uuid.UUID, asyncpg.Record],
    signals: dict[uuid.UUID, asyncpg.Record],
) -> dict[str, Any]:
    """What the waiting runs did: outcomes by plan, sends by outcome, signals received
    before or after their run reached the wait, timeouts."""
    waiting = {rid: s for rid, s in started.items() if s.saga == WAIT_SAGA}
    by_plan: dict[str, Counter[str]] = {}
    sends: Counter[str] = Counter()
    for rid, info in waiting.items():
        by_plan.setdefault(info.plan.when, Counter())[runs[rid]["status"]] += 1
        sends.update(s.outcome for s in info.plan.sends)
        sends["retried_after_chaos"] += sum(s.retried for s in info.plan.sends)
        if info.plan.when == "late":  # taken: no worker had decided the timeout yet
            sends["late_but_accepted"] += sum(s.outcome == "accepted" for s in info.plan.sends)
    timed_out = sum(
        1
        for rid in waiting
        if runs[rid]["error"] and json.loads(runs[rid]["error"])["type"] == "saga.WaitTimedOut"
    )
    received = [signals[rid] for rid in waiting if rid in signals and signals[rid]["payload"]]
    awaited = [s for s in received if s["awaited_at"] is not None]
    return {
        "runs": len(waiting),
        "by_plan": {plan: dict(sorted(c.items())) for plan, c in sorted(by_plan.items())},
        "sends": dict(sorted(sends.items())),
        "timed_out": timed_out,
        "signal_before_wait": sum(s["received_at"] < s["awaited_at"] for s in awaited),
        "signal_after_wait": sum(s["received_at"] >= s["awaited_at"] for s in awaited),
        "signal_before_wait_never_reached": len(received) - len(awaited),
    }
