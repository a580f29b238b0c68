-- 0008: traffic control: priorities, one-at-a-time per key, rate limits, schedules.
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
    updated_at timestamptz NOT NULL,
    per_second float8 NOT NULL,  -- as the last taker declared it
    burst      integer NOT NULL
);

-- Priorities, and one-at-a-time per business key (see saga/_traffic.py). A keyed run is
-- 'queued' (due 'infinity': never claimed) until admitted, 'held' while it holds one of
-- its key's slots (until it completes, is compensated or cancelled, or an operator
-- resolves it), then 'released'. Every admission and release of a key first locks its
-- key_slots row, then reads the holders in a later statement: admissions never exceed
-- the limit, and a slot freed is taken by the oldest queued run at once.
ALTER TABLE __schema__.runs ADD COLUMN priority smallint NOT NULL DEFAULT 0;
ALTER TABLE __schema__.runs ADD COLUMN concurrency_key text;
ALTER TABLE __schema__.runs ADD COLUMN key_state text;  -- queued, held, released
CREATE TABLE __schema__.key_slots (
    saga_name text NOT NULL,
    key       text NOT NULL,
    key_limit integer NOT NULL,  -- the definition's limit, as its last admission saw it
    PRIMARY KEY (saga_name, key)
);
CREATE INDEX runs_key_held ON __schema__.runs (saga_name, concurrency_key)
    WHERE key_state = 'held';
CREATE INDEX runs_key_queue ON __schema__.runs (saga_name, concurrency_key, created_at, id)
    WHERE key_state = 'queued';
-- Due work of a priority above 0, claimed first; empty (and free) while nobody uses them.
CREATE INDEX runs_urgent ON __schema__.runs (priority DESC, due_at)
    WHERE due_at IS NOT NULL AND priority > 0;
