-- The first schema. It already carries what DECISIONS.md lists (environments, the task
-- registry, attempts, tags, the per-run event log, workers), so features add, not rewrite.
-- Times are epoch seconds (REAL); JSON values are TEXT.

CREATE TABLE environments (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
);

CREATE TABLE tasks (
    environment     TEXT NOT NULL,
    task_id         TEXT NOT NULL,
    version         TEXT NOT NULL DEFAULT '',
    queue           TEXT NOT NULL,
    machine         TEXT NOT NULL,
    options         TEXT NOT NULL,
    payload_schema  TEXT,
    code_hash       TEXT,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (environment, task_id, version)
) WITHOUT ROWID;

CREATE TABLE queues (
    environment        TEXT NOT NULL,
    name               TEXT NOT NULL,
    concurrency_limit  INTEGER,
    paused             INTEGER NOT NULL DEFAULT 0,
    updated_at         REAL NOT NULL,
    PRIMARY KEY (environment, name)
) WITHOUT ROWID;

CREATE TABLE runs (
    id                   TEXT PRIMARY KEY,
    environment          TEXT NOT NULL,
    task_id              TEXT NOT NULL,
    queue                TEXT NOT NULL,
    status               TEXT NOT NULL,
    payload              TEXT NOT NULL,
    output               TEXT,
    error                TEXT,
    available_at         REAL NOT NULL,           -- claimable from (delay, retry backoff)
    priority             INTEGER NOT NULL DEFAULT 0,
    sort_key             REAL NOT NULL,           -- available_at - priority
    ttl                  REAL,
    expires_at           REAL,                    -- first QUEUED + ttl; cleared at first claim
    max_attempts         INTEGER NOT NULL,
    attempt_count        INTEGER NOT NULL DEFAULT 0,
    retry                TEXT,
    max_duration         REAL,
    executed_seconds     REAL NOT NULL DEFAULT 0, -- summed over segments of the attempt
    concurrency_key      TEXT,
    key_limit            INTEGER,
    queue_slot           INTEGER NOT NULL DEFAULT 1,  -- 0: keyed run not capped by its queue
    idempotency_key      TEXT,
    idempotency_key_ttl  REAL,
    tags                 TEXT,
    metadata             TEXT,
    machine              TEXT NOT NULL,
    version              TEXT,
    parent_id            TEXT,
    root_id              TEXT,
    batch_id             TEXT,
    trace_context        TEXT,
    worker_id            TEXT,
    lease_token          TEXT,
    lease_expires_at     REAL,
    segment_started_at   REAL,
    cancel_requested     INTEGER NOT NULL DEFAULT 0,
    event_seq            INTEGER NOT NULL DEFAULT 0,
    created_at           REAL NOT NULL,
    queued_at            REAL,
    started_at           REAL,
    finished_at          REAL,
    updated_at           REAL NOT NULL
);

-- The claim walks this index in sort order, one queue at a time.
CREATE INDEX runs_claim ON runs (environment, queue, sort_key, id) WHERE status = 'QUEUED';
-- Slot counting: what is running per queue and per concurrency key.
CREATE INDEX runs_running ON runs (environment, queue, concurrency_key) WHERE status = 'EXECUTING';
CREATE INDEX runs_worker ON runs (worker_id) WHERE status = 'EXECUTING';
CREATE INDEX runs_lease ON runs (lease_expires_at) WHERE status = 'EXECUTING';
CREATE INDEX runs_delayed ON runs (available_at) WHERE status = 'DELAYED';
-- Retries waiting out their backoff: when the next one becomes due.
CREATE INDEX runs_retry_due ON runs (available_at) WHERE status = 'QUEUED' AND attempt_count > 0;
CREATE INDEX runs_ttl ON runs (expires_at) WHERE status = 'QUEUED' AND expires_at IS NOT NULL;
CREATE INDEX runs_env_task ON runs (environment, task_id, id);
CREATE INDEX runs_parent ON runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_batch ON runs (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE attempts (
    run_id       TEXT NOT NULL,
    number       INTEGER NOT NULL,
    worker_id    TEXT,
    lease_token  TEXT,
    status       TEXT NOT NULL,      -- EXECUTING, COMPLETED, FAILED, CANCELED, TIMED_OUT, WORKER_LOST
    error        TEXT,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    PRIMARY KEY (run_id, number)
) WITHOUT ROWID;

CREATE TABLE run_tags (
    environment  TEXT NOT NULL,
    tag          TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    PRIMARY KEY (environment, tag, run_id)
) WITHOUT ROWID;

-- Append-only, per run, numbered: status changes, metadata operations, stream chunks.
CREATE TABLE run_events (
    run_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    attempt     INTEGER,
    kind        TEXT NOT NULL,
    data        TEXT,
    created_at  REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE run_logs (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    ts          REAL NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    attributes  TEXT
);
CREATE INDEX run_logs_run ON run_logs (run_id, id);

CREATE TABLE idempotency_keys (
    environment  TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    key          TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    expires_at   REAL NOT NULL,
    PRIMARY KEY (environment, task_id, key)
) WITHOUT ROWID;

CREATE TABLE workers (
    id            TEXT PRIMARY KEY,
    environment   TEXT NOT NULL,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    address       TEXT,              -- where to send a wake-up datagram
    queues        TEXT NOT NULL,
    machine       TEXT NOT NULL,
    version       TEXT,
    started_at    REAL NOT NULL,
    last_seen_at  REAL NOT NULL
);
