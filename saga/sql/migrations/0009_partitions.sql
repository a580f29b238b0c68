-- 0009: runs and their history partitioned by run id, one partition per UTC day.
--
-- Run ids are time-ordered (UUIDv7: the first 48 bits are the start's Unix time in ms),
-- so a range of ids is a range of start times. runs, events, watches and signals become
-- tables partitioned by RANGE of the run id; orchestrators add each day's partitions
-- ahead of time (saga/_partitions.py), and pruning drops a whole day at once instead of
-- deleting its rows one by one (no dead rows for autovacuum to chase).
--
-- No rewrite: each existing table becomes its new parent's DEFAULT partition as it is
-- (its rows, its indexes, renamed `<table>_default...`). The DEFAULT partition holds
-- runs started before this migration (random ids) and any run whose day has no partition
-- yet; `saga prune` deletes those row by row, as before. The transaction only renames
-- and attaches (catalog changes, no scan): running sagas wait for it milliseconds.
--
-- Idempotency keys: a unique index of a partitioned table must contain the partition
-- key, so uniqueness across days comes from starts with a key taking a transaction-scoped
-- advisory lock on (schema, saga, key) before they look the key up; each partition keeps
-- a unique index on (saga_name, idempotency_key) as well.

-- runs ------------------------------------------------------------------------------------
ALTER TABLE __schema__.runs RENAME TO runs_default;
ALTER INDEX __schema__.runs_pkey RENAME TO runs_default_pkey;
ALTER INDEX __schema__.runs_idempotency_key RENAME TO runs_default_idempotency_key;
ALTER INDEX __schema__.runs_due RENAME TO runs_default_due;
ALTER INDEX __schema__.runs_failed RENAME TO runs_default_failed;
ALTER INDEX __schema__.runs_stopped RENAME TO runs_default_stopped;
ALTER INDEX __schema__.runs_finished_created RENAME TO runs_default_finished_created;
ALTER INDEX __schema__.runs_finished_at RENAME TO runs_default_finished_at;
ALTER INDEX __schema__.runs_parent RENAME TO runs_default_parent;
ALTER INDEX __schema__.runs_attention RENAME TO runs_default_attention;
ALTER INDEX __schema__.runs_finished_saga RENAME TO runs_default_finished_saga;
ALTER INDEX __schema__.runs_key_held RENAME TO runs_default_key_held;
ALTER INDEX __schema__.runs_key_queue RENAME TO runs_default_key_queue;
ALTER INDEX __schema__.runs_urgent RENAME TO runs_default_urgent;

CREATE TABLE __schema__.runs (
    LIKE __schema__.runs_default INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE
) PARTITION BY RANGE (id);
ALTER TABLE __schema__.runs ADD PRIMARY KEY (id);
CREATE INDEX runs_due ON __schema__.runs (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX runs_failed ON __schema__.runs (created_at) WHERE status = 'failed';
CREATE INDEX runs_stopped ON __schema__.runs (created_at) WHERE status = 'stopped';
CREATE INDEX runs_finished_created ON __schema__.runs (created_at, id) WHERE due_at IS NULL;
CREATE INDEX runs_finished_at ON __schema__.runs (finished_at) WHERE due_at IS NULL;
CREATE INDEX runs_parent ON __schema__.runs (parent_id, parent_step) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_attention ON __schema__.runs (created_at, id)
    WHERE status IN ('failed', 'stopped') AND NOT resolved;
CREATE INDEX runs_finished_saga ON __schema__.runs (saga_name, created_at, id)
    WHERE due_at IS NULL;
CREATE INDEX runs_key_held ON __schema__.runs (saga_name, concurrency_key)
    WHERE key_state = 'held';
CREATE INDEX runs_key_queue ON __schema__.runs (saga_name, concurrency_key, created_at, id)
    WHERE key_state = 'queued';
CREATE INDEX runs_urgent ON __schema__.runs (priority DESC, due_at)
    WHERE due_at IS NOT NULL AND priority > 0;
-- Attaching finds each of the indexes above already built on the old table: no rebuild.
ALTER TABLE __schema__.runs ATTACH PARTITION __schema__.runs_default DEFAULT;

-- events ----------------------------------------------------------------------------------
-- A partitioned table's partitions cannot have identity columns: the ids come from a
-- sequence of the parent's, going on from the identity's last value.
CREATE SEQUENCE __schema__.event_ids;
SELECT setval('__schema__.event_ids', last_value, is_called) FROM __schema__.events_id_seq;
ALTER TABLE __schema__.events ALTER COLUMN id DROP IDENTITY;
ALTER TABLE __schema__.events RENAME TO events_default;
ALTER INDEX __schema__.events_pkey RENAME TO events_default_pkey;
ALTER INDEX __schema__.events_at RENAME TO events_default_at;
CREATE TABLE __schema__.events (
    LIKE __schema__.events_default INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE,
    PRIMARY KEY (run_id, id)
) PARTITION BY RANGE (run_id);
ALTER TABLE __schema__.events ALTER COLUMN id SET DEFAULT nextval('__schema__.event_ids');
ALTER SEQUENCE __schema__.event_ids OWNED BY __schema__.events.id;
CREATE INDEX events_at ON __schema__.events USING brin (at);
ALTER TABLE __schema__.events ATTACH PARTITION __schema__.events_default DEFAULT;

-- watches ---------------------------------------------------------------------------------
ALTER TABLE __schema__.watches RENAME TO watches_default;
ALTER INDEX __schema__.watches_pkey RENAME TO watches_default_pkey;
CREATE TABLE __schema__.watches (
    LIKE __schema__.watches_default INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE,
    PRIMARY KEY (run_id)
) PARTITION BY RANGE (run_id);
ALTER TABLE __schema__.watches ATTACH PARTITION __schema__.watches_default DEFAULT;

-- signals ---------------------------------------------------------------------------------
ALTER TABLE __schema__.signals RENAME TO signals_default;
ALTER INDEX __schema__.signals_pkey RENAME TO signals_default_pkey;
CREATE TABLE __schema__.signals (
    LIKE __schema__.signals_default INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE,
    PRIMARY KEY (run_id, name)
) PARTITION BY RANGE (run_id);
ALTER TABLE __schema__.signals ATTACH PARTITION __schema__.signals_default DEFAULT;
