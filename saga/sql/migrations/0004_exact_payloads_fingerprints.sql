-- 0004: payloads stored exactly, definition fingerprints, race-free result watches.
--
-- Payloads become text: jsonb rewrites numbers (1e20 reads back as an int), reorders
-- keys and drops duplicates, so a value checked to round-trip could still come back
-- different. Results stay one jsonb object keyed by step name, whose values are now the
-- exact JSON texts as jsonb strings.
ALTER TABLE __schema__.runs
    ALTER COLUMN input TYPE text USING input::text,
    ALTER COLUMN output TYPE text USING output::text;

UPDATE __schema__.runs SET results = (
    SELECT coalesce(jsonb_object_agg(r.key, to_jsonb(r.value::text)), '{}'::jsonb)
    FROM jsonb_each(results) AS r
)
WHERE results <> '{}'::jsonb;

-- The fingerprint of the definition a run started with (NULL for runs started before
-- this migration: they match any definition of their name and version).
ALTER TABLE __schema__.runs ADD COLUMN fingerprint text;

-- A watch row is written by a result() waiter (watched) and by the run's final
-- transition (ended), each with INSERT ... ON CONFLICT on the run id: whichever commits
-- second sees the other's row whatever its snapshot, so the end of a watched run is
-- always notified or seen by the waiter. A finished run keeps its row (ended) until it
-- is pruned.
ALTER TABLE __schema__.watches
    ADD COLUMN watched boolean NOT NULL DEFAULT true,
    ADD COLUMN ended boolean NOT NULL DEFAULT false;

-- Whether the current attempt was already given back once by a worker shutting down:
-- a second release of it counts the attempt (see the release query).
ALTER TABLE __schema__.runs ADD COLUMN released boolean NOT NULL DEFAULT false;
