-- Durable waits, as SQLite's 0004. A waitpoint is something a run can wait for without holding a
-- worker: a time, a token completed from outside, or a child run finishing. A suspended run
-- (WAITING) is linked to the waitpoints it waits for in run_waits; when the last one completes,
-- the run is queued again and continues the same attempt on any worker.
-- Objects are created unqualified: migrate.py runs this file with the search_path set to
-- Conveyor's schema. How concurrent transactions meet on these rows: tx.py, "Durable waits".

CREATE TABLE waitpoints (
    id             text PRIMARY KEY,
    environment    text NOT NULL,
    kind           text NOT NULL,      -- time | token | run
    status         text NOT NULL,      -- PENDING | COMPLETED
    complete_at    double precision,   -- time: when it is due; token: its timeout
    target_run_id  text,               -- run: the child whose end completes it
    -- JSON text, not jsonb (as run_steps.output): a replay reads exactly what was stored.
    -- {"ok": true, "output": ...} | {"ok": false, "error": {...}}
    output         text,
    tags           jsonb,
    created_by     text,               -- the run that created it (NULL: made outside a run)
    created_at     double precision NOT NULL,
    completed_at   double precision
);
-- The maintenance loop completes due times and token timeouts from here.
CREATE INDEX waitpoints_due ON waitpoints (complete_at) WHERE status = 'PENDING' AND complete_at IS NOT NULL;
-- A finishing child completes the waitpoints that target it.
CREATE INDEX waitpoints_target ON waitpoints (target_run_id) WHERE target_run_id IS NOT NULL;
CREATE INDEX waitpoints_created_by ON waitpoints (created_by) WHERE created_by IS NOT NULL;

CREATE TABLE run_waits (
    run_id        text NOT NULL,
    waitpoint_id  text NOT NULL,
    PRIMARY KEY (run_id, waitpoint_id)
);
CREATE INDEX run_waits_waitpoint ON run_waits (waitpoint_id, run_id);

-- True while a resumed run is QUEUED: its next claim continues the attempt instead of starting one.
ALTER TABLE runs ADD COLUMN resume boolean NOT NULL DEFAULT false;
-- Execution segments of the current attempt (1 = not resumed yet).
ALTER TABLE runs ADD COLUMN segment integer NOT NULL DEFAULT 0;
-- PostgreSQL only: set when a waitpoint created after the run targets it (an idempotency key gave
-- an existing run to a waiting parent). A statement that finishes the run after waiting for that
-- transaction's lock reads the flag from the row's newest version and completes the waitpoints
-- in a statement of its own, whose snapshot sees them (see tx.py, "Durable waits").
ALTER TABLE runs ADD COLUMN awaited boolean NOT NULL DEFAULT false;
