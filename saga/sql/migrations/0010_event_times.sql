-- 0010: a history event is dated when it was written, not when its transaction began.
--
-- now() is the start of the transaction: an event written in a caller's transaction
-- (start(conn=), signal(conn=)) was dated when that transaction began, before events
-- written meanwhile by the workers, and the events of one write that spans several
-- statements all shared its first moment. clock_timestamp() follows the history's
-- order (seq). Inserts go through the partitioned table, whose default applies.
ALTER TABLE __schema__.events ALTER COLUMN at SET DEFAULT clock_timestamp();
