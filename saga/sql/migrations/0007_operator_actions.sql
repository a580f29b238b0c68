-- 0007: operators act on runs, and find the ones that need them.
--
-- A failed run, or one stopped for an operator, can be marked resolved: an operator
-- looked and closed it; it leaves the runs that need attention (its state and history
-- stay, and it can still be retried or cancelled, which makes it unresolved again).
ALTER TABLE __schema__.runs ADD COLUMN resolved boolean NOT NULL DEFAULT false;
-- The runs that need attention, oldest first: failed and stopped ones not resolved.
CREATE INDEX runs_attention ON __schema__.runs (created_at, id)
    WHERE status IN ('failed', 'stopped') AND NOT resolved;
-- One saga's finished runs, newest first, whatever the other sagas' history (partial on
-- finished runs like runs_finished_created: a step's update never touches it).
CREATE INDEX runs_finished_saga ON __schema__.runs (saga_name, created_at, id)
    WHERE due_at IS NULL;
-- History by time (the dashboard's last hours): a BRIN index, a few pages for millions
-- of events and nearly free to maintain, as events are appended in time order.
CREATE INDEX events_at ON __schema__.events USING brin (at);
