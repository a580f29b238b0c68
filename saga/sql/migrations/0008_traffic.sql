-- 0008: traffic control: sagas started on a schedule, and rate limits.
--
-- One row per schedule an orchestrator registered: what it starts (saga, input), when
-- (its spec, and next_fire: the first slot not handled yet), what happens to slots
-- missed while nothing ran, and whether an operator paused it. The orchestrator that
-- locks a due row (FOR UPDATE SKIP LOCKED) starts its slots' runs and moves next_fire in
-- one transaction; each slot's run has the idempotency key schedule:<name>:<slot>, so a
-- slot starts at most one run however many orchestrators are up.
CREATE TABLE __schema__.schedules (
    name          text PRIMARY KEY,
    saga_name     text NOT NULL,
    saga_version  integer NOT NULL,
    spec          text NOT NULL,         -- the schedule, as Schedule.describe() says it
    missed        text NOT NULL CONSTRAINT schedules_missed_check
                  CHECK (missed IN ('skip', 'latest', 'all')),
    catch_up      integer NOT NULL,      -- missed = 'all': at most this many late slots
    paused        boolean NOT NULL DEFAULT false,
    next_fire     timestamptz NOT NULL,  -- the first slot not handled yet
    last_fire     timestamptz,           -- the last slot that started a run
    last_run      uuid,                  -- and that run
    skipped       bigint NOT NULL DEFAULT 0,  -- late slots skipped by the missed policy
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Rate limits shared by every worker: one token bucket per name (see saga/_rate.py).
-- tokens may be negative: callers reserved tokens not there yet, and wait for them.
CREATE TABLE __schema__.rate_limits (
    name       text PRIMARY KEY,
    tokens     float8 NOT NULL,
    updated_at timestamptz NOT NULL
);
