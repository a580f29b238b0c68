-- Named queries, read only by the store (saga/_store*.py, saga/_migrate.py and
-- saga/_partitions.py, through saga/_db.py). Each block starts with "-- name: NAME", then
-- a line saying what it does and a line per positional parameter. __schema__ is replaced
-- by the validated, quoted schema identifier when the store loads the file; a block
-- named fragment_X is a shared condition that replaces __X__ in the others.

-- name: migration_lock
-- Serialize migrations of one schema across processes until the transaction ends.
-- $1 lock key text ("saga.migrate:" + schema)
SELECT pg_advisory_xact_lock(hashtext($1));

-- name: migration_prepare
-- Create the schema and its migrations table if missing (under migration_lock); tables
-- made before checksums were recorded gain the column.
-- no parameters
CREATE SCHEMA IF NOT EXISTS __schema__;
CREATE TABLE IF NOT EXISTS __schema__.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum   text
);
ALTER TABLE __schema__.migrations ADD COLUMN IF NOT EXISTS checksum text;

-- name: migrations_recorded
-- Every applied migration's version and checksum: an up-to-date schema is seen without
-- the lock's write transactions (see saga/_migrate.py).
SELECT version, checksum FROM __schema__.migrations;

-- name: migration_applied
-- The record of an applied migration version (no row: not applied).
-- $1 version
SELECT version, checksum FROM __schema__.migrations WHERE version = $1;

-- name: migration_record
-- Record a migration as applied (in the transaction that applied it).
-- $1 version, $2 name, $3 sha256 of its file
INSERT INTO __schema__.migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: migration_set_checksum
-- Record the checksum of a migration applied before checksums were recorded.
-- $1 version, $2 sha256 of its file
UPDATE __schema__.migrations SET checksum = $2 WHERE version = $1 AND checksum IS NULL;

-- name: migrations_table_exists
-- Whether the schema has been migrated at all.
-- $1 the quoted, schema-qualified name of the migrations table
SELECT to_regclass($1) IS NOT NULL;

-- name: migrations_latest
-- The highest applied migration version (NULL when none).
-- no parameters
SELECT max(version) FROM __schema__.migrations;

-- name: start_run
-- Insert a new pending run, its first history event, and wake the workers; returns no
-- row when a run with the same (saga, idempotency key) already exists.
-- $1 run id, $2 saga name, $3 saga version, $4 idempotency key or NULL,
-- $5 input JSON text, $6 first step name, $7 work notification channel, $8 trace
-- context JSON (W3C carrier of the starting span) or NULL, $9 whether to NOTIFY the
-- workers (the caller coalesces: NOTIFY serializes commits cluster-wide), $10 the
-- definition's fingerprint, $11 true for a graph saga (the run row is never claimed
-- itself, due 'infinity': start_items adds its first items in the same transaction),
-- $12 the definition's pivot step or NULL, $13 and $14 the parent run and step of a
-- child run (or NULL), $15 the run's priority, $16 its concurrency key or NULL (a keyed
-- run starts queued, never claimed until key_fill admits it, in the same transaction).
-- With an idempotency key, the caller holds lock_key: runs of different days are in
-- different partitions, which no unique index spans. created_at is when this statement
-- ran, not when the caller's transaction began (start(conn=)): runs queued for a key are
-- admitted in that order.
WITH ins AS (
    INSERT INTO __schema__.runs
        (id, saga_name, saga_version, idempotency_key, input, step_name, due_at,
         trace_context, fingerprint, graph, status, pivot, parent_id, parent_step,
         priority, concurrency_key, key_state, created_at, updated_at)
    SELECT $1::uuid, $2::text, $3::integer, $4::text, $5::text, $6::text,
           CASE WHEN $11::boolean OR $16::text IS NOT NULL THEN 'infinity'::timestamptz
                ELSE now() END,
           $8::text::jsonb, $10::text, $11::boolean,
           CASE WHEN $11::boolean THEN 'running' ELSE 'pending' END, $12::text, $13::uuid,
           $14::text, $15::integer, $16::text,
           CASE WHEN $16::text IS NOT NULL THEN 'queued' END, clock_timestamp(),
           clock_timestamp()
    WHERE $4::text IS NULL OR NOT EXISTS (
        SELECT 1 FROM __schema__.runs r WHERE r.saga_name = $2 AND r.idempotency_key = $4)
    ON CONFLICT DO NOTHING
    RETURNING id
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, data)
    SELECT id, 'run_started',
           jsonb_build_object('saga', $2::text, 'version', $3::integer, 'key', $4::text,
                              'fingerprint', $10::text)
    FROM ins
)
SELECT id, CASE WHEN $9 THEN pg_notify($7, $2)::text END AS notified FROM ins;

-- name: start_runs
-- start_run for several runs in one statement and one commit (group commit of starts:
-- see saga/_group.py), for runs that are neither graphs nor keyed (no concurrency key,
-- no idempotency key: those take lock_key first): each as start_run inserts it.
-- $1..$13 arrays, one element per run, as start_run's $1..$6, $8, $10, $12..$15 and $9
-- (in that order: id, saga, version, key, input, first step, trace context,
-- fingerprint, pivot, parent, parent step, priority, whether to NOTIFY); $14 the work
-- notification channel
WITH t AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::integer[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::uuid[],
                         $11::text[], $12::integer[], $13::boolean[])
        WITH ORDINALITY AS t(id, saga_name, saga_version, idempotency_key, input, step_name,
                             trace_context, fingerprint, pivot, parent_id, parent_step,
                             priority, notify, ord)
), ins AS (
    INSERT INTO __schema__.runs
        (id, saga_name, saga_version, idempotency_key, input, step_name, due_at,
         trace_context, fingerprint, graph, status, pivot, parent_id, parent_step,
         priority)
    SELECT id, saga_name, saga_version, idempotency_key, input, step_name, now(),
           trace_context::jsonb, fingerprint, false, 'pending', pivot, parent_id,
           parent_step, priority
    FROM t ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, data)
    SELECT t.id, 'run_started',
           jsonb_build_object('saga', t.saga_name, 'version', t.saga_version,
                              'key', t.idempotency_key, 'fingerprint', t.fingerprint)
    FROM ins JOIN t ON t.id = ins.id ORDER BY t.ord
)
SELECT t.id, CASE WHEN t.notify THEN pg_notify($14, t.saga_name)::text END AS notified
FROM ins JOIN t ON t.id = ins.id;

-- name: lock_key
-- Serializes the starts of one (saga, idempotency key) until their transactions end:
-- taken before start_run looks the key up (in a statement of its own, so that the
-- lookup's snapshot sees a run the previous holder committed).
-- $1 saga name, $2 idempotency key
SELECT pg_advisory_xact_lock(hashtext('__schema__ ' || $1), hashtext($2));

-- name: start_items
-- The first items of a graph run just started (its steps without dependencies), in the
-- start's transaction, each recorded ready.
-- $1 run id, $2 root step names
WITH ready AS (
    INSERT INTO __schema__.events (run_id, kind, step, data)
    SELECT $1, 'step_ready', r.step, '{"after": []}'::jsonb
    FROM unnest($2::text[]) WITH ORDINALITY AS r(step, ord)
    ORDER BY r.ord
)
INSERT INTO __schema__.items (run_id, step, phase)
SELECT $1, step, 'step' FROM unnest($2::text[]) AS step;

-- name: find_run_by_key
-- The id, input (JSON text) and definition of the run started with this idempotency key.
-- $1 saga name, $2 idempotency key
SELECT id, input, saga_version, fingerprint
FROM __schema__.runs WHERE saga_name = $1 AND idempotency_key = $2;

-- name: claim
-- Lease up to $2 runnable items (due, or whose lease expired) of registered sagas in one
-- statement, bumping each fencing token and attempt, and log the start (and any expired
-- lease, and a sleeping or waiting run's wake-up) in the history; after an expired lease,
-- the worker logs the start (see started). A waiting run's wait
-- is decided here, durably: its signal row is closed (later signals are refused), and
-- the payload it holds, if any, becomes the wait's result. What a claim does to each
-- (status, cancel requested, signalled) is the plan's table ($7-$12). Only runs of the
-- registered definitions: same name, version and fingerprint ('-' stands for runs
-- started before fingerprints were recorded). In due order; orchestrators executing
-- sagas with priorities use claim_prioritized instead (the same statement with the
-- candidates of claim_prioritized_candidates: see saga/_db.py).
-- $1 worker id, $2 max items, $3 lease seconds, $4 saga names, $5 saga versions, $6
-- fingerprints (the three pairwise); the claim table, rowwise: $7 status before, $8
-- cancel requested, $9 signalled, $10 status after, $11 wake-up event kind or NULL, $12
-- start event kind or NULL
-- An expired lease whose worker is waiting to write it (its write or its renewal waits
-- for the row a caller's transaction holds: see transition, heartbeat_waiting) is not
-- taken: that waiting statement holds the run's advisory lock (shared) until it ends,
-- and a claim takes an expired lease only when it gets that lock. When the caller's
-- transaction ends, its new row version is free at once, before the woken waiter
-- reaches it: without this, a claim polling then could take it first.
WITH candidates AS (
    SELECT r.id, r.lease_owner AS prev_owner, r.status AS before, r.wait_name, r.released
    FROM __schema__.runs r
    WHERE r.due_at <= now()
      AND (r.lease_owner IS NULL OR pg_try_advisory_xact_lock(hashtextextended(r.id::text, 0)))
      -- Registered definitions only, written so the planner sees that most due runs
      -- match: an IN over unnest() was estimated at 1 %, and the claim then sorted
      -- every due run instead of reading the due index in order.
      AND array_position(
            ARRAY(SELECT format('%s/%s/%s', d.n, d.v, d.f)
                  FROM unnest($4::text[], $5::integer[], $6::text[]) AS d(n, v, f)),
            format('%s/%s/%s', r.saga_name, r.saga_version, coalesce(r.fingerprint, '-'))
          ) IS NOT NULL
    ORDER BY r.due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), closing AS (
    -- The run rows are locked (above) before the signal rows, the order a sender takes.
    INSERT INTO __schema__.signals AS s (run_id, name, closed)
    SELECT id, wait_name, true FROM candidates WHERE before = 'waiting'
    ON CONFLICT (run_id, name) DO UPDATE SET closed = true
    RETURNING s.run_id, s.payload
), claimed AS (
    UPDATE __schema__.runs r SET
        lease_owner = $1,
        lease_token = r.lease_token + 1,
        attempt = r.attempt + 1,
        due_at = clock_timestamp() + make_interval(secs => $3),
        status = t.after,
        results = CASE WHEN t.woke IS NOT NULL AND s.payload IS NOT NULL
                       THEN r.results || jsonb_build_object(r.wait_name, to_jsonb(s.payload))
                       ELSE r.results END,
        completed_steps = CASE WHEN t.woke IS NOT NULL AND s.payload IS NOT NULL
                               THEN array_append(r.completed_steps, r.wait_name)
                               ELSE r.completed_steps END,
        wait_name = CASE WHEN t.after = 'waiting' THEN r.wait_name END,
        -- An expired lease counts its attempt: the next one has not been given back.
        released = r.released AND c.prev_owner IS NULL,
        updated_at = now()
    FROM candidates c
         LEFT JOIN closing s ON s.run_id = c.id,
         unnest($7::text[], $8::boolean[], $9::boolean[], $10::text[], $11::text[],
                $12::text[]) AS t(before, cancel, signalled, after, woke, start_kind)
    WHERE r.id = c.id AND t.before = r.status AND t.cancel = r.cancel_requested
      AND t.signalled = (s.payload IS NOT NULL)
      -- The candidates' ids as an array too: each partition is then read through its
      -- primary key, whatever the planner guesses of the candidates' count (a generic
      -- plan guesses a tenth of the due runs for LIMIT $2, and joining that many
      -- against every partition looked dearer than reading today's partition whole).
      -- key_fill and claim_items join their chosen runs the same way.
      AND r.id = ANY (ARRAY(SELECT id FROM candidates))
    RETURNING r.id, r.saga_name, r.saga_version, r.status, r.step_name, r.attempt,
              r.lease_token, r.input, r.results::text AS results,
              r.completed_steps, r.cancel_requested, r.error IS NOT NULL AS has_error,
              r.trace_context::text AS trace_context,
              extract(epoch FROM now() - r.created_at)::float8 AS age, c.prev_owner,
              c.released, t.start_kind, t.woke, c.wait_name, r.wait_name AS timed_out_wait,
              r.parent_id IS NOT NULL AS child, r.concurrency_key IS NOT NULL AS keyed
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker, data)
    SELECT run_id, kind, step, attempt, worker, data FROM (
        -- (a waiting run's expired lease was deciding its wait's timeout)
        SELECT id AS run_id, 1 AS ord, 'lease_expired' AS kind,
               coalesce(wait_name, step_name) AS step, attempt - 1 AS attempt,
               prev_owner AS worker, NULL::jsonb AS data
        FROM claimed WHERE prev_owner IS NOT NULL
        UNION ALL
        SELECT id, 2, woke, wait_name, NULL, $1, NULL
        FROM claimed WHERE woke IS NOT NULL
        UNION ALL
        -- Not after an expired lease or a release: the worker records that start
        -- itself, unless the attempt lost (or given back a second time, which counts)
        -- was the last one allowed (none starts: see attempts_exhausted).
        SELECT id, 3, start_kind, step_name, attempt, $1, NULL
        FROM claimed WHERE start_kind IS NOT NULL AND prev_owner IS NULL AND NOT released
    ) e
    ORDER BY run_id, ord
)
SELECT * FROM claimed;

-- name: started
-- Log the start of an attempt claimed after an expired lease or a release (claim and
-- claim_items log the others), fenced like a transition: whether the lease is still held
-- (nothing is logged when it is not). Safe to replay: a start logged already since that
-- claim's lease_expired (or lease_released) is not logged again (an earlier one of the
-- same attempt number, before an operator's retry restarted the count, does not count).
-- $1 run id, $2 lease token held, $3 the worker holding it, $4 event kind
-- (step_started or compensation_started), $5 step name, $6 attempt, $7 the graph item's
-- phase, or NULL for a linear run (whose lease is in its run row)
WITH lease AS (
    SELECT CASE WHEN $7::text IS NULL
                THEN EXISTS (SELECT 1 FROM __schema__.runs
                             WHERE id = $1 AND lease_token = $2 AND lease_owner = $3)
                ELSE EXISTS (SELECT 1 FROM __schema__.items
                             WHERE run_id = $1 AND step = $5 AND phase = $7
                               AND lease_token = $2 AND lease_owner = $3)
           END AS held
), logged AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker)
    SELECT $1, $4, $5, $6, $3 FROM lease
    WHERE lease.held AND NOT EXISTS (
        SELECT 1 FROM __schema__.events e
        WHERE e.run_id = $1 AND e.kind = $4 AND e.step = $5 AND e.attempt = $6
          AND e.worker = $3
          AND e.id > (SELECT max(x.id) FROM __schema__.events x
                      WHERE x.run_id = $1 AND x.step = $5
                        AND x.kind IN ('lease_expired', 'lease_released')))
)
SELECT held FROM lease;

-- name: transition
-- Apply one state transition of a leased run, fenced by its lease token, append its
-- events in order, and notify result waiters (if any: see watch_run) when the run
-- ends. No row: lease lost.
-- $1 run id, $2 lease token held, $3 new status, $4 next item's step name (NULL when
-- terminal), $5 next item's attempt, $6 completed step name or NULL, $7 its result JSON,
-- $8 output JSON or NULL, $9 error JSON or NULL (keeps the old), $10 compensation error
-- JSON or NULL (keeps the old), $11 seconds until due (NULL when terminal), $12 new lease
-- owner (NULL releases), $13 events JSON array, $14 done notification channel, $15 the
-- worker holding the lease (with $2, a replayed transition can never apply twice), $16
-- true to refuse the transition when a cancel was requested (a completion must then
-- roll back instead), $17 the sleep or wait the run parks at (or is stopped at) or NULL
-- ($11 'Infinity': a wait without timeout; a run parking at a wait goes through
-- transition_batch, which marks the wait's signal row first), $18 true to wait at most
-- 50 ms for the run's row when another transaction holds it (then LockNotAvailable:
-- nothing is written; see transition_batch)
WITH briefly AS MATERIALIZED (
    SELECT set_config('lock_timeout', '50ms', true) WHERE $18::boolean
    UNION ALL  -- (waiting for the row: no claim takes the expired lease meanwhile, see claim)
    SELECT pg_advisory_xact_lock_shared(hashtextextended($1::uuid::text, 0))::text
    WHERE NOT $18::boolean
), waited AS MATERIALIZED (
    -- Going alone, the write waits for the run's row before it computes the new one (an
    -- UPDATE computes it first, then waits): a lease or delay counts from the write.
    SELECT id FROM __schema__.runs
    WHERE id = $1 AND NOT $18::boolean AND $11::float8 IS NOT NULL
    FOR UPDATE
), upd AS (
    UPDATE __schema__.runs SET
        status = $3,
        step_name = $4,
        attempt = $5,
        results = CASE WHEN $6::text IS NULL THEN results
                       ELSE results || jsonb_build_object($6::text, to_jsonb($7::text)) END,
        completed_steps = CASE WHEN $6::text IS NULL THEN completed_steps
                               ELSE array_append(completed_steps, $6::text) END,
        output = coalesce($8::text, output),
        error = coalesce($9::text::jsonb, error),
        compensation_error = coalesce($10::text::jsonb, compensation_error),
        due_at = CASE WHEN $11::float8 IS NULL THEN NULL
                      WHEN $11::float8 = 'Infinity' THEN 'infinity'
                      ELSE clock_timestamp() + make_interval(secs => $11::float8) END,
        wait_name = $17,
        lease_owner = $12,
        lease_token = CASE WHEN $12::text IS NULL THEN lease_token ELSE lease_token + 1 END,
        finished_at = CASE WHEN $11::float8 IS NULL THEN now() END,
        released = false,
        updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND lease_owner = $15
      AND NOT ($16::boolean AND cancel_requested)
      AND (SELECT count(*) FROM briefly) >= 0  -- (set before the row is locked)
      AND (SELECT count(*) FROM waited) >= 0
    RETURNING id, lease_token, cancel_requested, due_at IS NULL AS finished,
              extract(epoch FROM now() - created_at)::float8 AS age
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker, data)
    SELECT upd.id, e.ev->>'kind', e.ev->>'step', (e.ev->>'attempt')::integer,
           e.ev->>'worker', e.ev->'data'
    FROM upd, jsonb_array_elements($13::text::jsonb) WITH ORDINALITY AS e(ev, ord)
    -- Events the plan marked so are dropped on a run being cancelled: a step leased to
    -- us then will not run (the worker sees cancel_requested and rolls back).
    WHERE NOT (upd.cancel_requested AND coalesce((e.ev->>'unless_cancelled')::boolean, false))
    ORDER BY e.ord
), watch AS (
    -- The end mark: on conflict it sees a waiter's watch committed after this
    -- statement's snapshot, so a watched run's end is never missed (see watch_run).
    INSERT INTO __schema__.watches AS w (run_id, watched, ended)
    SELECT id, false, true FROM upd WHERE finished
    ON CONFLICT (run_id) DO UPDATE SET ended = true
    RETURNING w.watched
)
SELECT lease_token, cancel_requested, age, false AS signalled,
       CASE WHEN EXISTS (SELECT 1 FROM watch WHERE watched)
            THEN pg_notify($14, id::text)::text END AS notified
FROM upd;

-- name: transition_batch
-- The transitions of several leased runs in one statement and one commit (group commit:
-- see saga/_group.py): each row as `transition` applies it, fenced by its own lease token
-- and owner; a row whose fence fails is left out of the result, for that run alone. The
-- runs come sorted by id, so concurrent batches lock rows in one order.
-- $1..$15 arrays, one element per run: run id, lease token held, new status, next step,
-- next attempt, completed step, its result JSON, output JSON, error JSON, compensation
-- error JSON, seconds until due, new lease owner, events JSON array, the worker holding
-- the lease, refuse when a cancel was requested; $16 the sleep or wait parked at (array),
-- $17 done notification channel, $18 and $19 the smallest and the largest run id, $20
-- true to wait at most 50 ms for a row another transaction holds (a caller's
-- transaction that sent the run a signal holds it until it ends): then the statement
-- fails (LockNotAvailable, nothing committed), and a group commit writes its runs again
-- one by one, each held one on its own, waiting (see saga/_group.py). Locking the rows
-- first with SKIP LOCKED instead cost about a tenth of the statement.
-- A run parking at a wait (status waiting, a wait named) first has its row locked, then
-- its wait's signal row marked awaited (INSERT ... ON CONFLICT sees a signal committed
-- meanwhile, whatever the snapshot: the order every writer of signals takes); when the
-- signal is there already, the run is due at once (signalled).
WITH briefly AS MATERIALIZED (
    SELECT set_config('lock_timeout', '50ms', true) WHERE $20::boolean
    UNION ALL  -- (waiting for the rows: no claim takes their expired leases, see claim)
    SELECT count(pg_advisory_xact_lock_shared(hashtextextended(id::text, 0)))::text
    FROM unnest($1::uuid[]) AS id WHERE NOT $20::boolean HAVING NOT $20::boolean
), t AS (
    SELECT t.* FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::integer[],
                           $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                           $11::float8[], $12::text[], $13::text[], $14::text[],
                           $15::boolean[], $16::text[])
        AS t(id, token, status, step, attempt, completed, result, output, error,
             compensation_error, due_in, owner, events, worker, unless_cancelled, wait)
        LEFT JOIN briefly ON true  -- (read first: the timeout is set before any lock)
), parking AS MATERIALIZED (
    SELECT r.id, t.wait, t.due_in
    FROM __schema__.runs r JOIN t ON r.id = t.id
    WHERE t.status = 'waiting' AND t.wait IS NOT NULL
      AND r.lease_token = t.token AND r.lease_owner = t.worker
      AND NOT (t.unless_cancelled AND r.cancel_requested)
      AND r.id BETWEEN $18 AND $19
    ORDER BY r.id
    FOR UPDATE OF r
), awaited AS (
    INSERT INTO __schema__.signals AS s (run_id, name, awaited_at, timeout_seconds)
    SELECT id, wait, clock_timestamp(), due_in FROM parking
    ON CONFLICT (run_id, name) DO UPDATE
        SET awaited_at = clock_timestamp(), timeout_seconds = excluded.timeout_seconds
    RETURNING s.run_id, s.payload IS NOT NULL AS arrived
), upd AS (
    UPDATE __schema__.runs r SET
        status = t.status,
        step_name = t.step,
        attempt = t.attempt,
        results = CASE WHEN t.completed IS NULL THEN r.results
                       ELSE r.results || jsonb_build_object(t.completed, to_jsonb(t.result)) END,
        completed_steps = CASE WHEN t.completed IS NULL THEN r.completed_steps
                               ELSE array_append(r.completed_steps, t.completed) END,
        output = coalesce(t.output, r.output),
        error = coalesce(t.error::jsonb, r.error),
        compensation_error = coalesce(t.compensation_error::jsonb, r.compensation_error),
        due_at = CASE WHEN t.due_in IS NULL THEN NULL
                      WHEN a.arrived THEN now()
                      WHEN t.due_in = 'Infinity' THEN 'infinity'
                      ELSE clock_timestamp() + make_interval(secs => t.due_in) END,
        wait_name = t.wait,
        lease_owner = t.owner,
        lease_token = CASE WHEN t.owner IS NULL THEN r.lease_token ELSE r.lease_token + 1 END,
        finished_at = CASE WHEN t.due_in IS NULL THEN now() END,
        released = false,
        updated_at = now()
    FROM t LEFT JOIN awaited a ON a.run_id = t.id
    WHERE r.id = t.id AND r.lease_token = t.token AND r.lease_owner = t.worker
      AND NOT (t.unless_cancelled AND r.cancel_requested)
      -- The batch's first and last run id (parameters, not a join): Postgres then drops
      -- the days outside them before it opens anything, where a generic plan would open
      -- every day's partition kept for retention at every execution.
      AND r.id BETWEEN $18 AND $19
    RETURNING r.id, t.token AS held, r.lease_token, r.cancel_requested,
              r.due_at IS NULL AS finished,
              extract(epoch FROM now() - r.created_at)::float8 AS age, t.events,
              coalesce(a.arrived, false) AS signalled
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker, data)
    SELECT upd.id, e.ev->>'kind', e.ev->>'step', (e.ev->>'attempt')::integer,
           e.ev->>'worker', e.ev->'data'
    FROM upd, jsonb_array_elements(upd.events::jsonb) WITH ORDINALITY AS e(ev, ord)
    WHERE NOT (upd.cancel_requested AND coalesce((e.ev->>'unless_cancelled')::boolean, false))
    ORDER BY upd.id, e.ord
), watch AS (
    INSERT INTO __schema__.watches AS w (run_id, watched, ended)
    SELECT id, false, true FROM upd WHERE finished
    ON CONFLICT (run_id) DO UPDATE SET ended = true
    RETURNING w.run_id, w.watched
)
SELECT upd.id, upd.held, upd.lease_token, upd.cancel_requested, upd.age, upd.signalled,
       CASE WHEN watch.watched THEN pg_notify($17, upd.id::text)::text END AS notified
FROM upd LEFT JOIN watch ON watch.run_id = upd.id;

-- name: transition_claim_rows
-- The result of transition_claim (see saga/_db.py: claim's CTEs, then transition_batch's,
-- then this, in one statement): the transitions' rows (claim false), then the runs
-- claimed for the slots they free (claim true), in the columns of both. Numbered as
-- transition_batch ($17: done notification channel).
SELECT false AS claim, upd.id, upd.held, upd.lease_token, upd.cancel_requested, upd.age,
       upd.signalled,
       CASE WHEN watch.watched THEN pg_notify($17, upd.id::text)::text END AS notified,
       NULL::text AS saga_name, NULL::integer AS saga_version, NULL::text AS status,
       NULL::text AS step_name, NULL::integer AS attempt, NULL::text AS input,
       NULL::text AS results, NULL::text[] AS completed_steps, NULL::boolean AS has_error,
       NULL::text AS trace_context, NULL::text AS prev_owner, NULL::boolean AS released,
       NULL::text AS timed_out_wait, NULL::boolean AS child, NULL::boolean AS keyed
FROM upd LEFT JOIN watch ON watch.run_id = upd.id
UNION ALL
SELECT true, id, NULL, lease_token, cancel_requested, age, false, NULL, saga_name,
       saga_version,
       status, step_name, attempt, input, results, completed_steps, has_error,
       trace_context, prev_owner, released, timed_out_wait, child, keyed
FROM claimed;

-- name: statistics_stale
-- Whether the planner's statistics of the runs table are worth gathering again: many
-- rows changed since they were (a burst of starts: the claim would plan a scan and sort
-- of every due run instead of reading the due index), and not in the last minute
-- (autovacuum's analyze may take a minute or more to come). See saga/_census.py.
-- The runs table is partitioned (by day): the partitions whose statistics are stale.
SELECT coalesce(array_agg(s.relname::text), '{}')
FROM pg_stat_user_tables s JOIN pg_inherits i ON i.inhrelid = s.relid
WHERE i.inhparent = '__schema__.runs'::regclass
  AND s.n_mod_since_analyze >= greatest(1000, 0.1 * s.n_live_tup)
  AND coalesce(greatest(s.last_analyze, s.last_autoanalyze), '-infinity')
      < now() - interval '60 seconds';

-- name: analyze_runs
-- Gather the runs table's statistics, one orchestrator at a time (the others skip).
SELECT pg_try_advisory_xact_lock(hashtext('__schema__.runs analyze'));

-- name: wake_parent
-- A child run that ended (this transaction's transition ended it) wakes the step of its
-- parent that started it: marked woken, and due now unless a worker holds it (then its
-- park sees the mark); the parent's workers are woken at commit.
-- $1 the child run id, $2 work notification channel
WITH child AS (
    SELECT parent_id, parent_step FROM __schema__.runs
    WHERE id = $1 AND parent_id IS NOT NULL AND due_at IS NULL
), woken AS (
    UPDATE __schema__.items i SET
        woken = true, due_at = CASE WHEN i.lease_owner IS NULL THEN now() ELSE i.due_at END
    FROM child
    WHERE i.run_id = child.parent_id AND i.step = child.parent_step
    RETURNING i.run_id
)
SELECT pg_notify($2, r.saga_name)::text AS notified
FROM __schema__.runs r WHERE r.id = (SELECT run_id FROM woken LIMIT 1);

-- name: heartbeat
-- Extend the leases this worker still holds; rows missing from the result were lost.
-- A newer token still owned by this worker is ours too: a transition of this worker
-- leased the run's next item between the heartbeat reading the token and this write.
-- A row another transaction holds locked (a caller's transaction that sent the run a
-- signal, until it ends) is not waited for: it comes back with cancel_requested NULL,
-- still held as far as its last commit says, and is renewed by the next heartbeat (one
-- run's lock must not stop every other lease of the worker from being renewed).
-- $1 worker id, $2 run ids, $3 lease tokens, $4 lease seconds (the three pairwise)
WITH h AS (
    SELECT * FROM unnest($2::uuid[], $3::bigint[], $4::float8[]) AS h(id, token, seconds)
), locked AS MATERIALIZED (
    SELECT r.id FROM __schema__.runs r JOIN h ON r.id = h.id
    WHERE r.lease_token >= h.token AND r.lease_owner = $1
    ORDER BY r.id
    FOR UPDATE OF r SKIP LOCKED
), upd AS (
    UPDATE __schema__.runs r SET due_at = clock_timestamp() + make_interval(secs => h.seconds)
    FROM h JOIN locked l ON l.id = h.id
    WHERE r.id = h.id
    RETURNING r.id, r.cancel_requested
)
SELECT id, cancel_requested FROM upd
UNION ALL
SELECT r.id, NULL FROM __schema__.runs r JOIN h ON r.id = h.id
WHERE r.lease_token >= h.token AND r.lease_owner = $1
  AND r.id <> ALL (ARRAY(SELECT id FROM locked));

-- name: heartbeat_waiting
-- heartbeat, for leases whose rows another transaction held when it came by: this one
-- waits for those locks (on a connection of its own), so that the lease is renewed as
-- soon as the lock is released, before a claim of the expired lease could take the run.
-- Like every write of a lease's or a delay's end, it counts from the moment of the
-- write (clock_timestamp), not from the statement's start (now()), which was before
-- its wait for the lock; and the rows are locked first: an UPDATE computes the new row
-- before it waits for a lock on the old (a lease renewed after a long wait would be
-- written expired).
-- $1 worker id, $2 run ids, $3 lease tokens, $4 lease seconds (the three pairwise)
WITH h AS (
    SELECT * FROM unnest($2::uuid[], $3::bigint[], $4::float8[]) AS h(id, token, seconds)
), waiting AS MATERIALIZED (  -- (no claim takes these expired leases meanwhile, see claim)
    SELECT count(pg_advisory_xact_lock_shared(hashtextextended(id::text, 0))) FROM h
), locked AS MATERIALIZED (
    SELECT r.id, h.seconds FROM __schema__.runs r JOIN h ON r.id = h.id
    WHERE r.lease_token >= h.token AND r.lease_owner = $1
      AND (SELECT count FROM waiting) >= 0  -- (announced before a row is locked)
    ORDER BY r.id
    FOR UPDATE OF r
)
UPDATE __schema__.runs r SET due_at = clock_timestamp() + make_interval(secs => l.seconds)
FROM locked l
WHERE r.id = l.id
RETURNING r.id, r.cancel_requested;

-- name: release
-- Give back every lease of this worker at shutdown, once its loops have ended, so another
-- worker can claim them at once: those of the items it ran, and any that a write
-- cancelled in flight committed without its runner learning of them (the next step
-- leased along, a due run claimed along). The interrupted attempt is not counted, once:
-- an attempt released again before any outcome was recorded (a step that takes its
-- worker down gracefully, or never ends within the shutdown timeout) counts, so the
-- attempt limit still ends it. (A leased run is due: the partial due index finds them.)
-- Not those of attempts saga.testing crashed ($3, $4): a dead worker releases nothing.
-- Nor those whose row another transaction holds (a caller's transaction that sent the
-- run a signal): shutting down waits for no one's transaction, and their leases expire.
-- An attempt still waiting for its rate limit's token ($5) never started: its
-- give-back is not counted, however many times.
-- $1 worker id, $2 work notification channel, $3 run ids and $4 lease tokens to keep,
-- $5 run ids of attempts not started
WITH held AS (
    SELECT r.id, r.attempt, r.released AND NOT r.id = ANY($5::uuid[]) AS counts,
           r.id = ANY($5::uuid[]) AS unstarted, r.released
    FROM __schema__.runs r
    WHERE r.due_at IS NOT NULL AND r.lease_owner = $1
      AND (r.id, r.lease_token) NOT IN (SELECT * FROM unnest($3::uuid[], $4::bigint[]))
    ORDER BY r.id
    FOR UPDATE OF r SKIP LOCKED
), upd AS (
    UPDATE __schema__.runs r SET
        lease_owner = NULL, due_at = now(),
        attempt = CASE WHEN held.counts THEN held.attempt
                       ELSE greatest(held.attempt - 1, 0) END,
        released = held.released OR NOT held.unstarted, updated_at = now()
    FROM held
    WHERE r.id = held.id
    -- (a waiting run's lease was deciding its wait's timeout: the wait is named)
    RETURNING r.id, r.saga_name, coalesce(r.wait_name, r.step_name) AS step_name,
              held.attempt AS released_attempt, held.counts AS counted
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker, data)
    SELECT id, 'lease_released', step_name, released_attempt, $1,
           jsonb_build_object('counted', counted)
    FROM upd
)
SELECT id, pg_notify($2, saga_name)::text AS notified FROM upd;

-- name: get_run
-- One run's current state, without the input and results payloads. A run whose steps
-- run in parallel is due when its first item is (its row never is).
-- $1 run id
SELECT id, saga_name, saga_version, idempotency_key, status, step_name, attempt,
       completed_steps, output, error::text AS error,
       compensation_error::text AS compensation_error, cancel_requested, lease_owner,
       lease_token, created_at, updated_at, finished_at, fingerprint, wait_name,
       CASE WHEN r.graph AND r.due_at IS NOT NULL
            THEN coalesce((SELECT min(i.due_at) FROM __schema__.items i
                           WHERE i.run_id = r.id), r.due_at)
            ELSE r.due_at END AS due_at,
       pivot, resolved, priority, concurrency_key, key_state
FROM __schema__.runs r WHERE id = $1;

-- name: watch_run
-- Ask for a NOTIFY when this active run ends (result() waits on it). Takes no lock on
-- the run (a lock would make claims skip it). Race-free with the final transition: both
-- write the run's watch row with INSERT ... ON CONFLICT, so the second to commit sees
-- the first. Returns ended = true when the run already ended; no row when it had ended
-- (or does not exist) at this statement's snapshot.
-- $1 run id
INSERT INTO __schema__.watches AS w (run_id, watched)
SELECT id, true FROM __schema__.runs WHERE id = $1 AND due_at IS NOT NULL
ON CONFLICT (run_id) DO UPDATE SET watched = true
RETURNING w.ended;

-- name: ended_runs
-- Which of these runs have ended (the waiters' shared fallback poll).
-- $1 run ids
SELECT id FROM __schema__.runs WHERE id = ANY($1::uuid[]) AND due_at IS NULL;

-- name: notify_work
-- Wake the workers of a saga (a trailing notification for coalesced starts).
-- $1 work notification channel, $2 saga name
SELECT pg_notify($1, $2)::text;

-- name: get_events
-- One run's history in order.
-- $1 run id
SELECT id, at, kind, step, attempt, worker, data::text AS data
FROM __schema__.events WHERE run_id = $1 ORDER BY id;

-- name: run_exists
-- Whether run $1 exists (read as committed, never waiting for its row's lock).
SELECT EXISTS (SELECT 1 FROM __schema__.runs WHERE id = $1);

-- name: graph_runs
-- Which of the runs $1 are graph runs (read as committed, never waiting for a lock).
SELECT id FROM __schema__.runs WHERE id = ANY($1::uuid[]) AND graph;

-- name: lock_run_row
-- Lock run $1's row for the rest of the transaction, so that the next statement takes
-- its snapshot after every write that held the lock committed (request_cancel reads the
-- pivot's item: a statement's own snapshot predates its wait for the lock).
-- $1 run id
SELECT 1 FROM __schema__.runs WHERE id = $1 FOR UPDATE;

-- name: request_cancel
-- Mark an active run (or one stopped at a wait) for cancellation and make it claimable
-- now if no worker holds it: a sleeping or waiting run does not wait for its timer. The
-- worker that claims it rolls back what completed. A graph run's forward items that no
-- worker holds are due now instead (the run row is locked first, then they): the worker
-- that claims one starts the rollback, and the items running see the cancel when they
-- write. A run that reached its pivot step (an attempt of it began, as its history
-- says, or it completed) only goes forward: no row; but one stopped at its pivot (the
-- pivot gave up) rolls back. A run whose next step is its pivot, not begun (queued for
-- its key, pending), has not reached it. No row either: not in a cancellable status, or
-- already cancelling. A run stopped for an operator at a step (its policy stopped it
-- when it gave up) rolls back, keeping its error: it ends compensated (a graph run gets
-- one forward item, which the claim drops, to start its rollback).
-- $1 run id, $2 work notification channel, $3 the cancellable statuses, $4 the
-- cancel_requested event's data (the operator and the note) or NULL
WITH old AS (
    SELECT id, status = 'stopped' AND wait_name IS NULL AS at_step
    FROM __schema__.runs WHERE id = $1
    FOR UPDATE
), upd AS (
    UPDATE __schema__.runs r SET
        cancel_requested = true,
        status = CASE WHEN r.status <> 'stopped' THEN r.status
                      WHEN old.at_step THEN 'running' ELSE 'waiting' END,
        -- A run stopped at a wait: its error was the timeout; the rollback is the cancel's.
        error = CASE WHEN r.status = 'stopped' AND NOT old.at_step THEN NULL ELSE r.error END,
        -- A compensating run (a step failed) keeps its compensation's backoff: the cancel
        -- changes nothing there.
        due_at = CASE WHEN r.graph AND old.at_step THEN 'infinity'::timestamptz
                      WHEN r.graph OR r.lease_owner IS NOT NULL OR r.status = 'compensating'
                      THEN r.due_at ELSE now() END,
        finished_at = NULL,
        resolved = false,
        updated_at = now()
    FROM old
    WHERE r.id = $1 AND r.id = old.id AND r.status = ANY($3::text[])
      AND NOT r.cancel_requested
      AND r.key_state IS DISTINCT FROM 'released'
      AND NOT (r.pivot IS NOT NULL
               -- (a run parked at the sleep or wait before its pivot has not reached it;
               -- one its pivot's policy stopped when the pivot gave up never passed it,
               -- unlike one stopped there because the sleep after it failed to start)
               AND (r.pivot = ANY(r.completed_steps)
                    -- an attempt of the pivot began (whatever happened since: a retry,
                    -- a sleep after it that failed to start)
                    OR EXISTS (SELECT 1 FROM __schema__.events e
                               WHERE e.run_id = $1 AND e.kind = 'step_started'
                                 AND e.step = r.pivot)
                       AND NOT (r.status = 'stopped' AND coalesce(
                           (SELECT e.data ? 'on_give_up' FROM __schema__.events e
                            WHERE e.run_id = $1 AND e.kind = 'run_stopped'
                            ORDER BY e.id DESC LIMIT 1), false))))
    RETURNING r.id, r.saga_name, r.graph AND old.at_step AS restart, r.error->>'step' AS failed
), items AS (
    UPDATE __schema__.items i SET due_at = now()
    FROM upd WHERE i.run_id = upd.id AND i.lease_owner IS NULL AND i.phase = 'step'
), restarted AS (
    INSERT INTO __schema__.items (run_id, step, phase)
    SELECT id, failed, 'step' FROM upd WHERE restart
    ON CONFLICT DO NOTHING
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, data)
    SELECT id, 'cancel_requested', $4::text::jsonb FROM upd
), revived AS (
    -- A stopped run is active again: its end mark goes, so waiters wait for the end.
    UPDATE __schema__.watches w SET ended = false
    FROM upd WHERE w.run_id = $1 AND w.run_id = upd.id
)
SELECT id, pg_notify($2, saga_name)::text AS notified FROM upd;

-- name: retry_run
-- Resume a run stopped for an operator at its current item, attempts reset: a failed
-- run at the compensation that gave up, a run stopped after its pivot at the step that
-- gave up (its error goes: the run goes on). A graph run gets its items again: that one
-- and those its stop held back (ready then, independent of it).
-- Not a run stopped at a wait (wait_name set: see rewait_run).
-- $1 run id, $2 work notification channel, $3 the status it must be in, $4 the status
-- it resumes in, $5 the phase it resumes ('step': after a pivot; 'compensation'), $6 the
-- run_retried event's data (the operator and the note) or NULL
WITH old AS (
    SELECT id, graph,
           CASE WHEN $5 = 'step' THEN coalesce(error->>'step', step_name)
                ELSE coalesce(compensation_error->>'step', step_name) END AS failed_step
    FROM __schema__.runs
    WHERE id = $1 AND status = $3 AND wait_name IS NULL
      AND key_state IS DISTINCT FROM 'released'
    FOR UPDATE
), upd AS (
    UPDATE __schema__.runs r SET
        status = $4, attempt = 0, lease_owner = NULL,
        due_at = CASE WHEN old.graph THEN 'infinity'::timestamptz ELSE now() END,
        error = CASE WHEN $5 = 'step' THEN NULL ELSE r.error END,
        compensation_error = NULL, finished_at = NULL, resolved = false, updated_at = now()
    FROM old WHERE r.id = $1 AND r.id = old.id
    RETURNING r.id, r.saga_name, r.step_name
), held AS (
    -- A graph run's stop recorded what was ready then (the item that gave up and the
    -- independent ones held back meanwhile): all start again now, not once it completes.
    SELECT h->>'step' AS step, h->'after' AS after
    FROM old
    CROSS JOIN LATERAL (
        SELECT e.data FROM __schema__.events e
        WHERE e.run_id = old.id AND e.kind IN ('run_stopped', 'run_failed')
        ORDER BY e.id DESC LIMIT 1
    ) stop
    CROSS JOIN LATERAL jsonb_array_elements(coalesce(stop.data->'held', '[]')) h
    WHERE old.graph
), item AS (
    INSERT INTO __schema__.items (run_id, step, phase)
    SELECT old.id, s.step, $5 FROM old JOIN upd ON upd.id = old.id
    CROSS JOIN LATERAL (SELECT old.failed_step AS step UNION SELECT step FROM held) s
    WHERE old.graph
    ON CONFLICT DO NOTHING
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, data)
    SELECT run_id, kind, step, data FROM (
        SELECT 0 AS n, id AS run_id, 'run_retried' AS kind, step_name AS step,
               $6::text::jsonb AS data
        FROM upd
        UNION ALL
        SELECT 1, upd.id, 'step_ready', held.step, jsonb_build_object('after', held.after)
        FROM upd, held, old
        WHERE $5 = 'step' AND held.step IS DISTINCT FROM old.failed_step
    ) e ORDER BY n
), revived AS (
    -- The run is active again: its end mark goes, so waiters wait for the next end.
    UPDATE __schema__.watches w SET ended = false
    FROM upd WHERE w.run_id = $1 AND w.run_id = upd.id
)
SELECT id, pg_notify($2, saga_name)::text AS notified FROM upd;

-- name: rewait_run
-- Resume a run stopped at a timed-out wait: it waits again for its signal, with a fresh
-- timeout of the same length (its signal row reopens).
-- $1 run id, $2 the status it must be in, $3 the status it resumes in, $4 the
-- run_retried event's data (the operator and the note) or NULL
WITH held AS (
    -- Lock the run row before the signal row, the order a sender takes them in: a
    -- signal committed meanwhile has resumed the run (no longer $2), so no row here.
    SELECT id, wait_name FROM __schema__.runs
    WHERE id = $1 AND status = $2 AND key_state IS DISTINCT FROM 'released'
    FOR UPDATE
), sig AS (
    UPDATE __schema__.signals s SET closed = false, awaited_at = clock_timestamp()
    FROM held
    WHERE s.run_id = $1 AND s.run_id = held.id AND s.name = held.wait_name
    RETURNING s.run_id, s.timeout_seconds
), upd AS (
    UPDATE __schema__.runs r SET
        status = $3, attempt = 0, lease_owner = NULL, error = NULL, finished_at = NULL,
        resolved = false,
        due_at = CASE WHEN sig.timeout_seconds = 'Infinity' THEN 'infinity'
                      ELSE clock_timestamp() + make_interval(secs => sig.timeout_seconds) END,
        updated_at = now()
    FROM sig WHERE r.id = $1 AND r.id = sig.run_id
    RETURNING r.id, r.wait_name
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, data)
    SELECT id, 'run_retried', wait_name, '{"waits": true}'::jsonb || coalesce($4::text::jsonb, '{}')
    FROM upd
), revived AS (
    UPDATE __schema__.watches w SET ended = false
    FROM upd WHERE w.run_id = $1 AND w.run_id = upd.id
)
SELECT id FROM upd;

-- name: resolve_run
-- Mark a failed run, or one stopped for an operator, resolved: an operator looked and
-- closed it. It leaves the runs needing attention; its state and history stay, and a
-- retry or a cancel makes it unresolved again. No row: no such run, not failed or
-- stopped, or resolved already.
-- $1 run id, $2 the run_resolved event's data (the operator and the note)
WITH upd AS (
    UPDATE __schema__.runs SET resolved = true, updated_at = now()
    WHERE id = $1 AND status IN ('failed', 'stopped') AND NOT resolved
    RETURNING id, saga_name
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, data)
    SELECT id, 'run_resolved', $2::text::jsonb FROM upd
)
SELECT id, saga_name FROM upd;

-- name: rollback_state
-- Where a failed run's rollback stopped (to skip the compensation that gave up).
-- $1 run id
SELECT saga_name, saga_version, fingerprint, status, graph, completed_steps, compensated_steps,
       coalesce(compensation_error->>'step', step_name) AS failed_step,
       compensation_error IS NOT NULL AS compensation_failed, error IS NOT NULL AS has_error,
       resolved, key_state IS NOT DISTINCT FROM 'released' AS key_freed
FROM __schema__.runs WHERE id = $1;

-- name: skip_compensation
-- An operator skips the compensation of step $2, which gave up (the run failed at it):
-- the rollback goes on without it, as the plan decided from the same state. A linear
-- run resumes at its next compensation $3, due now; a graph run counts $2 as undone and
-- gets the compensations $5 as items; with nothing left to undo the run ends $4 at
-- once. Fenced by the state the plan read: still failed at $2, no step undone since.
-- No row: the run is not (or no longer) failed at that compensation.
-- $1 run id, $2 the step whose compensation is skipped, $3 a linear run's next
-- compensation or NULL, $4 the status it ends in when nothing is left (else NULL),
-- $5 a graph run's compensations to start (text[]), $6 events JSON array, $7 work
-- notification channel, $8 how many steps the plan saw undone
WITH old AS (
    SELECT id, graph FROM __schema__.runs
    WHERE id = $1 AND status = 'failed' AND compensation_error IS NOT NULL
      AND coalesce(compensation_error->>'step', step_name) = $2
      AND cardinality(compensated_steps) = $8
      -- Resolving it freed its concurrency key for the next run: no more compensating.
      AND key_state IS DISTINCT FROM 'released'
    FOR UPDATE
), upd AS (
    UPDATE __schema__.runs r SET
        status = coalesce($4, 'compensating'),
        step_name = CASE WHEN $4::text IS NOT NULL THEN NULL
                         WHEN old.graph THEN r.step_name ELSE $3 END,
        attempt = 0,
        compensated_steps = CASE WHEN old.graph THEN array_append(r.compensated_steps, $2)
                                 ELSE r.compensated_steps END,
        compensation_error = NULL,
        lease_owner = NULL,
        due_at = CASE WHEN $4::text IS NOT NULL THEN NULL
                      WHEN old.graph THEN 'infinity'::timestamptz ELSE now() END,
        finished_at = CASE WHEN $4::text IS NOT NULL THEN now() END,
        resolved = false,
        updated_at = now()
    FROM old WHERE r.id = $1 AND r.id = old.id
    RETURNING r.id, r.saga_name, r.due_at IS NOT NULL AS active
), items AS (
    INSERT INTO __schema__.items (run_id, step, phase)
    SELECT upd.id, s.step, 'compensation' FROM upd, unnest($5::text[]) AS s(step)
    WHERE upd.active
    ON CONFLICT DO NOTHING
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, data)
    SELECT upd.id, e.ev->>'kind', e.ev->>'step', (e.ev->>'attempt')::integer, e.ev->'data'
    FROM upd, jsonb_array_elements($6::text::jsonb) WITH ORDINALITY AS e(ev, ord)
    ORDER BY e.ord
), revived AS (
    UPDATE __schema__.watches w SET ended = false
    FROM upd WHERE w.run_id = $1 AND w.run_id = upd.id AND upd.active
)
SELECT id, CASE WHEN active THEN pg_notify($7, saga_name)::text END AS notified FROM upd;

-- name: existing_runs
-- Which of the runs named still exist (a bulk action's pages read before a prune).
-- $1 run ids (uuid[])
SELECT id FROM __schema__.runs WHERE id = ANY($1::uuid[]);

-- name: needs_attention
-- Failed runs and runs stopped for an operator, not resolved, oldest first (created_at,
-- id), through the partial index runs_attention; $2 is the page cursor.
-- $1 page size, $2 a run id: only runs strictly newer than it, or NULL
SELECT id, saga_name, saga_version, idempotency_key, status, step_name, attempt,
       completed_steps, error::text AS error,
       compensation_error::text AS compensation_error, cancel_requested, lease_owner,
       created_at, updated_at, finished_at, wait_name, due_at, resolved, priority,
       concurrency_key, key_state
FROM __schema__.runs
WHERE status IN ('failed', 'stopped') AND NOT resolved
  AND ($2::uuid IS NULL OR (created_at, id) > (SELECT c.created_at, c.id
                                               FROM __schema__.runs c WHERE c.id = $2))
ORDER BY created_at, id
LIMIT $1;

-- name: claim_prioritized_candidates
-- The candidates of claim_prioritized, which replace claim's first CTE (see saga/_db.py):
-- due work of a priority above 0 first (highest first, through the partial index
-- runs_urgent), then the rest in due order. A sleeping or waiting run wakes in due order
-- whatever its priority (its due time is its wake-up time; it stays out of runs_urgent).
-- The parameters are claim's.
WITH urgent AS (
    SELECT r.id, r.lease_owner AS prev_owner, r.status AS before, r.wait_name, r.released
    FROM __schema__.runs r
    WHERE r.due_at <= now() AND r.priority > 0
      AND r.status NOT IN ('sleeping', 'waiting')
      AND (r.lease_owner IS NULL OR pg_try_advisory_xact_lock(hashtextextended(r.id::text, 0)))
      -- Registered definitions only, written so the planner sees that most due runs
      -- match: an IN over unnest() was estimated at 1 %, and the claim then sorted
      -- every due run instead of reading the due index in order.
      AND array_position(
            ARRAY(SELECT format('%s/%s/%s', d.n, d.v, d.f)
                  FROM unnest($4::text[], $5::integer[], $6::text[]) AS d(n, v, f)),
            format('%s/%s/%s', r.saga_name, r.saga_version, coalesce(r.fingerprint, '-'))
          ) IS NOT NULL
    ORDER BY r.priority DESC, r.due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), normal AS (
    SELECT r.id, r.lease_owner AS prev_owner, r.status AS before, r.wait_name, r.released
    FROM __schema__.runs r
    WHERE r.due_at <= now()
      AND (r.priority = 0 OR r.status IN ('sleeping', 'waiting'))
      AND (r.lease_owner IS NULL OR pg_try_advisory_xact_lock(hashtextextended(r.id::text, 0)))
      -- Registered definitions only, written so the planner sees that most due runs
      -- match: an IN over unnest() was estimated at 1 %, and the claim then sorted
      -- every due run instead of reading the due index in order.
      AND array_position(
            ARRAY(SELECT format('%s/%s/%s', d.n, d.v, d.f)
                  FROM unnest($4::text[], $5::integer[], $6::text[]) AS d(n, v, f)),
            format('%s/%s/%s', r.saga_name, r.saga_version, coalesce(r.fingerprint, '-'))
          ) IS NOT NULL
    ORDER BY r.due_at
    LIMIT $2 - (SELECT count(*) FROM urgent)
    FOR UPDATE SKIP LOCKED
), candidates AS (
    SELECT * FROM urgent UNION ALL SELECT * FROM normal
)

-- name: key_lock
-- Lock a concurrency key of a saga (its key_slots row, created on first use) and record
-- the definition's limit: every admission and release of a key takes this lock first,
-- then reads who holds the key in a later statement (key_fill), whose snapshot sees
-- what the previous lock holder committed.
-- $1 saga name, $2 key, $3 the definition's limit
INSERT INTO __schema__.key_slots AS k (saga_name, key, key_limit) VALUES ($1, $2, $3)
ON CONFLICT (saga_name, key) DO UPDATE SET key_limit = excluded.key_limit;

-- name: key_release
-- A keyed run no longer holds or waits for its key: it completed, was compensated or
-- cancelled, or an operator resolved it. Locks the key (as key_lock) and returns it;
-- no row: not keyed, or released already. The key's limit becomes the one the releasing
-- worker's definition declares (a deploy that changed it applies it to the runs queued
-- before: key_fill admits by it), as a start's admission does; an operator's release
-- by the definition its client registered (none: the key's stays).
-- $1 run id, $2 the saga's concurrency limit (NULL: keep the key's)
WITH run AS (
    UPDATE __schema__.runs SET key_state = 'released'
    WHERE id = $1 AND key_state IN ('queued', 'held')
    RETURNING saga_name, concurrency_key
)
INSERT INTO __schema__.key_slots AS k (saga_name, key, key_limit)
SELECT saga_name, concurrency_key, coalesce($2::integer, 1) FROM run
ON CONFLICT (saga_name, key) DO UPDATE SET key_limit = coalesce($2::integer, k.key_limit)
RETURNING k.saga_name, k.key;

-- name: key_fill
-- Admit the oldest runs queued for a key while fewer than its limit hold it: each is
-- due now (key_admitted in its history) and the workers are woken. In the transaction
-- that locked the key (key_lock, key_release), as a later statement.
-- $1 saga name, $2 key, $3 work notification channel
WITH free AS (
    SELECT k.key_limit - (SELECT count(*) FROM __schema__.runs h
                          WHERE h.saga_name = $1 AND h.concurrency_key = $2
                            AND h.key_state = 'held') AS slots
    FROM __schema__.key_slots k WHERE k.saga_name = $1 AND k.key = $2
), next AS (
    SELECT q.id FROM __schema__.runs q
    WHERE q.saga_name = $1 AND q.concurrency_key = $2 AND q.key_state = 'queued'
      -- A cancelled run that never ran needs no key; a reverted one (revert_run) has
      -- steps to compensate.
      AND (NOT q.cancel_requested OR cardinality(q.completed_steps) > 0)
    ORDER BY q.created_at, q.id
    LIMIT greatest(0, (SELECT slots FROM free))
    FOR UPDATE
), admitted AS (
    -- (clock_timestamp: in the start's transaction, now() is before the run's created_at)
    UPDATE __schema__.runs r SET key_state = 'held', due_at = now(), updated_at = clock_timestamp()
    FROM next WHERE r.id = next.id AND r.id = ANY (ARRAY(SELECT id FROM next))
    RETURNING r.id
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, data)
    SELECT id, 'key_admitted', jsonb_build_object('key', $2::text) FROM admitted
)
SELECT array_agg(id) AS admitted,
       CASE WHEN count(*) > 0 THEN pg_notify($3, $1)::text END AS notified
FROM admitted;

-- name: rate_take
-- Take one token of the rate limit $1 (refilled at $2 per second, up to $3): the bucket
-- may go into debt, and the delay returned is how long until this token would have
-- been there (0: at once), with the moment it was taken. Times are read after the
-- bucket's row lock is held. The bucket's row alone is locked: a delay is recorded in
-- the run's history by rate_limited, in a statement of its own (waiting for the run's
-- row, held by a caller's transaction that signalled it, holds no other run's token).
-- $1 limit name, $2 tokens per second, $3 burst
INSERT INTO __schema__.rate_limits AS b (name, tokens, updated_at, per_second, burst)
VALUES ($1, $3::float8 - 1, clock_timestamp(), $2, $3)
ON CONFLICT (name) DO UPDATE SET
    tokens = least($3::float8, b.tokens + $2::float8
                   * greatest(0, extract(epoch FROM clock_timestamp() - b.updated_at)))
             - 1,
    updated_at = clock_timestamp(), per_second = $2, burst = $3
RETURNING greatest(0, -b.tokens / $2::float8)::float8 AS delay, b.updated_at AS taken;

-- name: rate_limited
-- Record in the run's history that an attempt waits $2 seconds for a token of the limit
-- $1 taken at $3 (its row locked first, as every history writer does): at + delay is
-- when the attempt goes on. Fenced like every write of an attempt: only while the worker
-- still holds the lease it took the token under (the run's, or with $9 the graph item's
-- of that phase); a worker that lost it writes nothing.
-- $1 limit name, $2 delay, $3 when the token was taken, $4 run id, $5 step, $6 attempt,
-- $7 worker, $8 lease token, $9 the graph item's phase (NULL: a linear run), $10 true to
-- wait at most 50 ms for the run's row when another transaction holds it (then
-- LockNotAvailable: nothing is written; see saga._group.patiently)
WITH briefly AS MATERIALIZED (
    SELECT set_config('lock_timeout', '50ms', true) WHERE $10::boolean
), run AS (
    SELECT r.id FROM __schema__.runs r
    WHERE r.id = $4 AND (SELECT count(*) FROM briefly) >= 0  -- (set before the lock)
      AND CASE WHEN $9::text IS NULL THEN r.lease_token = $8 AND r.lease_owner = $7
          ELSE EXISTS (SELECT FROM __schema__.items i
                       WHERE i.run_id = r.id AND i.step = $5 AND i.phase = $9
                         AND i.lease_token = $8 AND i.lease_owner = $7) END
    FOR UPDATE OF r
)
INSERT INTO __schema__.events (run_id, at, kind, step, attempt, worker, data)
SELECT run.id, $3, 'rate_limited', $5, $6, $7,
       jsonb_build_object('limit', $1::text, 'delay', $2::float8)
FROM run;

-- name: schedule_register
-- Register a schedule, or update it from the code: a new one is next due at $7; an
-- unchanged one keeps its next slot (slots missed while nothing ran are still ahead of
-- it), and its paused state; one whose spec changed (a deploy: respelled, or another
-- time) keeps its next slot too if that is sooner (the new spec's slots since then are
-- handled as on time or missed, not lost), else is next due at $7.
-- $1 name, $2 saga name, $3 saga version, $4 spec, $5 missed policy, $6 catch-up cap,
-- $7 its next slot after now
INSERT INTO __schema__.schedules AS s
    (name, saga_name, saga_version, spec, missed, catch_up, next_fire)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO UPDATE SET
    saga_name = excluded.saga_name,
    saga_version = excluded.saga_version,
    missed = excluded.missed,
    catch_up = excluded.catch_up,
    next_fire = CASE WHEN s.spec = excluded.spec THEN s.next_fire
                     ELSE least(s.next_fire, excluded.next_fire) END,
    spec = excluded.spec,
    updated_at = now();

-- name: schedule_idle
-- The schedule transaction ends if its session sits idle in it for $1 (a stalled
-- process: its locks go, another orchestrator takes the turn).
-- $1 the timeout ('5s')
SELECT set_config('idle_in_transaction_session_timeout', $1, true);

-- name: schedules_due
-- The schedules among $1 that are due and not paused, locked: each is handled by one
-- orchestrator at a time (SKIP LOCKED), which reads the slots due from next_fire up to
-- the database's now, by the definition registered last (spec, missed, catch_up).
-- $1 schedule names
SELECT name, next_fire, now() AS now, spec, missed, catch_up
FROM __schema__.schedules
WHERE name = ANY($1::text[]) AND NOT paused AND next_fire <= now()
ORDER BY next_fire
FOR UPDATE SKIP LOCKED;

-- name: schedule_fired
-- A due schedule handled (in the transaction that started its slots' runs).
-- $1 name, $2 its next slot, $3 the last slot that started a run or NULL, $4 that run
-- or NULL, $5 late slots its missed policy skipped
UPDATE __schema__.schedules SET
    next_fire = $2,
    last_fire = coalesce($3, last_fire),
    last_run = coalesce($4, last_run),
    skipped = skipped + $5,
    updated_at = now()
WHERE name = $1;

-- name: schedules_next
-- Seconds until the first of the schedules $1 not paused is due (negative: overdue;
-- NULL: none), and those of $1 that have a row (one an operator removed has none).
-- $1 schedule names
SELECT extract(epoch FROM min(next_fire) FILTER (WHERE NOT paused) - now())::float8 AS wait,
       coalesce(array_agg(name), '{}') AS found
FROM __schema__.schedules WHERE name = ANY($1::text[]);

-- name: remove_schedule
-- Forget a schedule: its row goes (the runs it started stay). No row: no such schedule.
-- $1 name
DELETE FROM __schema__.schedules WHERE name = $1 RETURNING name;

-- name: list_schedules
-- Every schedule, by name, with how late it is (seconds since its next slot passed
-- unhandled; 0 when on time or paused).
-- no parameters
SELECT name, saga_name, saga_version, spec, missed, catch_up, paused, next_fire,
       last_fire, last_run, skipped,
       CASE WHEN paused THEN 0
            ELSE greatest(0, extract(epoch FROM now() - next_fire))::float8 END AS late
FROM __schema__.schedules ORDER BY name;

-- name: schedule_spec
-- A schedule's definition as registered last, and the database's now (to find its next
-- slot from).
-- $1 name
SELECT spec, now() AS now FROM __schema__.schedules WHERE name = $1;

-- name: pause_schedule
-- Pause ($2 true) or resume ($2 false) a schedule. Resuming keeps its next slot when
-- that is still ahead (none passed while it was paused); else it is next due at $3, its
-- first slot after now (now itself if its spec was not understood): its slots from now
-- on fire, those that passed while it was paused (or were late when it was paused) do not.
-- $1 name, $2 paused, $3 the first slot after now, or NULL
UPDATE __schema__.schedules SET
    paused = $2,
    next_fire = CASE WHEN $2 OR NOT paused OR next_fire > now() THEN next_fire
                     ELSE coalesce($3::timestamptz, now()) END,
    updated_at = now()
WHERE name = $1
RETURNING paused;

-- name: advance_timers
-- saga.testing only: move a run's timer (a sleep's end, a wait's timeout, a retry's
-- backoff; for a graph run, its items' backoffs) earlier by $2 seconds, as if that much
-- time had passed; a leased item is left alone. Wakes the workers. Returns the new due
-- time, the earliest of a graph run's items (no row: nothing to move).
-- $1 run id, $2 seconds, $3 work notification channel
WITH upd AS (
    UPDATE __schema__.runs SET due_at = due_at - make_interval(secs => $2)
    WHERE id = $1 AND due_at IS NOT NULL AND lease_owner IS NULL AND due_at <> 'infinity'
    RETURNING id, saga_name, due_at
), items AS (
    UPDATE __schema__.items i SET due_at = i.due_at - make_interval(secs => $2)
    FROM __schema__.runs r
    WHERE i.run_id = $1 AND r.id = $1 AND r.due_at IS NOT NULL AND i.lease_owner IS NULL
      AND i.due_at <> 'infinity'
    RETURNING r.saga_name, i.due_at
), moved AS (
    SELECT saga_name, due_at FROM upd
    UNION ALL
    (SELECT saga_name, due_at FROM items ORDER BY due_at LIMIT 1)
)
SELECT due_at, pg_notify($3, saga_name)::text AS notified FROM moved LIMIT 1;

-- name: expire_lease
-- saga.testing only: make a held lease look expired, as if its worker had stalled past
-- it, so that the claim path of any orchestrator takes the run over.
-- $1 run id
UPDATE __schema__.runs SET due_at = now() - interval '1 millisecond'
WHERE id = $1 AND lease_owner IS NOT NULL
RETURNING lease_token;

-- name: lease_token_of
-- saga.testing only: the fencing token of a run's lease ($2 NULL), or of its graph item
-- $2's (the step, not its compensation); it changes when another claim takes it over.
-- $1 run id, $2 step or NULL
SELECT CASE WHEN $2::text IS NULL
            THEN (SELECT lease_token FROM __schema__.runs WHERE id = $1)
            ELSE (SELECT lease_token FROM __schema__.items
                  WHERE run_id = $1 AND step = $2 AND phase = 'step') END;

-- name: count_unclaimable
-- Active runs of definitions (name, version, fingerprint) this orchestrator has not
-- registered: they wait, untouched, for one that has. Reads only the partial index of
-- active runs.
-- $1 saga names, $2 saga versions, $3 fingerprints (the three pairwise; '-' stands for
-- runs without a fingerprint)
SELECT saga_name, saga_version, coalesce(fingerprint, '-') AS fingerprint, count(*) AS runs
FROM __schema__.runs
WHERE due_at IS NOT NULL
  AND (saga_name, saga_version, coalesce(fingerprint, '-'))
      NOT IN (SELECT * FROM unnest($1::text[], $2::integer[], $3::text[]))
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3;

-- name: attempt_began
-- Whether step $2's latest attempt began (its step_started is the last of its forward
-- events) and recorded no outcome: the attempt a claim took over, after an expired lease
-- or a release, had begun running the step and may have had effects. A run rolling back
-- then runs the step again rather than dropping it (see saga/_runner.py).
-- $1 run id, $2 step name
SELECT coalesce((
    SELECT kind = 'step_started' FROM __schema__.events
    WHERE run_id = $1 AND step = $2
      AND kind IN ('step_started', 'step_completed', 'step_failed', 'step_ready',
                   'sleep_started', 'wait_started', 'children_waiting')
    ORDER BY id DESC
    LIMIT 1
), false);

-- name: has_event
-- Whether this worker's write with this first event committed: an attempt writes its
-- outcome once, so (kind, step, attempt, worker) identifies it in the run's history.
-- $1 run id, $2 kind, $3 step or NULL, $4 attempt or NULL, $5 worker id
SELECT EXISTS (
    SELECT 1 FROM __schema__.events
    WHERE run_id = $1 AND kind = $2 AND step IS NOT DISTINCT FROM $3
      AND attempt IS NOT DISTINCT FROM $4 AND worker = $5
);

-- name: write_events
-- The events one write appended, in order: those of the statement (its transaction,
-- xmin, and its command in it, cmin) that appended this worker's latest event (kind,
-- step, attempt) of the run. For a write whose reply was lost but which committed (see
-- has_event): what it recorded. The items of one run written together share their
-- transaction, each its own statement (see graph_write); events are never updated.
-- $1 run id, $2 kind, $3 step or NULL, $4 attempt or NULL, $5 worker id
WITH first AS (
    SELECT xmin, cmin FROM __schema__.events
    WHERE run_id = $1 AND kind = $2 AND step IS NOT DISTINCT FROM $3
      AND attempt IS NOT DISTINCT FROM $4 AND worker = $5
    ORDER BY id DESC LIMIT 1
)
SELECT e.id, e.at, e.kind, e.step, e.attempt, e.worker, e.data::text AS data
FROM __schema__.events e, first
WHERE e.run_id = $1 AND e.xmin = first.xmin AND e.cmin = first.cmin
ORDER BY e.id;

-- name: dropped_write_events
-- write_events for a dropped item's write (it appends no event of its own): the events
-- of the statement that appended this worker's latest end of the run, when none of them
-- is an attempt's (an item's write begins with its attempt's outcome). No row: it did
-- not end the run (or its end is not known here).
-- $1 run id, $2 worker id
WITH last_end AS (
    SELECT xmin, cmin FROM __schema__.events
    WHERE run_id = $1 AND worker = $2
      AND kind IN ('run_completed', 'run_compensated', 'run_cancelled', 'run_failed',
                   'run_stopped')
    ORDER BY id DESC LIMIT 1
), written AS (
    SELECT e.id, e.at, e.kind, e.step, e.attempt, e.worker, e.data::text AS data
    FROM __schema__.events e, last_end
    WHERE e.run_id = $1 AND e.xmin = last_end.xmin AND e.cmin = last_end.cmin
)
SELECT * FROM written
WHERE NOT EXISTS (SELECT FROM written WHERE attempt IS NOT NULL)
ORDER BY id;

-- name: census
-- What operators watch, at a cost bounded by the active runs (partial index) and the
-- failed and stopped ones: runs per state, the oldest active run's age, the scheduler
-- lag (now minus the due time of the oldest runnable item of a registered saga; 0 when
-- none) and the timer lag (now minus the oldest overdue sleep end or wait timeout, of
-- any saga: the figure that shows a stalled scheduler, whoever should run it).
-- $1 saga names, $2 saga versions, $3 fingerprints (the three pairwise; '-' stands for
-- runs without a fingerprint): the definitions this orchestrator runs
WITH active AS (
    SELECT status, count(*) AS runs,
           extract(epoch FROM now() - min(created_at))::float8 AS oldest_age
    FROM __schema__.runs WHERE due_at IS NOT NULL GROUP BY status
), lag AS (
    -- The runs' own rows, and the items of runs whose steps run in parallel (their row
    -- is never due). A leased one is due once its lease expired: runnable again.
    SELECT coalesce(extract(epoch FROM now() - min(due))::float8, 0) AS lag
    FROM (
        SELECT due_at AS due, saga_name, saga_version, fingerprint
        FROM __schema__.runs WHERE due_at <= now()
        UNION ALL
        SELECT i.due_at, r.saga_name, r.saga_version, r.fingerprint
        FROM __schema__.items i JOIN __schema__.runs r ON r.id = i.run_id
        WHERE i.due_at <= now()
    ) due
    WHERE (saga_name, saga_version, coalesce(fingerprint, '-'))
          IN (SELECT * FROM unnest($1::text[], $2::integer[], $3::text[]))
), timers AS (
    SELECT coalesce(extract(epoch FROM now() - min(due_at))::float8, 0) AS lag
    FROM __schema__.runs
    WHERE due_at <= now() AND status IN ('sleeping', 'waiting')
)
SELECT status, runs, oldest_age, (SELECT lag FROM lag) AS lag,
       (SELECT lag FROM timers) AS timer_lag
FROM active
UNION ALL
-- One literal status per count, so that each reads its partial index (runs_failed,
-- runs_stopped), not the table; those an operator resolved wait for no one.
SELECT 'failed', count(*), NULL, (SELECT lag FROM lag), (SELECT lag FROM timers)
FROM __schema__.runs WHERE status = 'failed' AND NOT resolved
UNION ALL
SELECT 'stopped', count(*), NULL, (SELECT lag FROM lag), (SELECT lag FROM timers)
FROM __schema__.runs WHERE status = 'stopped' AND NOT resolved;

-- name: census_parked
-- Sleeping and waiting runs per saga (an index-backed read of the active runs only).
-- no parameters
SELECT saga_name, status, count(*) AS runs
FROM __schema__.runs
WHERE due_at IS NOT NULL AND status IN ('sleeping', 'waiting')
GROUP BY saga_name, status;

-- name: census_queues
-- Runs due and not taken, per saga and priority: how many, and how long the oldest has
-- waited (seconds); a run whose steps run in parallel counts when one of its items is
-- due (its row never is); and per saga, the runs queued behind their concurrency key
-- (and over how many keys). Through runs_due, items_due and runs_key_queue: the active
-- runs only.
-- no parameters
SELECT saga_name, priority, count(DISTINCT id) AS runs,
       extract(epoch FROM now() - min(due))::float8 AS oldest, false AS keyed,
       0::bigint AS keys
FROM (
    SELECT id, saga_name, priority, due_at AS due
    FROM __schema__.runs WHERE due_at <= now()
    UNION ALL  -- one saga may have both kinds of runs: versions deployed side by side
    SELECT r.id, r.saga_name, r.priority, i.due_at
    FROM __schema__.items i JOIN __schema__.runs r ON r.id = i.run_id
    WHERE i.due_at <= now()
) due
GROUP BY saga_name, priority
UNION ALL
SELECT saga_name, 0, count(*), 0::float8, true, count(DISTINCT concurrency_key)
FROM __schema__.runs WHERE key_state = 'queued'
GROUP BY saga_name
ORDER BY 1, 2;

-- name: rate_limits
-- Every rate limit's bucket now: tokens available (negative: reserved ahead; the next
-- taker waits until a whole token is there, (1 - tokens) / per_second), as its last
-- taker declared it.
-- no parameters
SELECT name, per_second, burst,
       least(burst::float8, tokens + per_second
             * greatest(0, extract(epoch FROM clock_timestamp() - updated_at)))::float8
           AS tokens
FROM __schema__.rate_limits ORDER BY name;

-- name: census_schedules
-- How late each schedule not paused is: seconds since its next slot passed unhandled.
-- no parameters
SELECT name, greatest(0, extract(epoch FROM now() - next_fire))::float8 AS late
FROM __schema__.schedules WHERE NOT paused;

-- name: list_runs
-- Runs matching the filters, newest first (created_at, id), at most $6 of them. Active
-- runs (partial index runs_due) and finished ones (runs_finished_created) are read apart
-- and merged, so the cost is bounded by the active runs plus the page, whatever the
-- number of finished runs.
-- $1 saga name or NULL, $2 statuses (text[]) or NULL for all, $3 created at least this
-- many seconds ago or NULL, $4 created at most this many seconds ago or NULL, $5 the page
-- cursor, a position ($5 id, $8 created_at): only runs strictly older (by created_at, id),
-- or NULL (a position, not a row: the run there may have been pruned since),
-- $6 page size, $7 idempotency key or NULL (exact match; with $1 an index probe), $9
-- created at or before this time or NULL, $10 created at or after this time or NULL. The
-- cursor's bound is also given on created_at alone, so that an index on (saga_name,
-- created_at) can start there (a row comparison only bounds an index's leading columns).
SELECT * FROM (
    (SELECT id, saga_name, saga_version, idempotency_key, status, step_name, attempt,
            completed_steps, error::text AS error,
            compensation_error::text AS compensation_error, cancel_requested, lease_owner,
            created_at, updated_at, finished_at, wait_name,
            CASE WHEN r.graph  -- due when its first item is (see get_run)
                 THEN coalesce((SELECT min(i.due_at) FROM __schema__.items i
                                WHERE i.run_id = r.id), r.due_at)
                 ELSE r.due_at END AS due_at,
            resolved, priority, concurrency_key, key_state
     FROM __schema__.runs r
     WHERE due_at IS NOT NULL
       AND ($1::text IS NULL OR saga_name = $1)
       AND ($2::text[] IS NULL OR status = ANY($2::text[]))
       AND ($3::float8 IS NULL OR created_at <= now() - make_interval(secs => $3::float8))
       AND ($4::float8 IS NULL OR created_at >= now() - make_interval(secs => $4::float8))
       AND ($9::timestamptz IS NULL OR created_at <= $9::timestamptz)
       AND ($10::timestamptz IS NULL OR created_at >= $10::timestamptz)
       AND ($5::uuid IS NULL OR (created_at <= $8::timestamptz
                                 AND (created_at, id) < ($8::timestamptz, $5::uuid)))
       AND ($7::text IS NULL OR idempotency_key = $7)
     ORDER BY created_at DESC, id DESC
     LIMIT $6)
    UNION ALL
    (SELECT id, saga_name, saga_version, idempotency_key, status, step_name, attempt,
            completed_steps, error::text AS error,
            compensation_error::text AS compensation_error, cancel_requested, lease_owner,
            created_at, updated_at, finished_at, wait_name, due_at, resolved, priority,
            concurrency_key, key_state
     FROM __schema__.runs
     WHERE due_at IS NULL
       AND ($1::text IS NULL OR saga_name = $1)
       AND ($2::text[] IS NULL OR status = ANY($2::text[]))
       AND ($3::float8 IS NULL OR created_at <= now() - make_interval(secs => $3::float8))
       AND ($4::float8 IS NULL OR created_at >= now() - make_interval(secs => $4::float8))
       AND ($9::timestamptz IS NULL OR created_at <= $9::timestamptz)
       AND ($10::timestamptz IS NULL OR created_at >= $10::timestamptz)
       AND ($5::uuid IS NULL OR (created_at <= $8::timestamptz
                                 AND (created_at, id) < ($8::timestamptz, $5::uuid)))
       AND ($7::text IS NULL OR idempotency_key = $7)
     ORDER BY created_at DESC, id DESC
     LIMIT $6)
) AS page
ORDER BY created_at DESC, id DESC
LIMIT $6;

-- name: prune_cutoff
-- The instant a prune deletes runs finished before: $1 seconds before now.
SELECT now() - make_interval(secs => $1::float8);

-- name: fragment_prunable
-- Not a statement: a condition that replaces the word "prunable" between double
-- underscores in the other queries (when the file is read). Whether the runs row "r"
-- goes in a prune's row-by-row pass now: it finished before the cutoff in one of the
-- statuses, and it has no parent, or its parent is gone (a parent that stays reads and
-- undoes its children; a child goes in a batch after its parent's, never before, so no
-- lock skipped, batch limit or interruption leaves a parent without its children). NULL
-- (not false) for a run not finished: to keep those, negate it as NOT coalesce(it, false).
-- $1 the prune's cutoff (one instant for the whole prune), $2 statuses (text[], terminal)
(r.due_at IS NULL
 AND r.finished_at < $1::timestamptz
 AND r.status = ANY($2::text[])
 AND (r.parent_id IS NULL
      OR NOT EXISTS (SELECT 1 FROM __schema__.runs p WHERE p.id = r.parent_id)))

-- name: fragment_prunable_in_day
-- Not a statement: as prunable (above), for the runs of one day's partition __runs__
-- that a whole-days prune drops or compacts in one transaction: a child goes if its
-- parent is gone, or goes with it (in the same day, and going), however many
-- generations down. The day's parents that go are found once per statement, from the
-- top down (children's partial index, one probe a generation): those whose own parent is
-- gone (or who have none), then their children that go, and so on. A parent in an
-- earlier day is there only because that day kept it: its children stay. A dry run,
-- which removes nothing, gives the parents the earlier days it counted remove as gone
-- ($3).
-- $1 the prune's cutoff, $2 statuses (text[], terminal), $3 runs gone (uuid[]: a dry run)
(r.due_at IS NULL
 AND r.finished_at < $1::timestamptz
 AND r.status = ANY($2::text[])
 AND (r.parent_id IS NULL
      OR (r.parent_id = ANY($3::uuid[]) OR NOT EXISTS (SELECT 1 FROM __schema__.runs x WHERE x.id = r.parent_id))
      OR r.parent_id IN (
          WITH RECURSIVE going (id) AS (
              SELECT p.id FROM __runs__ p
              WHERE p.id IN (SELECT c.parent_id FROM __runs__ c WHERE c.parent_id IS NOT NULL)
                AND p.due_at IS NULL AND coalesce(p.finished_at < $1::timestamptz, false) AND p.status = ANY($2::text[])
                AND (p.parent_id IS NULL OR p.parent_id = ANY($3::uuid[])
                     OR NOT EXISTS (SELECT 1 FROM __schema__.runs x WHERE x.id = p.parent_id))
              UNION ALL
              SELECT c.id FROM going g, LATERAL (
                  -- A fence (OFFSET 0): each generation is read through the children's
                  -- index, never by scanning the day's finished runs once per generation.
                  SELECT k.id, k.due_at, k.finished_at, k.status FROM __runs__ k
                  WHERE k.parent_id = g.id OFFSET 0) c
              WHERE c.due_at IS NULL AND coalesce(c.finished_at < $1::timestamptz, false) AND c.status = ANY($2::text[])
          )
          SELECT id FROM going)))

-- name: prune_runs
-- Delete one batch of finished runs that ended more than $1 seconds ago, oldest first
-- (a child only once its parent is gone: see fragment_prunable; never a run that still
-- holds its concurrency key: prune_key_holder frees it first), and their events, watches and signals
-- (there is no foreign key to cascade). Rows another statement holds are skipped, never
-- waited for; the batch is one short transaction. Returns the counts.
-- $1 the cutoff (finished before it: one instant for the whole prune, so that a run
-- held key crossing it meanwhile is not deleted unreleased), $2 statuses (text[],
-- terminal ones), $3 batch size
WITH doomed AS (
    SELECT r.id FROM __schema__.runs r
    WHERE __prunable__
      AND r.key_state IS DISTINCT FROM 'held'  -- prune_key_holder frees the key first
    ORDER BY r.finished_at
    LIMIT $3
    FOR UPDATE OF r SKIP LOCKED
), gone_events AS (
    DELETE FROM __schema__.events e USING doomed d WHERE e.run_id = d.id RETURNING 1
), gone_watches AS (
    DELETE FROM __schema__.watches w USING doomed d WHERE w.run_id = d.id
), gone_signals AS (
    -- The run rows are locked (above) before the signal rows, the order a sender takes.
    DELETE FROM __schema__.signals s USING doomed d WHERE s.run_id = d.id
), gone_runs AS (
    DELETE FROM __schema__.runs r USING doomed d WHERE r.id = d.id RETURNING 1
)
SELECT (SELECT count(*) FROM gone_runs) AS runs, (SELECT count(*) FROM gone_events) AS events;

-- name: prunable_key_holders
-- The runs prune_runs would delete that still hold their concurrency key (failed or
-- stopped, never resolved): prune frees each one's key and deletes it in one transaction
-- (prune_key_holder, prune_one). Reads the partial index of held keys.
-- $1 the prune's cutoff (see prune_runs), $2 statuses (text[], terminal ones)
SELECT r.id FROM __schema__.runs r
WHERE r.key_state = 'held' AND __prunable__
ORDER BY r.id;

-- name: prune_key_holder
-- One run prune deletes that still holds its concurrency key (failed or stopped, never
-- resolved), in a transaction that deletes it too (prune_one): locked, and skipped if
-- another transaction holds it (prune waits for no one; its key stays held with it);
-- still prunable. It lets go of its key, as resolve() would (key_fill, in the same
-- transaction, then admits the oldest run queued for it), and returns the key, locked
-- as key_lock does. No row: skipped, or retried, resolved or pruned meanwhile.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 run id
WITH doomed AS (
    SELECT r.id FROM __schema__.runs r
    WHERE r.id = $3 AND r.key_state = 'held' AND __prunable__
    FOR UPDATE OF r SKIP LOCKED
), run AS (
    UPDATE __schema__.runs r SET key_state = 'released'
    FROM doomed WHERE r.id = doomed.id
    RETURNING r.saga_name, r.concurrency_key
)
INSERT INTO __schema__.key_slots AS k (saga_name, key, key_limit)
SELECT saga_name, concurrency_key, 1 FROM run
ON CONFLICT (saga_name, key) DO UPDATE SET key_limit = k.key_limit
RETURNING k.saga_name, k.key;

-- name: prune_one
-- Delete one run prune_key_holder locked in this transaction, with its events, watches
-- and signals; returns the counts.
-- $1 run id
WITH gone_events AS (
    DELETE FROM __schema__.events WHERE run_id = $1 RETURNING 1
), gone_watches AS (
    DELETE FROM __schema__.watches WHERE run_id = $1
), gone_signals AS (
    DELETE FROM __schema__.signals WHERE run_id = $1
), gone_runs AS (
    DELETE FROM __schema__.runs WHERE id = $1 RETURNING 1
)
SELECT (SELECT count(*) FROM gone_runs) AS runs, (SELECT count(*) FROM gone_events) AS events;

-- name: prune_key_release
-- A run prune is about to delete lets go of its concurrency key, as resolve() would
-- (then key_fill, in the same transaction, admits the oldest run queued for it). Locks
-- the key (as key_lock) and returns it; no row: the run was retried, resolved or pruned
-- meanwhile (the row's lock makes the update see that).
-- $1 run id, $2 statuses (text[], terminal ones)
WITH run AS (
    UPDATE __schema__.runs SET key_state = 'released'
    WHERE id = $1 AND key_state = 'held' AND due_at IS NULL AND status = ANY($2::text[])
    RETURNING saga_name, concurrency_key
)
INSERT INTO __schema__.key_slots AS k (saga_name, key, key_limit)
SELECT saga_name, concurrency_key, 1 FROM run
ON CONFLICT (saga_name, key) DO UPDATE SET key_limit = k.key_limit
RETURNING k.saga_name, k.key;

-- name: count_prunable
-- What prune_runs' batches (and the key holders' pass) would delete with the same
-- arguments, once every batch ran (a dry run): runs and events. The runs whose parent is
-- gone (see fragment_prunable), then their children that go too, generation by
-- generation, as the batches take them.
-- $1 the prune's cutoff (see prune_runs), $2 statuses (text[], terminal ones)
WITH RECURSIVE doomed AS (
    SELECT r.id FROM __schema__.runs r
    WHERE __prunable__
    UNION ALL
    SELECT c.id FROM doomed d JOIN __schema__.runs c ON c.parent_id = d.id
    WHERE c.due_at IS NULL AND c.finished_at < $1::timestamptz AND c.status = ANY($2::text[])
)
SELECT (SELECT count(*) FROM doomed) AS runs,
       (SELECT count(*) FROM __schema__.events e JOIN doomed d ON e.run_id = d.id) AS events;

-- name: unused_keys_lock
-- The next batch of concurrency keys (key_slots rows) that no run holds or waits for,
-- after ($1, $2) in key order, locked; a key another transaction holds is in use, and
-- skipped. prune_unused_keys then deletes them, in the same transaction.
-- $1 saga name, $2 key (the last of the batch before; '' and '' first), $3 batch size
SELECT k.saga_name, k.key FROM __schema__.key_slots k
WHERE (k.saga_name, k.key) > ($1::text, $2::text)
  AND NOT EXISTS (SELECT 1 FROM __schema__.runs r WHERE r.saga_name = k.saga_name
                  AND r.concurrency_key = k.key AND r.key_state = 'held')
  AND NOT EXISTS (SELECT 1 FROM __schema__.runs r WHERE r.saga_name = k.saga_name
                  AND r.concurrency_key = k.key AND r.key_state = 'queued')
ORDER BY k.saga_name, k.key
LIMIT $3
FOR UPDATE OF k SKIP LOCKED;

-- name: prune_unused_keys
-- Delete the keys unused_keys_lock locked that are still unused. A later statement than
-- the lock, so it sees every run that took the key before (each admission and release
-- locks the key first; one that comes after the delete creates the row again, with its
-- definition's limit). Returns how many went.
-- $1 saga names, $2 keys (text[], the locked rows')
WITH gone AS (
    DELETE FROM __schema__.key_slots k
    USING unnest($1::text[], $2::text[]) AS l(saga_name, key)
    WHERE k.saga_name = l.saga_name AND k.key = l.key
      AND NOT EXISTS (SELECT 1 FROM __schema__.runs r WHERE r.saga_name = k.saga_name
                      AND r.concurrency_key = k.key AND r.key_state = 'held')
      AND NOT EXISTS (SELECT 1 FROM __schema__.runs r WHERE r.saga_name = k.saga_name
                      AND r.concurrency_key = k.key AND r.key_state = 'queued')
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: count_unused_keys
-- How many concurrency keys (key_slots rows) no run holds or waits for now: what a
-- prune would delete of them, unless a run takes one meanwhile.
SELECT count(*) FROM __schema__.key_slots k
WHERE NOT EXISTS (SELECT 1 FROM __schema__.runs r WHERE r.saga_name = k.saga_name
                  AND r.concurrency_key = k.key AND r.key_state = 'held')
  AND NOT EXISTS (SELECT 1 FROM __schema__.runs r WHERE r.saga_name = k.saga_name
                  AND r.concurrency_key = k.key AND r.key_state = 'queued');

-- name: find_runs_by_key
-- The runs started with this idempotency key: at most one per saga (runs_idempotency_key
-- is unique on (saga_name, idempotency_key)). Index-backed however many runs there are:
-- without $2, a recursive "loose index scan" walks that index from one distinct saga
-- name to the next (one descent each), then each (saga, key) is one unique-index probe.
-- $1 idempotency key, $2 saga name or NULL for every saga
WITH RECURSIVE sagas(name) AS (
    SELECT min(saga_name) FROM __schema__.runs
    WHERE idempotency_key IS NOT NULL AND $2::text IS NULL
    UNION ALL
    SELECT (SELECT min(r.saga_name) FROM __schema__.runs r
            WHERE r.idempotency_key IS NOT NULL AND r.saga_name > s.name)
    FROM sagas s WHERE s.name IS NOT NULL
)
SELECT r.id, r.saga_name
FROM (SELECT name FROM sagas UNION ALL SELECT $2::text) AS s(name),
     -- LIMIT keeps the probe a nested loop: a flattened join could hash the whole table.
     LATERAL (SELECT id, saga_name FROM __schema__.runs
              WHERE saga_name = s.name AND idempotency_key = $1 LIMIT 1) AS r
ORDER BY r.saga_name;

-- name: count_runs
-- Runs per saga and status, optionally of one saga and by age. Reads every matching run,
-- finished ones included (a scan of the table): for an operator's question, not for a
-- dashboard refreshing every second (the census is the cheap, active-only count).
-- $1 saga name or NULL, $2 created at least this many seconds ago or NULL, $3 created at
-- most this many seconds ago or NULL, $4 created at or before this time or NULL, $5
-- created at or after this time or NULL
SELECT saga_name, status, count(*) AS runs
FROM __schema__.runs
WHERE ($1::text IS NULL OR saga_name = $1)
  AND ($2::float8 IS NULL OR created_at <= now() - make_interval(secs => $2::float8))
  AND ($3::float8 IS NULL OR created_at >= now() - make_interval(secs => $3::float8))
  AND ($4::timestamptz IS NULL OR created_at <= $4::timestamptz)
  AND ($5::timestamptz IS NULL OR created_at >= $5::timestamptz)
GROUP BY saga_name, status
ORDER BY saga_name, status;

-- name: send_signal
-- Record the signal $2 for run $1 in one statement: the first of a name wins; a run
-- waiting at that wait (or stopped at it) is due now and the workers are woken at
-- commit; a run that has ended, is stopped and resolved with its concurrency key freed
-- (another run may hold the key now: it can no longer go on, as for retry()), is rolling
-- back (cancelled, or a step failed for good: it will never reach a wait), or whose wait
-- was decided (timed out) refuses it, and the refusal goes into its history with its
-- reason. The run row is locked first, then the
-- signal row written with INSERT ... ON CONFLICT, the order every writer of signals
-- takes: a signal racing the run's wait is never lost. No row: no such run.
-- $1 run id, $2 signal name, $3 payload JSON text, $4 the saga name and $5 version the
-- payload was validated for, $6 work notification channel (NULL: no NOTIFY, the sender
-- sends one once this committed), $7 a new id for the signal,
-- $8 what the history records of the sender (the operator and the note) or NULL, $9 the
-- fingerprint of the definition the payload was validated for (a run started with
-- another definition of the same name and version refuses it, as another saga's would).
-- Signals sent at about the same time go in one transaction (saga/_store_signals.py).
WITH run AS (
    -- FOR UPDATE returns the newest version of the row (whatever this statement's
    -- snapshot): every decision below reads it from here, never from a scan of runs.
    SELECT id, saga_name, saga_version, fingerprint, status, wait_name,
           status = 'compensating' OR cancel_requested AS rolling_back,
           status = 'stopped' AND key_state IS NOT DISTINCT FROM 'released' AS freed,
           status = 'stopped' AND wait_name = $2 AS stopped_here,
           status IN ('waiting', 'stopped') AND wait_name = $2 AND lease_owner IS NULL
               AS at_this_wait
    FROM __schema__.runs WHERE id = $1
    FOR UPDATE
), target AS (
    SELECT *, (saga_name, saga_version) = ($4::text, $5::integer)
              AND coalesce(fingerprint = $9::text, true) AS same_saga,
           -- A stopped run is not over: an operator resumes it (a signal for a later
           -- wait is kept for it like any early signal).
           status IN ('completed', 'compensated', 'failed', 'cancelled') AS ended
    FROM run
), rec AS (
    -- Always a row back (DO UPDATE), so that why a signal was not taken is known: the
    -- row carries this signal's id only when this statement recorded it.
    INSERT INTO __schema__.signals AS s (run_id, name, payload, signal_id, received_at)
    SELECT id, $2, $3, $7, now() FROM target
    WHERE same_saga AND NOT ended AND NOT freed AND NOT rolling_back
    ON CONFLICT (run_id, name) DO UPDATE SET
        (payload, signal_id, received_at, closed) = (
            SELECT CASE WHEN take THEN excluded.payload ELSE s.payload END,
                   CASE WHEN take THEN excluded.signal_id ELSE s.signal_id END,
                   CASE WHEN take THEN now() ELSE s.received_at END,
                   CASE WHEN take THEN false ELSE s.closed END
            FROM (SELECT s.payload IS NULL
                         AND (NOT s.closed OR (SELECT stopped_here FROM target)) AS take) AS d
        )
    RETURNING s.signal_id = $7 AS accepted, s.payload IS NOT NULL AS repeated
), outcome AS (
    SELECT t.id, t.saga_name, t.same_saga, t.ended, t.freed, t.rolling_back, t.at_this_wait,
           coalesce(r.accepted, false) AS accepted,
           coalesce(r.repeated AND NOT r.accepted, false) AS repeated
    FROM target t LEFT JOIN rec r ON true
), woken AS (
    -- The run is at this wait (or stopped at it): due now; a stopped run waits again.
    -- Only the id is matched against the scanned row (an older version than the locked
    -- one when the run entered its wait meanwhile: the update then applies to the newest);
    -- given as $1 too, so that Postgres reads the run's day alone.
    UPDATE __schema__.runs r SET
        status = 'waiting', due_at = now(), finished_at = NULL,
        error = CASE WHEN r.status = 'stopped' THEN NULL ELSE r.error END,
        attempt = CASE WHEN r.status = 'stopped' THEN 0 ELSE r.attempt END,
        resolved = false,
        updated_at = now()
    FROM outcome o
    WHERE r.id = $1 AND r.id = o.id AND o.accepted AND o.at_this_wait
    RETURNING r.id, r.saga_name
), revived AS (
    -- A stopped run is active again: its end mark goes, so waiters wait for its end.
    UPDATE __schema__.watches w SET ended = false
    FROM woken WHERE w.run_id = $1 AND w.run_id = woken.id
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, data)
    SELECT id,
           CASE WHEN accepted THEN 'signal_received' ELSE 'signal_refused' END,
           $2,
           coalesce($8::text::jsonb, '{}') ||
           CASE WHEN accepted THEN jsonb_build_object('signal', $2::text)
                ELSE jsonb_build_object('signal', $2::text, 'reason',
                                        CASE WHEN ended THEN 'ended'
                                             WHEN freed THEN 'resolved'
                                             WHEN rolling_back THEN 'rolling_back'
                                             ELSE 'wait_decided' END)
           END
    FROM outcome WHERE same_saga AND NOT repeated
)
SELECT o.saga_name, o.same_saga, o.ended, o.freed, o.rolling_back, o.accepted, o.repeated,
       (SELECT pg_notify($6, saga_name)::text FROM woken WHERE $6 IS NOT NULL) AS notified,
       $7::uuid AS signal_id
FROM outcome o;

-- name: find_run_for_signal
-- The run a signal by idempotency key goes to: its id, definition version and
-- fingerprint.
-- $1 saga name, $2 idempotency key
SELECT id, saga_version, fingerprint FROM __schema__.runs
WHERE saga_name = $1 AND idempotency_key = $2;

-- name: run_definition
-- Which definition a run belongs to (to validate a signal's payload against it), its
-- fingerprint NULL for runs started before fingerprints were recorded.
-- $1 run id
SELECT saga_name, saga_version, fingerprint FROM __schema__.runs WHERE id = $1;

-- name: claim_items
-- Lease up to $2 due items of graph runs (due, or whose lease expired) of registered
-- sagas in one statement: each gets a new fencing token and attempt, and the history
-- records the start (and any expired lease). A forward item of a run rolling back (or
-- being cancelled) is leased but not started: its worker drops it. Returns each item
-- with its run's state (read without locking the run: its results only grow, and an
-- item exists only once the results it reads committed).
-- $1 worker id, $2 max items, $3 lease seconds, $4 saga names, $5 saga versions, $6
-- fingerprints (the three pairwise)
WITH candidates AS (
    SELECT i.run_id, i.step, i.phase, i.lease_owner AS prev_owner, i.released
    FROM __schema__.items i JOIN __schema__.runs r ON r.id = i.run_id
    WHERE i.due_at <= now()
      -- Registered definitions only, written so the planner sees that most due runs
      -- match: an IN over unnest() was estimated at 1 %, and the claim then sorted
      -- every due run instead of reading the due index in order.
      AND array_position(
            ARRAY(SELECT format('%s/%s/%s', d.n, d.v, d.f)
                  FROM unnest($4::text[], $5::integer[], $6::text[]) AS d(n, v, f)),
            format('%s/%s/%s', r.saga_name, r.saga_version, coalesce(r.fingerprint, '-'))
          ) IS NOT NULL
    ORDER BY i.due_at
    LIMIT $2
    FOR UPDATE OF i SKIP LOCKED
), claimed AS (
    UPDATE __schema__.items i SET
        lease_owner = $1,
        lease_token = nextval('__schema__.item_tokens'),
        attempt = i.attempt + 1,
        woken = false,
        -- An expired lease counts its attempt: the next one has not been given back.
        released = i.released AND c.prev_owner IS NULL,
        due_at = clock_timestamp() + make_interval(secs => $3)
    FROM candidates c
    WHERE i.run_id = c.run_id AND i.step = c.step AND i.phase = c.phase
      -- The candidates' runs named, so the update probes the primary key: joined alone
      -- (LIMIT $2 estimated at a tenth of the items) it hashed every item of every run.
      AND i.run_id = ANY (ARRAY(SELECT run_id FROM candidates))
    RETURNING i.run_id, i.step, i.phase, i.attempt, i.lease_token, c.prev_owner, c.released
), state AS (
    SELECT c.*, r.saga_name, r.saga_version, r.status, r.input,
           r.results::text AS results, r.completed_steps, r.cancel_requested,
           r.error IS NOT NULL AS has_error, r.trace_context::text AS trace_context,
           extract(epoch FROM now() - r.created_at)::float8 AS age,
           c.phase = 'step' AND (r.status = 'compensating' OR r.cancel_requested) AS dropping,
           r.parent_id IS NOT NULL AS child
    FROM claimed c JOIN __schema__.runs r
         ON r.id = c.run_id AND r.id = ANY (ARRAY(SELECT run_id FROM claimed))
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker)
    SELECT run_id, kind, step, attempt, worker FROM (
        SELECT run_id, 1 AS ord, 'lease_expired' AS kind, step, attempt - 1 AS attempt,
               prev_owner AS worker
        FROM state WHERE prev_owner IS NOT NULL
        UNION ALL
        SELECT run_id, 2,
               CASE WHEN phase = 'step' THEN 'step_started' ELSE 'compensation_started' END,
               step, attempt, $1
        -- Not after an expired lease or a release: the worker records that start
        -- itself, unless the attempt lost (or given back a second time) was the last
        -- one allowed (none starts).
        FROM state WHERE NOT dropping AND prev_owner IS NULL AND NOT released
    ) e
    ORDER BY run_id, ord
)
SELECT run_id AS id, step AS step_name, phase, attempt, lease_token, prev_owner, released,
       saga_name,
       saga_version, status, input, results, completed_steps, cancel_requested, has_error,
       trace_context, age, dropping, child
FROM state;

-- name: last_failure
-- The step, attempt and error of the run's latest failure in its history: the log line
-- of a graph run that now waits for an operator names it, when the write that failed
-- or stopped the run came after the one that recorded that failure.
-- $1 run id
SELECT step, attempt, (data->'error')::text AS error FROM __schema__.events
WHERE run_id = $1 AND data ? 'error'
ORDER BY id DESC LIMIT 1;

-- name: due_unclaimed
-- Once the claim loop's claim leased what it could: seconds until the next due work of
-- the registered definitions that no lease holds, within the poll interval (NULL: none;
-- 0 or less: due now, a row another transaction held locked, which the claim's SKIP
-- LOCKED passed: a graph write locks its run's items, a signal's sender its run, and
-- nobody announces their release). The claim loop then claims again by then, not at the
-- poll, by the database's clock (the one that made it due): a timer of the worker's
-- that came a moment early does not leave it sleeping until the poll. Rows leased and
-- due (an expired lease) count as due now, as the claim takes them. Read-only, through
-- the due indexes, as the claims read them.
-- $1 saga names, $2 saga versions, $3 fingerprints (runs); $4, $5, $6 the same for the
-- graph sagas (their items); $7 seconds ahead to look (the poll interval)
SELECT extract(epoch FROM least(
    (SELECT r.due_at FROM __schema__.runs r
     WHERE r.due_at <= now() + make_interval(secs => $7::float8)
       AND (r.lease_owner IS NULL OR r.due_at <= now())
       AND array_position(
             ARRAY(SELECT format('%s/%s/%s', d.n, d.v, d.f)
                   FROM unnest($1::text[], $2::integer[], $3::text[]) AS d(n, v, f)),
             format('%s/%s/%s', r.saga_name, r.saga_version, coalesce(r.fingerprint, '-'))
           ) IS NOT NULL
     ORDER BY r.due_at LIMIT 1),
    (SELECT i.due_at FROM __schema__.items i JOIN __schema__.runs r ON r.id = i.run_id
     WHERE cardinality($4::text[]) > 0
       AND i.due_at <= now() + make_interval(secs => $7::float8)
       AND (i.lease_owner IS NULL OR i.due_at <= now())
       AND array_position(
             ARRAY(SELECT format('%s/%s/%s', d.n, d.v, d.f)
                   FROM unnest($4::text[], $5::integer[], $6::text[]) AS d(n, v, f)),
             format('%s/%s/%s', r.saga_name, r.saga_version, coalesce(r.fingerprint, '-'))
           ) IS NOT NULL
     ORDER BY i.due_at LIMIT 1)
) - now())::float8 AS due;

-- name: graph_lock
-- The first statement of a batch of items' writes (a round of one item per run: see
-- saga/_store_graph.py): lock the graph runs' rows in id order (every writer that decides
-- what comes next takes the run's lock first, so two branches ending at once are decided
-- one after the other; concurrent batches lock in one order) and read them. Their items
-- are read by the next statement, whose snapshot is taken once the locks are held: this
-- one's predates the wait for them.
-- $1 run ids (ascending), $2 and $3 the smallest and the largest (the days it touches)
SELECT id, status, completed_steps, compensated_steps, results::text AS results,
       cancel_requested, error IS NOT NULL AS has_error, error->>'step' AS failed_step,
       compensation_error IS NOT NULL AS compensation_failed
FROM __schema__.runs WHERE id = ANY($1::uuid[]) AND id BETWEEN $2 AND $3 AND graph
ORDER BY id
FOR UPDATE;

-- name: graph_items
-- The items of graph runs (read under their row locks: see graph_lock), locked too: a
-- claim of one of them (claim_items locks the item, not the run) that is committing
-- meanwhile is waited for and seen leased, and claims skip them until this write ends;
-- the plan would otherwise drop, as not started, an item a worker has just started. In
-- key order, as heartbeat_items locks them. An item parked until its child runs end
-- counts as running.
-- $1 run ids
SELECT run_id, step, phase, lease_owner IS NOT NULL OR parked AS leased
FROM __schema__.items WHERE run_id = ANY($1::uuid[])
ORDER BY run_id, step, phase
FOR UPDATE;

-- name: graph_write
-- The last statement of an item's write (after graph_lock and graph_items, in the same
-- transaction; a batch's items in one pipelined exchange): fenced
-- by the item's lease token and owner, delete the item (or keep it for a retry), apply
-- the plan's change to the run, drop and create items, append the events, mark the end
-- for result waiters, and wake the workers for new items not leased here. held = 0: the
-- lease was lost (nothing was written).
-- $1 run id, $2 step, $3 phase, $4 lease token held, $5 worker, $6 new status, $7
-- completed step or NULL, $8 its result JSON, $9 compensated step or NULL, $10 output
-- JSON or NULL, $11 error JSON or NULL (keeps the old), $12 compensation error JSON or
-- NULL (keeps the old), $13 retry in seconds (the item stays) or NULL ('Infinity': parked
-- until one of its child runs ends, the attempt not counted), $14/$15 dropped
-- items' steps and phases, $16/$17/$18 new items' steps, phases and lease seconds
-- (NULL: due now, unleased), $19 events JSON array, $20 done channel, $21 work channel,
-- $22 true: parked ($13 'Infinity') but due now (its run rolls back: its next claim
-- undoes its children), $23 true: parked by a step whose last attempt was lost (its
-- claims log no start: marked released, the worker logs none)
WITH fenced AS (
    DELETE FROM __schema__.items
    WHERE run_id = $1 AND step = $2 AND phase = $3 AND lease_token = $4
      AND lease_owner = $5 AND $13::float8 IS NULL
    RETURNING 1
), kept AS (
    UPDATE __schema__.items SET
        lease_owner = NULL, released = $13::float8 = 'Infinity' AND $23::boolean,
        -- woken: a child ended since the claim (its wake-up found the item leased).
        due_at = CASE WHEN $13::float8 <> 'Infinity'
                      THEN clock_timestamp() + make_interval(secs => $13::float8)
                      WHEN woken OR $22::boolean THEN now() ELSE 'infinity' END,
        attempt = CASE WHEN $13::float8 = 'Infinity' THEN attempt - 1 ELSE attempt END,
        parked = $13::float8 = 'Infinity', woken = false
    WHERE run_id = $1 AND step = $2 AND phase = $3 AND lease_token = $4
      AND lease_owner = $5 AND $13::float8 IS NOT NULL
    RETURNING 1
), held AS (
    SELECT count(*) AS n FROM (SELECT 1 FROM fenced UNION ALL SELECT 1 FROM kept) h
), upd AS (
    UPDATE __schema__.runs SET
        status = $6,
        -- Stopped (failed): at the step (compensation) that gave up, whichever branch
        -- ended last; ended otherwise: at no step (as a linear run).
        step_name = CASE WHEN $6 = 'stopped'
                         THEN coalesce(coalesce($11::text::jsonb, error)->>'step', $2)
                         WHEN $6 = 'failed'
                         THEN coalesce(coalesce($12::text::jsonb, compensation_error)->>'step', $2)
                         WHEN $6 IN ('completed', 'compensated', 'cancelled') THEN NULL
                         ELSE $2 END,
        results = CASE WHEN $7::text IS NULL THEN results
                       ELSE results || jsonb_build_object($7::text, to_jsonb($8::text)) END,
        completed_steps = CASE WHEN $7::text IS NULL THEN completed_steps
                               ELSE array_append(completed_steps, $7::text) END,
        compensated_steps = CASE WHEN $9::text IS NULL THEN compensated_steps
                                 ELSE array_append(compensated_steps, $9::text) END,
        output = coalesce($10::text, output),
        error = coalesce($11::text::jsonb, error),
        compensation_error = coalesce($12::text::jsonb, compensation_error),
        due_at = CASE WHEN $6 IN ('completed', 'compensated', 'failed', 'cancelled', 'stopped')
                      THEN NULL ELSE 'infinity'::timestamptz END,
        finished_at = CASE WHEN $6 IN ('completed', 'compensated', 'failed', 'cancelled',
                                       'stopped') THEN now() END,
        updated_at = now()
    WHERE id = $1 AND (SELECT n FROM held) = 1
    RETURNING id, saga_name, due_at IS NULL AS finished,
              extract(epoch FROM now() - created_at)::float8 AS age,
              parent_id IS NOT NULL AS child
), rolling AS (
    -- Rolling back: a step parked for its children runs now, to cancel them.
    UPDATE __schema__.items i SET due_at = now()
    FROM upd
    WHERE $6 = 'compensating' AND i.run_id = upd.id AND i.parked AND i.lease_owner IS NULL
      AND NOT (i.step = $2 AND i.phase = $3)
    RETURNING i.run_id
), dropped AS (
    DELETE FROM __schema__.items i
    USING unnest($14::text[], $15::text[]) AS d(step, phase), upd
    WHERE i.run_id = upd.id AND i.step = d.step AND i.phase = d.phase
), created AS (
    INSERT INTO __schema__.items (run_id, step, phase, attempt, due_at, lease_owner,
                                  lease_token)
    SELECT upd.id, n.step, n.phase, CASE WHEN n.secs IS NULL THEN 0 ELSE 1 END,
           CASE WHEN n.secs IS NULL THEN now()
                ELSE clock_timestamp() + make_interval(secs => n.secs) END,
           CASE WHEN n.secs IS NOT NULL THEN $5 END, nextval('__schema__.item_tokens')
    FROM upd, unnest($16::text[], $17::text[], $18::float8[]) WITH ORDINALITY
              AS n(step, phase, secs, ord)
    ORDER BY n.ord
    RETURNING step, phase, lease_token, lease_owner IS NOT NULL AS leased
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker, data)
    SELECT upd.id, e.ev->>'kind', e.ev->>'step', (e.ev->>'attempt')::integer,
           e.ev->>'worker', e.ev->'data'
    FROM upd, jsonb_array_elements($19::text::jsonb) WITH ORDINALITY AS e(ev, ord)
    ORDER BY e.ord
), watch AS (
    INSERT INTO __schema__.watches AS w (run_id, watched, ended)
    SELECT id, false, true FROM upd WHERE finished
    ON CONFLICT (run_id) DO UPDATE SET ended = true
    RETURNING w.watched
)
SELECT (SELECT n FROM held) AS held, (SELECT age FROM upd) AS age,
       ARRAY(SELECT step FROM created WHERE leased) AS leased_steps,
       ARRAY(SELECT phase FROM created WHERE leased) AS leased_phases,
       ARRAY(SELECT lease_token FROM created WHERE leased) AS leased_tokens,
       CASE WHEN EXISTS (SELECT 1 FROM watch WHERE watched)
            THEN pg_notify($20, $1::text)::text END AS notified_done,
       CASE WHEN EXISTS (SELECT 1 FROM created WHERE NOT leased)
                 OR EXISTS (SELECT 1 FROM rolling)
            THEN (SELECT pg_notify($21, saga_name)::text FROM upd) END AS notified_work,
       coalesce((SELECT finished AND child FROM upd), false) AS ended_child;

-- name: heartbeat_items
-- Extend the leases of graph items this worker still holds; rows missing from the
-- result were lost. Each says whether its run was asked to cancel (an item waiting for
-- a rate-limit token then does not start).
-- $1 worker id, $2 run ids, $3 steps, $4 phases, $5 lease tokens, $6 lease seconds (the
-- five pairwise)
-- The rows are locked first in key order, as graph_items locks a run's items: two
-- writers locking the same items in opposite orders would deadlock.
WITH h AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::float8[])
                  AS h(run_id, step, phase, token, seconds)
), held AS (
    SELECT i.run_id, i.step, i.phase, h.seconds
    FROM __schema__.items i
    JOIN h ON i.run_id = h.run_id AND i.step = h.step AND i.phase = h.phase
          AND i.lease_token = h.token AND i.lease_owner = $1
    ORDER BY i.run_id, i.step, i.phase
    FOR UPDATE OF i
)
UPDATE __schema__.items i SET due_at = clock_timestamp() + make_interval(secs => held.seconds)
FROM held
WHERE i.run_id = held.run_id AND i.step = held.step AND i.phase = held.phase
RETURNING i.run_id, i.step, i.phase,
          (SELECT r.cancel_requested FROM __schema__.runs r WHERE r.id = i.run_id)
              AS cancel_requested;

-- name: release_items
-- Give back every graph item leased to this worker at shutdown, once its loops have
-- ended (as release does for runs: the interrupted attempt is not counted, once).
-- Not those of attempts saga.testing crashed ($3-$6), as release. The attempts still
-- waiting for their rate limit's token ($7-$9) never started: not counted.
-- $1 worker id, $2 work notification channel, $3 run ids, $4 steps, $5 phases and $6
-- lease tokens of the items to keep; $7 run ids, $8 steps and $9 phases of the items
-- whose attempts had not started
WITH idle AS (
    SELECT * FROM unnest($7::uuid[], $8::text[], $9::text[]) AS u(run_id, step, phase)
), held AS (
    SELECT i.run_id, i.step, i.phase, i.attempt, i.released,
           (i.run_id, i.step, i.phase::text) IN (SELECT * FROM idle) AS unstarted
    FROM __schema__.items i
    WHERE i.lease_owner = $1
      AND (i.run_id, i.step, i.phase::text, i.lease_token) NOT IN (
          SELECT * FROM unnest($3::uuid[], $4::text[], $5::text[], $6::bigint[]))
    ORDER BY i.run_id, i.step, i.phase  -- (the order graph_items locks in)
    FOR UPDATE OF i
), upd AS (
    UPDATE __schema__.items i SET
        lease_owner = NULL, due_at = now(), released = held.released OR NOT held.unstarted,
        attempt = CASE WHEN held.released AND NOT held.unstarted THEN held.attempt
                       ELSE greatest(held.attempt - 1, 0) END
    FROM held
    WHERE i.run_id = held.run_id AND i.step = held.step AND i.phase = held.phase
    RETURNING i.run_id, i.step, held.attempt AS released_attempt,
              held.released AND NOT held.unstarted AS counted
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, step, attempt, worker, data)
    SELECT run_id, 'lease_released', step, released_attempt, $1,
           jsonb_build_object('counted', counted)
    FROM upd
)
SELECT u.run_id, pg_notify($2, r.saga_name)::text AS notified
FROM upd u JOIN __schema__.runs r ON r.id = u.run_id;

-- name: item_lease
-- A graph run's item's lease (token, owner), or no row: the item is gone (its write
-- committed: written, or dropped).
-- $1 run id, $2 step, $3 phase
SELECT lease_token, lease_owner FROM __schema__.items
WHERE run_id = $1 AND step = $2 AND phase = $3;

-- name: items_leased_to
-- The first attempts of a graph run's items this worker holds, as claim_items returns
-- them (after an uncertain write that committed: the items it leased here go on). With
-- $3: only those the write that appended this worker's latest event ($3 kind, $4 step,
-- $5 attempt) created (the same statement: xmin and cmin, as write_events), not those a
-- claim of this worker leased meanwhile, whose reply may still be on its way.
-- $1 run id, $2 worker id, $3 kind or NULL (every item), $4 step, $5 attempt
WITH first AS (
    SELECT xmin, cmin FROM __schema__.events
    WHERE run_id = $1 AND kind = $3 AND step IS NOT DISTINCT FROM $4
      AND attempt IS NOT DISTINCT FROM $5 AND worker = $2
    ORDER BY id DESC LIMIT 1
)
SELECT i.run_id AS id, i.step AS step_name, i.phase, i.attempt, i.lease_token,
       NULL AS prev_owner, false AS released,
       r.saga_name, r.saga_version, r.status, r.input, r.results::text AS results,
       r.completed_steps, r.cancel_requested, r.error IS NOT NULL AS has_error,
       r.trace_context::text AS trace_context,
       extract(epoch FROM now() - r.created_at)::float8 AS age, false AS dropping,
       r.parent_id IS NOT NULL AS child
FROM __schema__.items i JOIN __schema__.runs r ON r.id = i.run_id
WHERE i.run_id = $1 AND i.lease_owner = $2 AND i.attempt = 1
  AND ($3::text IS NULL
       OR EXISTS (SELECT FROM first WHERE i.xmin = first.xmin AND i.cmin = first.cmin));

-- name: expire_item_lease
-- saga.testing only: make a held graph item's lease look expired.
-- $1 run id, $2 step
UPDATE __schema__.items SET due_at = now() - interval '1 millisecond'
WHERE run_id = $1 AND step = $2 AND lease_owner IS NOT NULL
RETURNING lease_token;

-- name: fence_child
-- The last statement of a child run's start: whether the children step's claim (its
-- lease token and worker) still holds the step's item. The parent's run row is locked
-- (shared) until the start commits: a cancel, a rollback or the run's end, which all
-- write that row, wait for it and then see the child; a claim that lost its lease starts
-- no child. Taken last, after the child's key: a child's end and an operator's resolve
-- take the key, then the parent's item, never the parent's row.
-- $1 parent run id, $2 parent step, $3 lease token, $4 worker
SELECT 1 FROM __schema__.runs r
JOIN __schema__.items i
  ON i.run_id = r.id AND i.step = $2 AND i.phase = 'step' AND i.lease_token = $3
     AND i.lease_owner = $4
WHERE r.id = $1
FOR SHARE OF r;

-- name: children_failing
-- The failure a children step decided while its children were still being undone (it
-- parked with it, in its children_waiting event), unless a later event of the step
-- or an operator's retry of the run came after it. JSON text or NULL.
-- $1 run id, $2 step
SELECT (SELECT e.data->'failing' FROM __schema__.events e
        WHERE e.run_id = $1 AND e.step = $2 AND e.kind = 'children_waiting'
          AND e.id > coalesce((SELECT max(r.id) FROM __schema__.events r
                               WHERE r.run_id = $1 AND r.kind = 'run_retried'), 0)
        ORDER BY e.id DESC LIMIT 1)::text;

-- name: children_of
-- The child runs a step started, in the order of their keys' index.
-- $1 parent run id, $2 parent step
SELECT id, idempotency_key, status, output, error::text AS error,
       compensation_error::text AS compensation_error, cancel_requested, resolved,
       finished_at
FROM __schema__.runs WHERE parent_id = $1 AND parent_step = $2;

-- name: revert_run
-- Undo a completed run (its parent's step is compensated): it rolls back as if
-- cancelled, from its last step, and ends cancelled. A graph run gets one forward item
-- the claim drops, which starts its rollback. A keyed run (its key released when it
-- completed) queues for its key again, locked here as key_release does: key_fill, a
-- later statement of the transaction, admits it (its compensations run holding the
-- key) when a slot is free. The key's row (a prune may have deleted it) gets the
-- definition's limit, as key_lock does. No row: not completed, or past its pivot.
-- $1 run id, $2 work notification channel, $3 the child saga's concurrency_limit
WITH upd AS (
    UPDATE __schema__.runs SET
        status = 'running', cancel_requested = true, attempt = 0, lease_owner = NULL,
        due_at = CASE WHEN graph OR concurrency_key IS NOT NULL THEN 'infinity'::timestamptz
                      ELSE now() END,
        key_state = CASE WHEN concurrency_key IS NOT NULL THEN 'queued' END,
        finished_at = NULL, updated_at = now()
    WHERE id = $1 AND status = 'completed'
      AND NOT (pivot IS NOT NULL AND pivot = ANY(completed_steps))
    -- (an ended graph run is at no step: its dropped item is its last completed one)
    RETURNING id, saga_name, graph, concurrency_key,
              coalesce(step_name, completed_steps[cardinality(completed_steps)]) AS step_name
), key AS (
    INSERT INTO __schema__.key_slots AS k (saga_name, key, key_limit)
    SELECT saga_name, concurrency_key, $3::integer FROM upd WHERE concurrency_key IS NOT NULL
    ON CONFLICT (saga_name, key) DO UPDATE SET key_limit = excluded.key_limit
    RETURNING k.saga_name, k.key
), item AS (
    INSERT INTO __schema__.items (run_id, step, phase)
    SELECT id, step_name, 'step' FROM upd WHERE graph
    ON CONFLICT DO NOTHING
), ev AS (
    INSERT INTO __schema__.events (run_id, kind, data)
    SELECT id, 'cancel_requested', '{"revert": true}'::jsonb FROM upd
), revived AS (
    UPDATE __schema__.watches w SET ended = false
    FROM upd WHERE w.run_id = $1 AND w.run_id = upd.id
)
SELECT id, saga_name, (SELECT key FROM key) AS key, pg_notify($2, saga_name)::text AS notified
FROM upd;

-- Dashboard
-- What the web dashboard (saga.web) reads besides the operator queries: each bounded by
-- the active runs and an index over recently finished ones, never the whole history.

-- name: dash_finished_per_hour
-- Runs that finished from the start of the hour ($1 - 1) hours ago until now, per hour
-- (truncated, database clock) and final status; reads the finished runs' partial index.
-- Hours are UTC's, whatever the session's time zone (in one a half hour off UTC, its
-- hours would start at :30 UTC).
-- $1 hours to look back (the current hour included)
SELECT date_trunc('HOUR', finished_at, 'UTC') AS hour, status, count(*) AS runs
FROM __schema__.runs
WHERE due_at IS NULL
  AND finished_at >= date_trunc('HOUR', now(), 'UTC') - make_interval(hours => $1::int - 1)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: dash_outcomes
-- Runs that finished in the last $1 seconds, per saga and final status (failure rates).
-- $1 seconds to look back
SELECT saga_name, status, count(*) AS runs
FROM __schema__.runs
WHERE due_at IS NULL AND finished_at >= now() - make_interval(secs => $1::float8)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: dash_failures
-- Failed attempts of steps and compensations recorded in the last $1 seconds, per saga,
-- kind and error type, with how many of them were retried (their event has retry_in).
-- Only runs still active or finished within the window can hold such events: they are
-- found through the two partial indexes, then their events through the primary key.
-- $1 seconds to look back, $2 most rows returned
WITH recent AS (
    SELECT id, saga_name FROM __schema__.runs WHERE due_at IS NOT NULL
    UNION ALL
    SELECT id, saga_name FROM __schema__.runs
    WHERE due_at IS NULL AND finished_at >= now() - make_interval(secs => $1::float8)
)
SELECT r.saga_name, e.kind, coalesce(e.data #>> '{error,type}', '?') AS error_type,
       count(*) AS failures, count(*) FILTER (WHERE e.data #> '{retry_in}' IS NOT NULL) AS retried
FROM recent r
JOIN __schema__.events e ON e.run_id = r.id
WHERE e.kind IN ('step_failed', 'compensation_failed')
  AND e.at >= now() - make_interval(secs => $1::float8)
GROUP BY 1, 2, 3
ORDER BY failures DESC, 1, 2, 3
LIMIT $2;

-- name: dash_overdue
-- Work nobody runs: run rows and graph items due more than $1 seconds ago. A held
-- lease's due time is its expiry, so these are unleased (or their worker is gone): work
-- waiting for a definition version no live worker has, or for workers at all. Runs
-- counted per saga (name, version, fingerprint; '-': none recorded), a run whose steps
-- run in parallel once however many of its items are due, with the oldest's age.
-- $1 seconds overdue
SELECT saga_name, saga_version, coalesce(fingerprint, '-') AS fingerprint,
       count(DISTINCT id) AS runs, extract(epoch FROM now() - min(due_at))::float8 AS oldest
FROM (
    SELECT id, saga_name, saga_version, fingerprint, due_at
    FROM __schema__.runs
    WHERE due_at <= now() - make_interval(secs => $1::float8)
    UNION ALL
    SELECT r.id, r.saga_name, r.saga_version, r.fingerprint, i.due_at
    FROM __schema__.items i
    JOIN __schema__.runs r ON r.id = i.run_id
    WHERE i.due_at <= now() - make_interval(secs => $1::float8)
) AS due
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3;

-- name: dash_payloads
-- One run's payloads as JSON text: its input, its steps' results (an object of step name
-- to JSON text) and its output (NULL until completed).
-- $1 run id
SELECT input, results::text AS results, output FROM __schema__.runs WHERE id = $1;

-- name: dash_children
-- The child runs a run's steps started, oldest first, at most $2 of them (runs_parent).
-- $1 parent run id, $2 how many
SELECT id, saga_name, parent_step, status, created_at
FROM __schema__.runs WHERE parent_id = $1
ORDER BY created_at, id
LIMIT $2;

-- name: dash_signals
-- One run's signals: whether each was received, when, and whether its wait is decided.
-- $1 run id
SELECT name, payload IS NOT NULL AS received, received_at, awaited_at, timeout_seconds,
       closed
FROM __schema__.signals WHERE run_id = $1 ORDER BY name;

-- name: dash_events_sequence
-- The last value of the history's sequence: an O(1) read that changes whenever any run
-- records anything (steps in the middle of a run send no NOTIFY): the sequence of
-- events.id (event_ids since migration 0009). With the transactions running now (the
-- ids of those that wrote): events a running one wrote are seen once it has ended (a
-- signal sent in a caller's transaction).
-- no parameters
-- running: those listed running below xmax, the first transaction id not yet ended
-- (one at xmax or above has not ended: running, or not started).
SELECT pg_sequence_last_value('__schema__.event_ids'::regclass) AS seq,
       pg_snapshot_xmax(s)::text::bigint AS xmax,
       ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s) AS x) AS running
FROM pg_current_snapshot() AS s;

-- name: presence_enter
-- Mark this session as an executing orchestrator of the schema (a shared advisory lock,
-- held until presence_leave or the session's end) and tell the others present.
-- $1 the schema's peers channel
SELECT pg_try_advisory_lock_shared(hashtextextended('__schema__ executing', 0)),
       pg_notify($1, '') IS NULL;

-- name: presence_leave
-- Unmark this session (see presence_enter) and tell the others present.
-- $1 the schema's peers channel
SELECT pg_advisory_unlock_shared(hashtextextended('__schema__ executing', 0)),
       pg_notify($1, '') IS NULL;

-- name: presence_count
-- The sessions marked present by presence_enter, in this database (a bigint advisory
-- key shows in pg_locks as its high half, its low half, and objsubid 1).
-- no parameters
SELECT count(*)::int
FROM pg_locks l,
     (SELECT hashtextextended('__schema__ executing', 0) AS k) key
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = ((key.k >> 32) & 4294967295)::oid
  AND l.objid = (key.k & 4294967295)::oid;

-- Day partitions (read by saga/_partitions.py, see its docstring). Besides __schema__,
-- these queries name tables that depend on the day: each placeholder between double
-- underscores is replaced by a quoted identifier (or, for the bounds, a UUID literal)
-- that saga/_partitions.py builds from the day and the table, never from user input.

-- name: partition_days
-- The partitions of runs (runs_pYYYYMMDD and runs_default): their names.
-- no parameters
SELECT c.relname::text AS relname
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = '__schema__.runs'::regclass;

-- name: partitioned
-- Whether runs is partitioned (false: a schema not migrated as far as 0009).
-- no parameters
SELECT EXISTS (SELECT 1 FROM pg_partitioned_table
               WHERE partrelid = '__schema__.runs'::regclass);

-- name: partition_lock
-- One partition change of the schema at a time, until the transaction ends (waited for
-- as long as another's change lasts).
-- $1 lock key text ("saga.partitions:" + schema)
SELECT pg_advisory_xact_lock(hashtext($1));

-- name: partition_lock_timeout
-- This transaction's statements wait at most 500 ms for a table's lock, then fail
-- (statements on the runs queue behind a waiting lock meanwhile); the caller tries the
-- day again later. No JIT either (a pool the user gave may have it on): the statements
-- reading a whole day are costed high enough for Postgres to spend a second compiling.
-- no parameters
SET LOCAL lock_timeout = '500ms'; SET LOCAL jit = off

-- name: partition_lock_default
-- Take the DEFAULT partition of a table exclusively: attaching a partition next to it
-- does (checking that none of its rows belongs there), so it is taken first rather than
-- upgraded to. __default__: the table's DEFAULT partition.
-- no parameters
LOCK TABLE __default__ IN ACCESS EXCLUSIVE MODE;

-- name: partition_create
-- A table __part__ shaped as __parent__ (columns, defaults, checks: what attaching
-- needs), without indexes: attaching builds the parent's on it.
-- no parameters
CREATE TABLE __part__ (LIKE __parent__ INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE);

-- name: partition_fill
-- Move the day's rows out of the DEFAULT partition __default__ into __part__ (__key__:
-- the table's run id column).
-- $1 the day's first run id, $2 the next day's first run id
WITH moved AS (
    DELETE FROM __default__ WHERE __key__ >= $1::uuid AND __key__ < $2::uuid RETURNING *
)
INSERT INTO __part__ SELECT * FROM moved;

-- name: partition_key_index
-- Idempotency keys are unique within the runs partition __part__ (across partitions:
-- see lock_key). __index__: the index's name.
-- no parameters
CREATE UNIQUE INDEX __index__ ON __part__ (saga_name, idempotency_key)
WHERE idempotency_key IS NOT NULL;

-- name: partition_attach
-- Make __part__ the partition of __parent__ for the run ids from __lo__ (the day's
-- first) up to __hi__ (the next day's first); DDL takes literals, not parameters.
-- no parameters
ALTER TABLE __parent__ ATTACH PARTITION __part__ FOR VALUES FROM (__lo__) TO (__hi__);

-- name: day_counts
-- The runs of the day's partition __runs__ that a prune would remove, and those it keeps.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
SELECT count(*) FILTER (WHERE __prunable_in_day__) AS gone,
       count(*) FILTER (WHERE NOT coalesce(__prunable_in_day__, false)) AS kept
FROM __runs__ r;

-- name: day_events_gone
-- The events (in the day's partition __events__) of the day's runs (__runs__) that a
-- prune would remove.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
SELECT count(*) FROM __events__ e JOIN __runs__ r ON r.id = e.run_id WHERE __prunable_in_day__;

-- name: day_lock
-- Hold the day's four partitions exclusively until the transaction ends (claims and
-- writes wait meanwhile: the day's transaction is short). The parents first, as every
-- statement locks them (a cached plan then locks every partition): dropping or
-- attaching a partition needs its parent too, and taking it last would wait for
-- statements that hold it and wait for the day's partitions (a deadlock each time,
-- broken by the lock timeout, under steady traffic).
-- no parameters
LOCK TABLE ONLY __schema__.runs, ONLY __schema__.events, ONLY __schema__.watches,
    ONLY __schema__.signals IN ACCESS EXCLUSIVE MODE;
LOCK TABLE __runs__, __events__, __watches__, __signals__ IN ACCESS EXCLUSIVE MODE;

-- name: day_rows
-- The rows of the day's (locked) partitions of runs and of events.
-- no parameters
SELECT (SELECT count(*) FROM __runs__) AS runs, (SELECT count(*) FROM __events__) AS events;

-- name: day_parents_gone
-- The runs of the day's partition __runs__ that a prune removes and that have children:
-- a dry run counts their children's days as if they were gone.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
SELECT r.id FROM __runs__ r
WHERE __prunable_in_day__ AND EXISTS (SELECT 1 FROM __schema__.runs c WHERE c.parent_id = r.id);

-- name: day_any_kept
-- Whether a run of the (locked) day's partition __runs__ must stay, read through the
-- partial indexes (of active runs, of finished runs by end time, of children, of each
-- terminal status) rather than the whole partition: a run still active, one finished
-- after the cutoff, a child whose parent stays, or one in a status not pruned.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
SELECT EXISTS (SELECT 1 FROM __runs__ WHERE due_at IS NOT NULL)
    OR EXISTS (SELECT 1 FROM __runs__
               WHERE due_at IS NULL AND (finished_at >= $1::timestamptz OR finished_at IS NULL))
    OR EXISTS (SELECT 1 FROM __runs__ r
               WHERE r.parent_id IS NOT NULL AND NOT coalesce(__prunable_in_day__, false))
    -- Each status a literal: the planner then reads that status's partial index.
    OR (NOT 'completed' = ANY($2::text[])
        AND EXISTS (SELECT 1 FROM __runs__ WHERE status = 'completed'))
    OR (NOT 'compensated' = ANY($2::text[])
        AND EXISTS (SELECT 1 FROM __runs__ WHERE status = 'compensated'))
    OR (NOT 'failed' = ANY($2::text[])
        AND EXISTS (SELECT 1 FROM __runs__ WHERE status = 'failed'))
    OR (NOT 'cancelled' = ANY($2::text[])
        AND EXISTS (SELECT 1 FROM __runs__ WHERE status = 'cancelled'))
    OR (NOT 'stopped' = ANY($2::text[])
        AND EXISTS (SELECT 1 FROM __runs__ WHERE status = 'stopped'));

-- name: day_kept
-- The runs of the (locked) day's partition __runs__ that a prune keeps.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
SELECT count(*) FROM __runs__ r WHERE NOT coalesce(__prunable_in_day__, false);

-- name: day_key_holders
-- The runs of the (locked) day's partition __runs__ that a prune removes and that still
-- hold their concurrency key: each frees it first (prune_key_release).
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
SELECT r.id FROM __runs__ r WHERE r.key_state = 'held' AND __prunable_in_day__ ORDER BY r.id;

-- name: day_drop
-- Drop the day's four partitions (every run of the day goes).
-- no parameters
DROP TABLE __runs__, __events__, __watches__, __signals__;

-- name: day_copy_kept_runs
-- Copy the runs a prune keeps from the day's partition __runs__ into __fresh__.
-- $1 the prune's cutoff, $2 statuses (text[], terminal ones), $3 runs gone: see
-- fragment_prunable_in_day
INSERT INTO __fresh__ SELECT r.* FROM __runs__ r WHERE NOT coalesce(__prunable_in_day__, false);

-- name: day_copy_kept_rows
-- Copy the rows of __old__ (events, watches or signals of the day; __key__ its run id
-- column) that belong to the runs copied into __fresh_runs__, into __fresh__.
-- no parameters
INSERT INTO __fresh__ SELECT x.* FROM __old__ x WHERE x.__key__ IN (SELECT id FROM __fresh_runs__);

-- name: partition_drop
-- Drop one partition (__part__).
-- no parameters
DROP TABLE __part__;

-- name: partition_rename_index
-- Rename the index __index__ (schema-qualified) to __name__.
-- no parameters
ALTER INDEX __index__ RENAME TO __name__;

-- name: partition_rename
-- Rename the table __part__ (schema-qualified) to __name__.
-- no parameters
ALTER TABLE __part__ RENAME TO __name__;

-- name: analyze_table
-- Gather the planner's statistics of one table (__table__) of the schema.
-- no parameters
ANALYZE __table__;

-- name: database_now
-- The database's clock, now.
-- no parameters
SELECT now();
