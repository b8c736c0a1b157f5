-- Durable waits. A waitpoint is something a run can wait for without holding a worker: a
-- time, a token completed from outside, or a child run finishing. A suspended run (WAITING)
-- is linked to the waitpoints it waits for in run_waits; when the last one completes, the
-- run is queued again and continues the same attempt on any worker.

CREATE TABLE waitpoints (
    id             TEXT PRIMARY KEY,
    environment    TEXT NOT NULL,
    kind           TEXT NOT NULL,      -- time | token | run
    status         TEXT NOT NULL,      -- PENDING | COMPLETED
    complete_at    REAL,               -- time: when it is due; token: its timeout
    target_run_id  TEXT,               -- run: the child whose end completes it
    output         TEXT,               -- JSON {"ok": true, "output": ...} | {"ok": false, "error": {...}}
    tags           TEXT,
    created_by     TEXT,               -- the run that created it (NULL: made outside a run)
    created_at     REAL NOT NULL,
    completed_at   REAL
);
-- The maintenance loop completes due times and token timeouts from here.
CREATE INDEX waitpoints_due ON waitpoints (complete_at) WHERE status = 'PENDING' AND complete_at IS NOT NULL;
-- A finishing child completes the waitpoints that target it.
CREATE INDEX waitpoints_target ON waitpoints (target_run_id) WHERE target_run_id IS NOT NULL;
CREATE INDEX waitpoints_created_by ON waitpoints (created_by) WHERE created_by IS NOT NULL;

CREATE TABLE run_waits (
    run_id        TEXT NOT NULL,
    waitpoint_id  TEXT NOT NULL,
    PRIMARY KEY (run_id, waitpoint_id)
) WITHOUT ROWID;
CREATE INDEX run_waits_waitpoint ON run_waits (waitpoint_id, run_id);

-- 1 while a resumed run is QUEUED: its next claim continues the attempt instead of starting one.
ALTER TABLE runs ADD COLUMN resume INTEGER NOT NULL DEFAULT 0;
-- Execution segments of the current attempt (1 = not resumed yet).
ALTER TABLE runs ADD COLUMN segment INTEGER NOT NULL DEFAULT 0;
