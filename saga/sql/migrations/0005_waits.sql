-- 0005: runs that sleep and wait for signals; runs stopped for an operator at a wait.
--
-- A sleeping or waiting run is a row with a due time (the sleep's end, the wait's
-- timeout, or 'infinity' for a wait without one), unleased: it costs nothing until then.
-- step_name is the step that runs after the sleep or wait, wait_name the one it is at.
ALTER TABLE __schema__.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE __schema__.runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('pending', 'running', 'sleeping', 'waiting', 'compensating',
                      'completed', 'compensated', 'failed', 'cancelled', 'stopped'));
ALTER TABLE __schema__.runs DROP CONSTRAINT runs_check;
ALTER TABLE __schema__.runs ADD CONSTRAINT runs_check
    CHECK ((due_at IS NULL) = (status IN ('completed', 'compensated', 'failed', 'cancelled',
                                          'stopped')));
ALTER TABLE __schema__.runs ADD COLUMN wait_name text;

-- Signals, one row per (run, name): the first signal of a name wins. The row is written
-- by the sender (payload), by the run entering its wait (awaited_at), and by the claim
-- that decides the wait (closed: from then on a signal is refused, the decision was
-- made). Each writer locks the run row first, then writes this row with INSERT ... ON
-- CONFLICT, which sees the other's committed row whatever its snapshot: a signal racing
-- the wait is never lost.
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
);
-- Runs stopped for an operator, counted by the metrics.
CREATE INDEX runs_stopped ON __schema__.runs (created_at) WHERE status = 'stopped';
