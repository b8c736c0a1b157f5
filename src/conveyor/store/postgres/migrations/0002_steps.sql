-- The step journal (durable execution): one row per completed `conveyor.step(...)` call.
-- A replay returns `output` instead of running the step again; `key` ("name#n") is checked
-- against the call at the same `position` to catch code that no longer replays the same way.
-- `output` is JSON text (not jsonb), so a replay returns exactly what the first run stored.

CREATE TABLE run_steps (
    run_id       text NOT NULL,
    position     integer NOT NULL,
    key          text NOT NULL,
    name         text NOT NULL,
    output       text NOT NULL,
    attempt      integer NOT NULL,
    started_at   double precision NOT NULL,
    finished_at  double precision NOT NULL,
    PRIMARY KEY (run_id, position)
);
