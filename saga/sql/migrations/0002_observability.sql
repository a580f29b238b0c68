-- 0002: the watched flag (below), the trace context of the span that started each run (W3C traceparent carrier),
-- so every step attempt, in any process, joins the run's one trace; and a partial index
-- for the few runs waiting for an operator (failed), counted by the metrics.

ALTER TABLE __schema__.runs ADD COLUMN trace_context jsonb;

-- Set by result() waiters: only watched runs NOTIFY when they end. A NOTIFY takes a
-- cluster-wide lock at commit, so notifying for every run halved throughput.
ALTER TABLE __schema__.runs ADD COLUMN watched boolean NOT NULL DEFAULT false;

CREATE INDEX runs_failed ON __schema__.runs (created_at) WHERE status = 'failed';
