-- Reads that stay fast with millions of finished runs (bench/pg_scale.py with 1M queued and 10M
-- finished runs; docs/performance.md, "10M finished runs").
--
-- `conveyor runs list --status FAILED` (or any failure status) walked runs_pkey newest first and
-- filtered by status: every newer run of another status was read, 1,000,380 rows (345 ms) with a
-- backlog of 1M queued runs, and the whole table for a status that only old runs have. Failures
-- are a small share of the runs and the status operators list most, so they get an index of their
-- own, in id order: newest first, every status of the predicate (or several, `= ANY`) is found in
-- a few pages. A run enters it once, when it fails: the claim and the COMPLETED path never touch it.
-- Built in about 4 s on 11M runs (56 MB); like every migration it runs in one transaction, so
-- writes to `runs` wait for the build.
CREATE INDEX runs_failures ON runs (environment, id)
    WHERE status IN ('FAILED', 'CANCELED', 'CRASHED', 'TIMED_OUT', 'EXPIRED', 'SYSTEM_FAILURE');

-- A queue table churns: every run is inserted, updated a few times and later deleted. With the
-- default scale factor (20 %) autovacuum waits for 2.2M dead rows on an 11M-row table, and dead
-- entries pile up in the small hot-path indexes meanwhile (maintenance's next-due query went from
-- 0.09 ms to 7.9 ms after 30,000 drained runs). Vacuum runs after 1 % instead.
ALTER TABLE runs SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);
