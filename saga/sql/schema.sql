-- saga's schema, as the migrations in sql/migrations leave it: read this, not them.
--
-- Nothing applies this file: databases are built and upgraded by the numbered
-- migrations only (tracked in the migrations table, with each file's checksum). A test
-- applies the migrations to an empty schema and this file to another, and compares the
-- two catalogs (tables, columns, types, defaults, constraints, indexes): this file
-- cannot drift from what databases really hold. __schema__ is the schema's name.

CREATE SCHEMA __schema__;

-- Applied migrations: version, file name, and the sha256 of the file when applied
-- (`saga migrate` refuses to go on if an applied file changed since).
CREATE TABLE __schema__.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum   text
);

-- runs, events, watches and signals are partitioned by run id, one partition per UTC
-- day (`<table>_pYYYYMMDD`, created ahead by saga/_partitions.py: run ids are UUIDv7, so
-- an id range is a range of start times), plus a DEFAULT partition (`<table>_default`)
-- for older runs (random ids) and days without a partition. Pruning drops whole days.
-- The catalog test compares the partitioned tables, not their partitions.

-- One row per run. A run carries its one leasable work item: the step (statuses
-- pending, running) or the compensation (compensating) named step_name, at attempt.
-- A sleeping or waiting run is parked at wait_name until due_at (its sleep's end, its
-- wait's timeout, 'infinity' for a wait without one), then runs step_name.
CREATE TABLE __schema__.runs (
    id                 uuid NOT NULL,  -- UUIDv7: time-ordered
    saga_name          text NOT NULL,
    saga_version       integer NOT NULL,
    -- The definition's fingerprint (NULL for runs started before fingerprints): only a
    -- worker with that definition executes the run.
    fingerprint        text,
    idempotency_key    text,
    status             text NOT NULL DEFAULT 'pending'
                       CONSTRAINT runs_status_check
                       CHECK (status IN ('pending', 'running', 'sleeping', 'waiting',
                                         'compensating', 'completed', 'compensated',
                                         'failed', 'cancelled', 'stopped')),
    -- Payloads are JSON text exactly as encoded (jsonb would rewrite numbers and keys).
    input              text NOT NULL,
    -- Checkpointed results of completed forward steps: step name -> JSON text.
    results            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Completed forward steps in completion order: compensations run in reverse.
    completed_steps    text[] NOT NULL DEFAULT '{}',
    output             text,           -- the last step's result, once completed
    error              jsonb,          -- the failure that started the rollback
    compensation_error jsonb,          -- set when a compensation exhausted its retries
    cancel_requested   boolean NOT NULL DEFAULT false,
    trace_context      jsonb,          -- W3C carrier of the span that started the run

    -- The current work item.
    step_name          text,
    attempt            integer NOT NULL DEFAULT 0,
    -- When the item may next be claimed: now() when runnable, a retry's due time during
    -- backoff, or the lease expiry while a worker holds it. NULL once terminal.
    due_at             timestamptz,
    lease_owner        text,           -- worker holding the lease, NULL when not leased
    lease_token        bigint NOT NULL DEFAULT 0,   -- fencing token, bumped by every claim
    released           boolean NOT NULL DEFAULT false,  -- attempt given back once already
    wait_name          text,           -- the sleep or wait the run is at (or stopped at)
    -- A graph run (steps in parallel): its items are rows of items, not this row.
    graph              boolean NOT NULL DEFAULT false,
    -- Graph runs only: steps whose compensation completed (the rollback's progress).
    compensated_steps  text[] NOT NULL DEFAULT '{}',
    -- The definition's pivot step, if any: once the run reached it, it is not cancelled
    -- (it only goes forward; a failure after it stops the run for an operator).
    pivot              text,
    -- A child run: the run and step that started it (its end wakes that step's item).
    parent_id          uuid,
    parent_step        text,
    -- A failed or stopped run an operator marked resolved (it no longer needs attention;
    -- a retry or a cancel makes it unresolved again).
    resolved           boolean NOT NULL DEFAULT false,
    -- Claimed before due work of a lower priority (0-100; see saga/_traffic.py).
    priority           smallint NOT NULL DEFAULT 0,
    -- One-at-a-time per key: the run's key, and whether it is queued, holds a slot of
    -- the key, or released it (see key_slots).
    concurrency_key    text,
    key_state          text,

    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    CONSTRAINT runs_check
        CHECK ((due_at IS NULL) = (status IN ('completed', 'compensated', 'failed', 'cancelled',
                                              'stopped'))),
    PRIMARY KEY (id)
) PARTITION BY RANGE (id);
CREATE TABLE __schema__.runs_default PARTITION OF __schema__.runs DEFAULT;

-- Idempotent starts: one run per (saga, key). No unique index spans partitions: each
-- partition has its own (`<partition>_idempotency_key`), and a start with a key holds an
-- advisory lock on it while it looks the key up and inserts (query lock_key).
CREATE UNIQUE INDEX runs_default_idempotency_key
    ON __schema__.runs_default (saga_name, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The claim path: only active runs, so it stays small whatever the finished history.
CREATE INDEX runs_due ON __schema__.runs (due_at) WHERE due_at IS NOT NULL;
-- Runs waiting for an operator, counted by the metrics.
CREATE INDEX runs_failed ON __schema__.runs (created_at) WHERE status = 'failed';
CREATE INDEX runs_stopped ON __schema__.runs (created_at) WHERE status = 'stopped';
-- Operators over finished runs: newest-first listing, oldest-first pruning. Partial on
-- finished runs, so a step's update (no update is HOT) never touches them.
CREATE INDEX runs_finished_created ON __schema__.runs (created_at, id) WHERE due_at IS NULL;
CREATE INDEX runs_finished_at ON __schema__.runs (finished_at) WHERE due_at IS NULL;
-- The child runs of a step.
CREATE INDEX runs_parent ON __schema__.runs (parent_id, parent_step) WHERE parent_id IS NOT NULL;
-- The runs that need an operator, oldest first: failed and stopped ones not resolved.
CREATE INDEX runs_attention ON __schema__.runs (created_at, id)
    WHERE status IN ('failed', 'stopped') AND NOT resolved;
-- One saga's finished runs, newest first, whatever the other sagas' history.
CREATE INDEX runs_finished_saga ON __schema__.runs (saga_name, created_at, id)
    WHERE due_at IS NULL;

-- The append-only history. Events of one run are written only by statements holding
-- that run's row lock, so ordering by id gives each run's history a total order. No
-- foreign key (a lookup per event on the hot path); deleting a run deletes its events.
CREATE SEQUENCE __schema__.event_ids;
CREATE TABLE __schema__.events (
    run_id   uuid NOT NULL,
    id       bigint NOT NULL DEFAULT nextval('__schema__.event_ids'),
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when written (0010)
    kind     text NOT NULL,   -- saga._model.EventKind
    step     text,
    attempt  integer,
    worker   text,
    data     jsonb,
    PRIMARY KEY (run_id, id)
) PARTITION BY RANGE (run_id);
ALTER SEQUENCE __schema__.event_ids OWNED BY __schema__.events.id;
CREATE TABLE __schema__.events_default PARTITION OF __schema__.events DEFAULT;
-- History by time (the dashboard's last hours): BRIN, a few pages for millions of
-- events and nearly free to maintain, as events are appended in time order.
CREATE INDEX events_at ON __schema__.events USING brin (at);

-- result() waiters and the end of runs meet here: a waiter's watch (watched) and the
-- final transition's end mark (ended) are both INSERT ... ON CONFLICT on the run id, so
-- whichever commits second sees the other: a watched run's end is never missed.
CREATE TABLE __schema__.watches (
    run_id  uuid PRIMARY KEY,
    watched boolean NOT NULL DEFAULT true,
    ended   boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (run_id);
CREATE TABLE __schema__.watches_default PARTITION OF __schema__.watches DEFAULT;

-- Signals, one row per (run, name): the first signal of a name wins. Written by the
-- sender (payload), by the run entering its wait (awaited_at), and by the claim that
-- decides the wait (closed: later signals are refused). Each writer locks the run row
-- first, then writes this row with INSERT ... ON CONFLICT, which sees the other's
-- committed row whatever its snapshot: a signal racing the wait is never lost.
CREATE TABLE __schema__.signals (
    run_id          uuid NOT NULL,
    name            text NOT NULL,
    payload         text,           -- JSON text as encoded; NULL until sent
    signal_id       uuid,           -- the accepted signal's id (its sender's)
    received_at     timestamptz,
    awaited_at      timestamptz,    -- when the run reached the wait (NULL: not yet)
    timeout_seconds float8,         -- the wait's timeout ('Infinity': none), to re-wait
    closed          boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, name)
) PARTITION BY RANGE (run_id);
CREATE TABLE __schema__.signals_default PARTITION OF __schema__.signals DEFAULT;

-- Fencing tokens of graph items: unique across every item ever leased.
CREATE SEQUENCE __schema__.item_tokens;

-- The work items of graph runs (sagas whose steps run in parallel), one per ready step
-- or compensation, each leased and fenced on its own like a linear run's one item. The
-- run row holds the state and is never claimed (due 'infinity' while active). Every
-- writer that decides what comes next (a finished item, a cancel) locks the run row
-- first, then these rows: a join is created once, by whichever branch finishes last.
CREATE TABLE __schema__.items (
    run_id      uuid NOT NULL,
    step        text NOT NULL,
    phase       text NOT NULL CONSTRAINT items_phase_check
                CHECK (phase IN ('step', 'compensation')),
    attempt     integer NOT NULL DEFAULT 0,
    due_at      timestamptz NOT NULL DEFAULT now(),
    lease_owner text,
    lease_token bigint NOT NULL DEFAULT 0,
    released    boolean NOT NULL DEFAULT false,
    parked      boolean NOT NULL DEFAULT false,  -- waiting for its child runs to end
    woken       boolean NOT NULL DEFAULT false,  -- a child run ended since the last claim
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step, phase)
);
CREATE INDEX items_due ON __schema__.items (due_at);

-- Sagas started on a schedule, one row per schedule an orchestrator registered (see
-- saga/_scheduler.py): the orchestrator that locks a due row (FOR UPDATE SKIP LOCKED)
-- starts its slots' runs (idempotency key schedule:<name>:<slot>) and moves next_fire in
-- one transaction, so a slot starts at most one run however many orchestrators are up.
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
