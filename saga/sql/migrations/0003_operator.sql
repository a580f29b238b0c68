-- 0003: indexes for operators (`saga runs`, `saga prune`), over finished runs only.
--
-- Both are partial on `due_at IS NULL` (terminal runs), so a step's update never touches
-- them: every step rewrites its run's row and no update is HOT, so a full index on
-- created_at would cost one more index insert per step. A partial one costs one insert
-- when a run ends. Active runs are few and already reachable through runs_due; the
-- listing query reads both sets and merges them.

-- Newest-first listing of finished runs, keyset-paged on (created_at, id).
CREATE INDEX runs_finished_created ON __schema__.runs (created_at, id) WHERE due_at IS NULL;

-- Pruning the oldest finished runs first, in small batches.
CREATE INDEX runs_finished_at ON __schema__.runs (finished_at) WHERE due_at IS NULL;
