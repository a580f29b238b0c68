"""The chaos suite's saga definitions, identical in every process that builds them.

``build_sagas(seed)`` returns five sagas of 3 to 7 steps (which steps have a
compensation, and which override ``lease_seconds``, follows from the seed), the graph
saga ``chaos_graph`` (steps in parallel, two joins), and ``chaos_wait``, whose runs park
twice: a durable sleep (``nap``) after ``s1``, and a wait for the signal ``approval``
after ``s2`` (a short timeout that compensates); the step after the wait checks the
signal's payload and records the nonce it saw. What a step or compensation does is a
pure function of (the run's input, the step, the attempt), via a hash, so every worker
process agrees on it: the input carries the run's own seed and failure probabilities.

Every step and compensation applies its side effect to an *external* effects ledger in
the same database (its own pool, never saga's transaction), through one SQL function
call so it is atomic and idempotent per call:

- ``chaos_exec``: one row per invocation that got as far as its effect or its failure:
  the raw execution log (who, which attempt, what happened).
- ``chaos_ledger``: the net effect per step idempotency key, 1 after the step, 0 after
  its compensation. Like a real idempotent service, an effect arriving for a key that
  was already compensated (a zombie attempt that lost its lease) is refused ("late").
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from typing import Any

import asyncpg
from pydantic import BaseModel

import saga

STEP_COUNTS = (3, 4, 5, 6, 7)
STEP_RETRY = saga.Retry(max_attempts=6, initial_delay=0.05, max_delay=0.4)
# Generous: a compensation giving up would leave the run failed (operator's turn).
COMPENSATION_RETRY = saga.Retry(max_attempts=40, initial_delay=0.05, max_delay=0.5)
SHORT_LEASE = 1.0  # the lease_seconds override some steps get (the workers use 1.5)
WAIT_SAGA = "chaos_wait"
GRAPH_SAGA = "chaos_graph"
NAP_SECONDS = 0.3
WAIT_NAME = "approval"
#: Short, so that runs never signalled time out (and compensate) within the test; long
#: enough that a signal sent once the run waits normally arrives first.
WAIT_TIMEOUT = 6.0

LEDGER_DDL = """
CREATE TABLE chaos_exec (
    id              uuid PRIMARY KEY,   -- one per invocation (a retried call reuses it)
    run_id          uuid NOT NULL,
    key             text NOT NULL,      -- ctx.idempotency_key of the invocation
    step            text NOT NULL,
    kind            text NOT NULL,      -- step | compensation
    attempt         integer NOT NULL,
    worker          text NOT NULL,
    action          text NOT NULL,      -- effect | transient | permanent | permanent_once
                                        -- | bad_result
    outcome         text NOT NULL,      -- applied | late | orphan | failed
                                        -- | failed_permanent | skipped
    target          text,               -- compensation: the step key it undoes (from the
    result_attempt  integer,            --   step's result, with the attempt and worker
    result_worker   text,               --   that produced that result)
    note            text,               -- the step after a wait: the nonce it received
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX chaos_exec_key ON chaos_exec (key);

CREATE TABLE chaos_ledger (
    key          text PRIMARY KEY,      -- a step's idempotency key
    net          integer NOT NULL,      -- 1: the step's effect is in place; 0: undone
    compensated  boolean NOT NULL DEFAULT false
);

CREATE FUNCTION chaos_record(
    p_id uuid, p_run uuid, p_key text, p_step text, p_kind text, p_attempt integer,
    p_worker text, p_action text, p_target text, p_result_attempt integer,
    p_result_worker text, p_note text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_outcome text;
BEGIN
    -- A call retried after a lost reply: report what the first try did, do nothing.
    SELECT outcome INTO v_outcome FROM chaos_exec WHERE id = p_id;
    IF FOUND THEN
        RETURN v_outcome;
    END IF;
    IF p_action = 'effect' AND p_kind = 'step' THEN
        INSERT INTO chaos_ledger AS l (key, net) VALUES (p_key, 1)
        ON CONFLICT (key) DO UPDATE SET net = CASE WHEN l.compensated THEN l.net ELSE 1 END
        RETURNING CASE WHEN l.compensated THEN 'late' ELSE 'applied' END INTO v_outcome;
    ELSIF p_action = 'effect' THEN
        UPDATE chaos_ledger SET net = 0, compensated = true WHERE key = p_target;
        IF FOUND THEN
            v_outcome := 'applied';
        ELSE  -- undoing an effect that never happened: recorded, and checked for
            v_outcome := 'orphan';
            INSERT INTO chaos_ledger (key, net, compensated) VALUES (p_target, 0, true);
        END IF;
    ELSIF p_action = 'permanent_once' THEN
        PERFORM 1 FROM chaos_exec WHERE key = p_key AND outcome = 'failed_permanent';
        v_outcome := CASE WHEN FOUND THEN 'skipped' ELSE 'failed_permanent' END;
    ELSE
        v_outcome := 'failed';
    END IF;
    INSERT INTO chaos_exec (id, run_id, key, step, kind, attempt, worker, action, outcome,
                            target, result_attempt, result_worker, note)
    VALUES (p_id, p_run, p_key, p_step, p_kind, p_attempt, p_worker, p_action, v_outcome,
            p_target, p_result_attempt, p_result_worker, p_note);
    RETURN v_outcome;
END $$;
"""

# What the ledger client retries through (a restart, a terminated backend).
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


class ChaosInput(BaseModel):
    """Per-run parameters: the run's seed and its failure probabilities (per attempt)."""

    seed: int
    p_transient: float
    p_permanent: float
    p_comp_transient: float
    p_comp_permanent: float  # at attempt 1 only, and once per compensation (see undo)
    p_long: float  # a step attempt sleeping longer than its lease (heartbeats keep it)
    max_sleep_ms: int


class Approval(BaseModel):
    """The payload of the signal ``approval``: the run it was sent to, and a nonce only
    that one signal carries."""

    run_id: str
    nonce: str


class StepResult(BaseModel):
    """A step's result: its idempotency key, and which attempt on which worker made it."""

    key: str
    attempt: int
    worker: str


class ChaosTransient(Exception):
    """A transient failure (retried)."""


class ChaosPermanent(saga.PermanentError):
    """A permanent failure: a step's fails the run forward; a compensation's fails the run
    until an operator retries it."""


class ChaosInvariantBroken(saga.PermanentError):
    """A step saw an earlier step's result that is not what that step returned."""


def chance(inp: ChaosInput, *parts: object) -> float:
    """A uniform number in [0, 1) fixed by the run's seed and ``parts``, in any process."""
    text = "|".join([str(inp.seed), *map(str, parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def step_plan(inp: ChaosInput, step: str, attempt: int) -> str:
    """ok | permanent | transient_before (no effect) | transient_after (effect applied)."""
    u = chance(inp, "step", step, attempt)
    if u < inp.p_permanent:
        return "permanent"
    if u < inp.p_permanent + inp.p_transient:
        after = chance(inp, "after", step, attempt) < 0.5
        return "transient_after" if after else "transient_before"
    return "ok"


def compensation_plan(inp: ChaosInput, step: str, attempt: int) -> str:
    """ok | permanent_once (attempt 1 only) | transient_before | transient_after."""
    u = chance(inp, "compensation", step, attempt)
    if attempt == 1 and u < inp.p_comp_permanent:
        return "permanent_once"
    if chance(inp, "comp-transient", step, attempt) < inp.p_comp_transient:
        after = chance(inp, "comp-after", step, attempt) < 0.5
        return "transient_after" if after else "transient_before"
    return "ok"


def sleep_seconds(inp: ChaosInput, kind: str, step: str, attempt: int) -> float:
    if chance(inp, "long", kind, step, attempt) < inp.p_long:
        return 2.0 + chance(inp, "long-ms", kind, step, attempt)
    return inp.max_sleep_ms / 1000 * chance(inp, "sleep", kind, step, attempt)


class Ledger:
    """The external effects service: one idempotent SQL function call per invocation,
    retried through connection errors (with the same call id, so never applied twice)."""

    def __init__(self, pool: asyncpg.Pool, worker: str) -> None:
        self.pool = pool
        self.worker = worker

    async def record(
        self,
        ctx: saga.Context[ChaosInput],
        action: str,
        *,
        target: str | None = None,
        result: StepResult | None = None,
        note: str | None = None,
    ) -> str:
        call_id = uuid.uuid4()
        deadline = time.monotonic() + 30
        delay = 0.05
        while True:
            try:
                outcome: str = await self.pool.fetchval(
                    "SELECT chaos_record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    call_id,
                    ctx.run_id,
                    ctx.idempotency_key,
                    ctx.step,
                    "compensation" if ctx.is_compensation else "step",
                    ctx.attempt,
                    self.worker,
                    action,
                    target,
                    result.attempt if result else None,
                    result.worker if result else None,
                    note,
                )
                return outcome
            except _CONNECTION_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


_ledger: Ledger | None = None


def install_ledger(ledger: Ledger) -> None:
    """Called once by a worker process; the test process never runs steps."""
    global _ledger
    _ledger = ledger


def _the_ledger() -> Ledger:
    if _ledger is None:
        raise RuntimeError("no ledger installed: steps run only in chaos worker processes")
    return _ledger


async def _approval(ctx: saga.Context[ChaosInput], wait: saga.Wait[Any] | None) -> str | None:
    """The nonce of the signal the wait before this step received (None: no wait); a
    payload sent to another run is a broken invariant."""
    if wait is None:
        return None
    payload = ctx.result(wait)
    if not isinstance(payload, Approval) or payload.run_id != str(ctx.run_id):
        await _the_ledger().record(ctx, "bad_result", note=repr(payload))
        raise ChaosInvariantBroken(f"wait {wait.name} result is {payload!r}")
    return payload.nonce


def _add_step(
    s: saga.Saga[ChaosInput],
    index: int,
    rng: random.Random,
    after_wait: saga.Wait[Any] | None = None,
    after: list[saga.Step[Any, Any]] | None = None,
) -> saga.Step[Any, Any]:
    name = f"s{index + 1}"
    # The results it checks: the step before it, or (a graph) the steps it runs after.
    reads = after if after is not None else s.steps[-1:]
    lease = SHORT_LEASE if rng.random() < 0.15 else None

    async def forward(ctx: saga.Context[ChaosInput]) -> StepResult:
        ledger = _the_ledger()
        inp = ctx.input
        for previous in reads:
            earlier = ctx.result(previous)
            if (
                not isinstance(earlier, StepResult)
                or earlier.key != f"{ctx.run_id}:step:{previous.name}"
            ):
                await ledger.record(ctx, "bad_result")
                raise ChaosInvariantBroken(f"step {previous.name} result is {earlier!r}")
        note = await _approval(ctx, after_wait)
        plan = step_plan(inp, ctx.step, ctx.attempt)
        await asyncio.sleep(sleep_seconds(inp, "step", ctx.step, ctx.attempt))
        if plan == "permanent":
            await ledger.record(ctx, "permanent", note=note)
            raise ChaosPermanent(f"{ctx.step} attempt {ctx.attempt}: permanent")
        if plan == "transient_before":
            await ledger.record(ctx, "transient", note=note)
            raise ChaosTransient(f"{ctx.step} attempt {ctx.attempt}: transient")
        await ledger.record(ctx, "effect", note=note)
        if plan == "transient_after":
            raise ChaosTransient(f"{ctx.step} attempt {ctx.attempt}: transient after effect")
        return StepResult(key=ctx.idempotency_key, attempt=ctx.attempt, worker=ledger.worker)

    step = s.step(name=name, retry=STEP_RETRY, timeout=30, lease_seconds=lease, after=after)(
        forward
    )
    if rng.random() < 0.75:

        async def undo(ctx: saga.Context[ChaosInput], result: StepResult) -> None:
            ledger = _the_ledger()
            inp = ctx.input
            plan = compensation_plan(inp, ctx.step, ctx.attempt)
            await asyncio.sleep(sleep_seconds(inp, "compensation", ctx.step, ctx.attempt))
            # Fails for good once per compensation; after an operator's retry() the ledger
            # remembers it and the compensation goes on.
            if (
                plan == "permanent_once"
                and await ledger.record(ctx, "permanent_once") == "failed_permanent"
            ):
                raise ChaosPermanent(f"compensation of {ctx.step}: permanent")
            if plan == "transient_before":
                await ledger.record(ctx, "transient")
                raise ChaosTransient(f"compensation of {ctx.step}: transient")
            await ledger.record(ctx, "effect", target=result.key, result=result)
            if plan == "transient_after":
                raise ChaosTransient(f"compensation of {ctx.step}: transient after effect")

        step.compensate(retry=COMPENSATION_RETRY, timeout=30)(undo)
    return step


def build_sagas(seed: int) -> list[saga.Saga[ChaosInput]]:
    """Five sagas, ``chaos_3`` .. ``chaos_7``, with that many steps ``s1`` .. ``sN``;
    then ``chaos_wait``: ``s1``, the sleep ``nap``, ``s2``, the wait ``approval``,
    ``s3``, ``s4``; then ``chaos_graph`` (see ``GRAPH``)."""
    rng = random.Random(f"chaos-definitions-{seed}")
    sagas = []
    for count in STEP_COUNTS:
        s = saga.Saga(f"chaos_{count}", input=ChaosInput)
        for index in range(count):
            _add_step(s, index, rng)
        sagas.append(s)
    waiting = saga.Saga(WAIT_SAGA, input=ChaosInput)
    _add_step(waiting, 0, rng)
    waiting.sleep(NAP_SECONDS, name="nap")
    _add_step(waiting, 1, rng)
    wait = waiting.wait_for(WAIT_NAME, Approval, timeout=WAIT_TIMEOUT, on_timeout="compensate")
    _add_step(waiting, 2, rng, after_wait=wait)
    _add_step(waiting, 3, rng)
    sagas.append(waiting)
    sagas.append(_graph_saga(rng))
    return sagas


#: ``chaos_graph``: step -> the steps it runs after (a fan-out, two joins).
GRAPH = {"s2": ["s1"], "s3": ["s1"], "s4": ["s1"], "s5": ["s2", "s3"], "s6": ["s4", "s5"]}


def _graph_saga(rng: random.Random) -> saga.Saga[ChaosInput]:
    """s1; then s2, s3 and s4 in parallel; s5 after s2 and s3; s6 after s4 and s5."""
    graph = saga.Saga(GRAPH_SAGA, input=ChaosInput)
    _add_step(graph, 0, rng, after=[])
    for index in range(1, 6):
        deps = [graph.get_step(n) for n in GRAPH[f"s{index + 1}"]]
        _add_step(graph, index, rng, after=deps)
    return graph


def describe(sagas: list[saga.Saga[ChaosInput]]) -> dict[str, str]:
    """Saga name -> its steps; ``*`` marks a compensation, ``~`` a short lease,
    ``(nap)`` a sleep, ``[approval]`` a wait."""

    def parked(step: saga.Step[Any, Any]) -> str:
        if isinstance(step.after, saga.Wait):
            return f" [{step.after.name}]"
        return f" ({step.after.name})" if step.after is not None else ""

    return {
        s.name: " ".join(
            st.name
            + ("*" if st.compensation else "")
            + ("~" if st.lease_seconds else "")
            + parked(st)
            for st in s.steps
        )
        for s in sagas
    }
