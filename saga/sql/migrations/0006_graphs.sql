-- 0006: sagas whose steps run in parallel (a graph of steps), pivot steps, child sagas.
--
-- A graph run's work items are rows of items, one per ready step or compensation, each
-- leased and fenced on its own; the run row holds the run's state (results, completed
-- and compensated steps) and is never claimed itself (due 'infinity' while active).
-- Linear runs keep their one item in the run row and never touch this table.
ALTER TABLE __schema__.runs ADD COLUMN graph boolean NOT NULL DEFAULT false;
ALTER TABLE __schema__.runs ADD COLUMN compensated_steps text[] NOT NULL DEFAULT '{}';
-- The definition's pivot step, if any: once the run reached it, it is not cancelled.
ALTER TABLE __schema__.runs ADD COLUMN pivot text;
-- A child run: the run and step that started it (its end wakes that step's item).
ALTER TABLE __schema__.runs ADD COLUMN parent_id uuid;
ALTER TABLE __schema__.runs ADD COLUMN parent_step text;
CREATE INDEX runs_parent ON __schema__.runs (parent_id, parent_step) WHERE parent_id IS NOT NULL;

-- Fencing tokens of items: unique across every item ever leased.
CREATE SEQUENCE __schema__.item_tokens;

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
