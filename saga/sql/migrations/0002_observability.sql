-- 0002: the watches table (below), the trace context of the span that started each run (W3C traceparent carrier),
-- so every step attempt, in any process, joins the run's one trace; and a partial index
-- for the few runs waiting for an operator (failed), counted by the metrics.

ALTER TABLE __schema__.runs ADD COLUMN trace_context jsonb;

-- Runs that a result() waiter watches: only those NOTIFY when they end (a NOTIFY takes a
-- cluster-wide lock at commit; notifying for every run halved throughput). A separate
-- table, not a flag on runs: updating the run's row would lock it just when a worker's
-- SKIP LOCKED claim looks at it, and the claim would pass the run by.
CREATE TABLE __schema__.watches (
    run_id uuid PRIMARY KEY
);

CREATE INDEX runs_failed ON __schema__.runs (created_at) WHERE status = 'failed';
