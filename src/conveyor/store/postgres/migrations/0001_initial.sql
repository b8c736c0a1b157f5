-- The first PostgreSQL schema: the same tables as SQLite's 0001 (DECISIONS.md, "What the first
-- schema carries"). Objects are created unqualified: migrate.py runs this file with the
-- search_path set to Conveyor's schema (`conveyor` unless configured).
-- Times are epoch seconds (double precision), as everywhere in Conveyor; JSON values are jsonb.

CREATE TABLE environments (
    name        text PRIMARY KEY,
    created_at  double precision NOT NULL
);

CREATE TABLE tasks (
    environment     text NOT NULL,
    task_id         text NOT NULL,
    version         text NOT NULL DEFAULT '',
    queue           text NOT NULL,
    machine         text NOT NULL,
    options         jsonb NOT NULL,
    payload_schema  jsonb,
    code_hash       text,
    updated_at      double precision NOT NULL,
    PRIMARY KEY (environment, task_id, version)
);

-- A queue's row is also its slot lock: a claim that checks the queue's limit holds
-- `SELECT ... FOR UPDATE` on it until commit (see tx.py, "Claim").
CREATE TABLE queues (
    environment        text NOT NULL,
    name               text NOT NULL,
    concurrency_limit  integer,
    paused             boolean NOT NULL DEFAULT false,
    updated_at         double precision NOT NULL,
    PRIMARY KEY (environment, name)
);

CREATE TABLE runs (
    id                   text PRIMARY KEY,
    environment          text NOT NULL,
    task_id              text NOT NULL,
    queue                text NOT NULL,
    status               text NOT NULL,
    payload              jsonb NOT NULL,
    output               jsonb,
    error                jsonb,
    available_at         double precision NOT NULL,   -- claimable from (delay, retry backoff)
    priority             integer NOT NULL DEFAULT 0,
    sort_key             double precision NOT NULL,   -- available_at - priority
    ttl                  double precision,
    expires_at           double precision,            -- first QUEUED + ttl; cleared at first claim
    max_attempts         integer NOT NULL,
    attempt_count        integer NOT NULL DEFAULT 0,
    retry                jsonb,
    max_duration         double precision,
    executed_seconds     double precision NOT NULL DEFAULT 0,
    concurrency_key      text,
    key_limit            integer,
    queue_slot           boolean NOT NULL DEFAULT true,  -- false: keyed run not capped by its queue
    idempotency_key      text,
    idempotency_key_ttl  double precision,
    tags                 jsonb,
    metadata             jsonb,
    machine              text NOT NULL,
    version              text,
    parent_id            text,
    root_id              text,
    batch_id             text,
    trace_context        text,
    worker_id            text,
    lease_token          text,
    lease_expires_at     double precision,
    segment_started_at   double precision,
    cancel_requested     boolean NOT NULL DEFAULT false,
    event_seq            integer NOT NULL DEFAULT 0,
    created_at           double precision NOT NULL,
    queued_at            double precision,
    started_at           double precision,
    finished_at          double precision,
    updated_at           double precision NOT NULL
);

-- The claim walks this index in sort order, one queue at a time (FOR UPDATE SKIP LOCKED).
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
-- Retention (run_purge): the oldest finished runs first, without reading the live ones.
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_parent ON runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_batch ON runs (batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE attempts (
    run_id       text NOT NULL,
    number       integer NOT NULL,
    worker_id    text,
    lease_token  text,
    status       text NOT NULL,      -- EXECUTING, COMPLETED, FAILED, CANCELED, TIMED_OUT, WORKER_LOST
    error        jsonb,
    started_at   double precision NOT NULL,
    finished_at  double precision,
    PRIMARY KEY (run_id, number)
);

CREATE TABLE run_tags (
    environment  text NOT NULL,
    tag          text NOT NULL,
    run_id       text NOT NULL,
    PRIMARY KEY (environment, tag, run_id)
);

-- Append-only, per run, numbered: status changes, metadata operations, stream chunks.
CREATE TABLE run_events (
    run_id      text NOT NULL,
    seq         integer NOT NULL,
    attempt     integer,
    kind        text NOT NULL,
    data        jsonb,
    created_at  double precision NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE run_logs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      text NOT NULL,
    attempt     integer NOT NULL,
    ts          double precision NOT NULL,
    level       text NOT NULL,
    message     text NOT NULL,
    attributes  jsonb
);
CREATE INDEX run_logs_run ON run_logs (run_id, id);

-- One row per live key; concurrent triggers meet on its primary key (INSERT ... ON CONFLICT).
CREATE TABLE idempotency_keys (
    environment  text NOT NULL,
    task_id      text NOT NULL,
    key          text NOT NULL,
    run_id       text NOT NULL,
    expires_at   double precision NOT NULL,
    PRIMARY KEY (environment, task_id, key)
);

CREATE TABLE workers (
    id            text PRIMARY KEY,
    environment   text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    address       text,              -- where to send a wake-up datagram (SQLite); informational here
    queues        jsonb NOT NULL,
    machine       text NOT NULL,
    version       text,
    started_at    double precision NOT NULL,
    last_seen_at  double precision NOT NULL
);
