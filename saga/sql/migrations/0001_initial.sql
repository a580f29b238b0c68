-- 0001: runs (each carrying its one leasable work item) and the per-run event history.
-- Objects are created in the schema named by __schema__, which the migrator replaces with
-- the validated, quoted schema identifier.

CREATE TABLE __schema__.runs (
    id                 uuid PRIMARY KEY,
    saga_name          text NOT NULL,
    saga_version       integer NOT NULL,
    idempotency_key    text,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'running', 'compensating',
                                         'completed', 'compensated', 'failed', 'cancelled')),
    input              jsonb NOT NULL,
    -- Checkpointed results of completed forward steps, by step name.
    results            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Names of completed forward steps in completion order: compensations run in reverse.
    completed_steps    text[] NOT NULL DEFAULT '{}',
    output             jsonb,
    error              jsonb,          -- the failure that started the rollback
    compensation_error jsonb,          -- set when a compensation exhausted its retries
    cancel_requested   boolean NOT NULL DEFAULT false,

    -- The run's current work item: the step (status running/pending) or compensation
    -- (status compensating) named step_name, at its attempt number.
    step_name          text,
    attempt            integer NOT NULL DEFAULT 0,
    -- When the item may next be claimed: now() when runnable, a retry's due time during
    -- backoff, or the lease expiry while a worker holds it. NULL once terminal.
    due_at             timestamptz,
    lease_owner        text,           -- worker holding the lease, NULL when not leased
    lease_token        bigint NOT NULL DEFAULT 0,   -- fencing token, bumped by every claim

    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    CHECK ((due_at IS NULL) = (status IN ('completed', 'compensated', 'failed', 'cancelled')))
);

CREATE UNIQUE INDEX runs_idempotency_key ON __schema__.runs (saga_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The claim path: only active runs are in it, so it stays small however many finished
-- runs the table holds.
CREATE INDEX runs_due ON __schema__.runs (due_at) WHERE due_at IS NOT NULL;

-- Every step rewrites its run's row (due_at moves), so no update is HOT and every index
-- here costs an insert per step: keep only the ones the hot path needs.

-- The history. Events of one run are written only by statements holding that run's row
-- lock, so ordering by id gives each run's history a total order. No foreign key to
-- runs: the check would cost a lookup per event on the hot path, and every writer
-- already holds the run's row; deleting a run deletes its events explicitly.
CREATE TABLE __schema__.events (
    run_id   uuid NOT NULL,
    id       bigint GENERATED ALWAYS AS IDENTITY,
    at       timestamptz NOT NULL DEFAULT now(),
    kind     text NOT NULL,
    step     text,
    attempt  integer,
    worker   text,
    data     jsonb,
    PRIMARY KEY (run_id, id)
);
