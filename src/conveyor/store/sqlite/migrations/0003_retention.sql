-- Retention (run_purge): the oldest finished runs first, without reading the live ones.
-- (PostgreSQL has this index in its 0001: that migration had not been released yet.)
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
