-- The step journal (durable execution): one row per completed `conveyor.step(...)` call.
-- A replay returns `output` instead of running the step again; `key` ("name#n") is checked
-- against the call at the same `position` to catch code that no longer replays the same way.

CREATE TABLE run_steps (
    run_id       TEXT NOT NULL,
    position     INTEGER NOT NULL,
    key          TEXT NOT NULL,
    name         TEXT NOT NULL,
    output       TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    finished_at  REAL NOT NULL
);
CREATE UNIQUE INDEX run_steps_position ON run_steps (run_id, position);
