//! Versioned migrations for the PostgreSQL backend, applied at start. A migration
//! is never edited once released: add a new one.
//!
//! The logical schema is SQLite's, so the two backends answer identically:
//! timestamps are BIGINT milliseconds (the numbers `concord_core::presence`
//! computes with), and JSON values are stored as `json` (not `jsonb`), which keeps
//! the text as written: `jsonb` would refuse a `\u0000` inside a string that
//! SQLite accepts. Identifier and key columns use the "C" collation so that
//! `ORDER BY` sorts bytewise, as SQLite does, whatever the database's locale.
//!
//! Several replicas start at once against one database: the whole migration runs
//! in one transaction under an advisory lock keyed on the schema, so exactly one
//! of them applies each version and the others find it done.

use super::pg_err;
use concord_core::{Error, Result};

pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT COLLATE "C" NOT NULL,
    entity      TEXT COLLATE "C",
    name        TEXT,
    instance    TEXT COLLATE "C",
    secret_hash TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX tokens_instance ON tokens(instance);

CREATE TABLE entities (
    name             TEXT COLLATE "C" PRIMARY KEY,
    epoch            BIGINT NOT NULL DEFAULT 0,
    primary_instance TEXT COLLATE "C",
    created_at       BIGINT NOT NULL
);

CREATE TABLE instances (
    id            TEXT COLLATE "C" PRIMARY KEY,
    entity        TEXT COLLATE "C" NOT NULL,
    role          TEXT COLLATE "C" NOT NULL,
    label         TEXT,
    state         TEXT COLLATE "C" NOT NULL,
    persistent    BOOLEAN NOT NULL,
    capabilities  JSON NOT NULL,
    endpoint      TEXT,
    host          TEXT,
    version       TEXT COLLATE "C",
    forked_from   TEXT COLLATE "C",
    fork_point    BIGINT,
    meta          JSON NOT NULL,
    ttl_ms        BIGINT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL,
    lease_until   BIGINT NOT NULL,
    lease_owner   TEXT,
    ended_at      BIGINT
);
CREATE INDEX instances_entity ON instances(entity, state);
CREATE INDEX instances_live_lease ON instances(lease_until) WHERE state = 'live';

CREATE TABLE ghosts (
    key        TEXT COLLATE "C" PRIMARY KEY,
    instance   TEXT COLLATE "C",
    entity     TEXT COLLATE "C",
    reason     TEXT COLLATE "C" NOT NULL,
    host       TEXT,
    first_seen BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL,
    count      BIGINT NOT NULL
);

CREATE TABLE entity_state (
    entity     TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    value      JSON NOT NULL,
    revision   BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (entity, key)
);

CREATE TABLE events (
    seq    BIGINT PRIMARY KEY,
    topic  TEXT COLLATE "C" NOT NULL,
    time   BIGINT NOT NULL,
    source JSON NOT NULL,
    data   JSON NOT NULL
);

-- The event log's positions come from this one row, updated by each appending
-- transaction just before it commits (not from a sequence): the row lock makes
-- appenders commit one after another in seq order, so a reader that has seen
-- seq N can never later find a smaller seq appear (DESIGN §2 Storage).
CREATE TABLE event_counter (
    id  SMALLINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO event_counter (id, seq) VALUES (1, 0);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE log_meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE INDEX events_time ON events(time);

CREATE TABLE messages (
    id            TEXT PRIMARY KEY,
    thread_id     TEXT NOT NULL,
    from_instance TEXT,
    from_entity   TEXT,
    to_addr       TEXT NOT NULL,
    subject       TEXT NOT NULL,
    body          JSON NOT NULL,
    ack_required  BOOLEAN NOT NULL,
    created_at    BIGINT NOT NULL
);

-- cursor is the seq of the message's sys.message.sent event: log positions become
-- visible in order, so a reader reading after a cursor never skips a late commit.
CREATE TABLE inbox (
    instance   TEXT NOT NULL,
    message_id TEXT NOT NULL,
    cursor     BIGINT NOT NULL,
    acked_at   BIGINT,
    PRIMARY KEY (instance, message_id)
);
CREATE INDEX inbox_instance ON inbox(instance, cursor);
"#,
    ),
    (
        3,
        r#"
CREATE TABLE tasks (
    id              TEXT PRIMARY KEY,
    seq             BIGSERIAL NOT NULL,
    queue           TEXT NOT NULL,
    state           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    payload         JSON NOT NULL,
    requires        TEXT[] NOT NULL,
    target          TEXT,
    attempt         INTEGER NOT NULL,
    max_attempts    INTEGER NOT NULL,
    backoff_ms      BIGINT NOT NULL,
    timeout_ms      BIGINT,
    claimed_by      TEXT,
    claim           TEXT,
    lease_ms        BIGINT,
    lease_until     BIGINT,
    progress        JSON,
    result          JSON,
    error           TEXT,
    idempotency_key TEXT UNIQUE,
    not_before      BIGINT NOT NULL,
    deps            INTEGER NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    completed_at    BIGINT
);
CREATE INDEX tasks_claimable ON tasks(queue, priority DESC, seq) WHERE state IN ('pending', 'scheduled', 'failed');
CREATE INDEX tasks_running_lease ON tasks(lease_until) WHERE state = 'running';
CREATE INDEX tasks_waiting ON tasks(not_before) WHERE state IN ('scheduled', 'failed');
CREATE INDEX tasks_claimed_by ON tasks(claimed_by) WHERE state = 'running';
CREATE INDEX tasks_queue_state ON tasks(queue, state);
CREATE INDEX tasks_finished ON tasks(completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE task_deps (
    task TEXT NOT NULL,
    dep  TEXT NOT NULL,
    PRIMARY KEY (task, dep)
);
CREATE INDEX task_deps_dep ON task_deps(dep);

CREATE TABLE schedules (
    name             TEXT PRIMARY KEY,
    queue            TEXT NOT NULL,
    payload          JSON NOT NULL,
    every_ms         BIGINT,
    cron             TEXT,
    priority         INTEGER NOT NULL,
    requires         TEXT[] NOT NULL,
    max_attempts     INTEGER NOT NULL,
    next_due         BIGINT NOT NULL,
    last_enqueued_at BIGINT,
    created_at       BIGINT NOT NULL
);
"#,
    ),
    // 3 is the work queue's (built in parallel); migrations apply in list order.
    (
        4,
        r#"
-- Shared memory (DESIGN §5), as in SQLite. seq: memory-log position of the
-- creation; closed_seq: of the close; changed_seq: of the latest change (the
-- feed the recall index follows). lineage: the id of version 1 (history).
CREATE TABLE memories (
    id              TEXT COLLATE "C" PRIMARY KEY,
    lineage         TEXT COLLATE "C" NOT NULL,
    space           TEXT COLLATE "C" NOT NULL,
    kind            TEXT COLLATE "C" NOT NULL,
    text            TEXT NOT NULL,
    tags            JSON NOT NULL,
    metadata        JSON NOT NULL,
    visibility      TEXT COLLATE "C" NOT NULL,
    owner_instance  TEXT COLLATE "C",
    owner_entity    TEXT COLLATE "C",
    writer_instance TEXT COLLATE "C",
    writer_entity   TEXT COLLATE "C",
    provenance      JSON NOT NULL,
    content_hash    TEXT COLLATE "C" NOT NULL,
    version         BIGINT NOT NULL,
    supersedes      TEXT COLLATE "C",
    superseded_by   TEXT COLLATE "C",
    valid_at        BIGINT NOT NULL,
    invalid_at      BIGINT,
    created_at      BIGINT NOT NULL,
    seq             BIGINT NOT NULL UNIQUE,
    closed_seq      BIGINT,
    changed_seq     BIGINT NOT NULL,
    purged          BOOLEAN NOT NULL DEFAULT FALSE,
    embedding       BYTEA,
    embedding_dim   INTEGER,
    embed_pending   BOOLEAN NOT NULL DEFAULT FALSE,
    idem_actor      TEXT COLLATE "C",
    idempotency_key TEXT COLLATE "C"
);
CREATE INDEX memories_changed ON memories(changed_seq);
CREATE INDEX memories_lineage ON memories(lineage, version);
CREATE INDEX memories_dedup ON memories(space, content_hash) WHERE invalid_at IS NULL;
CREATE INDEX memories_space ON memories(space, seq);
CREATE INDEX memories_pending ON memories(seq) WHERE embed_pending;
CREATE UNIQUE INDEX memories_idem ON memories(idem_actor, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- The memory log's positions, like event_counter: each appending transaction
-- locks this row until COMMIT, so positions become visible in order.
CREATE TABLE memory_counter (
    id  SMALLINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL
);
INSERT INTO memory_counter (id, seq) VALUES (1, 0);

CREATE TABLE memory_spaces (
    space TEXT COLLATE "C" PRIMARY KEY,
    dim   INTEGER NOT NULL
);

CREATE TABLE trust (
    entity     TEXT COLLATE "C" PRIMARY KEY,
    trusts     JSON NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE circles (
    name       TEXT COLLATE "C" PRIMARY KEY,
    members    JSON NOT NULL,
    updated_at BIGINT NOT NULL
);
"#,
    ),
    (
        5,
        r#"
CREATE TABLE dispatches (
    id          TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    spec        JSON NOT NULL,
    state       TEXT NOT NULL,
    result      JSON,
    outcome     JSON NOT NULL,
    created_at  BIGINT NOT NULL,
    deadline    BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX dispatches_running ON dispatches(deadline) WHERE state = 'running';
CREATE TABLE dispatch_peers (
    dispatch TEXT NOT NULL,
    instance TEXT NOT NULL,
    task     TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (dispatch, instance)
);
"#,
    ),
    (
        6,
        r#"
CREATE TABLE observations (
    id          BIGSERIAL PRIMARY KEY,
    subject     TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    latency_ms  BIGINT,
    instance    TEXT NOT NULL,
    entity      TEXT,
    host        TEXT,
    detail      TEXT,
    probe_id    TEXT,
    recorded_at BIGINT NOT NULL
);
CREATE INDEX observations_subject ON observations(subject, recorded_at);
CREATE TABLE breakers (
    subject          TEXT COLLATE "C" PRIMARY KEY,
    state            TEXT NOT NULL,
    opened_at        BIGINT,
    retry_at         BIGINT,
    opened_by        JSON NOT NULL,
    probe_id         TEXT,
    probe_expires_at BIGINT,
    since            BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX breakers_open ON breakers(retry_at) WHERE state = 'open';
CREATE TABLE leases (
    id              TEXT COLLATE "C" PRIMARY KEY,
    resource        TEXT NOT NULL,
    mode            TEXT NOT NULL,
    holder          TEXT NOT NULL,
    entity          TEXT,
    fence           BIGINT NOT NULL,
    reason          TEXT,
    idempotency_key TEXT,
    acquired_at     BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    state           TEXT NOT NULL,
    ended_at        BIGINT
);
CREATE INDEX leases_held ON leases(expires_at) WHERE state = 'held';
CREATE INDEX leases_holder ON leases(holder) WHERE state = 'held';
CREATE TABLE lease_counter (id INTEGER PRIMARY KEY, fence BIGINT NOT NULL);
INSERT INTO lease_counter (id, fence) VALUES (1, 0);
"#,
    ),
    (
        7,
        r#"
-- Idempotency keys of writes that have no row of their own to carry one
-- (event publishes, observations): kind, the caller's scope, the key, and
-- the result to answer again (an event's seq). Pruned with the event log.
CREATE TABLE request_keys (
    kind       TEXT COLLATE "C" NOT NULL,
    scope      TEXT COLLATE "C" NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    result     BIGINT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, scope, key)
);
CREATE INDEX request_keys_created ON request_keys(created_at);
"#,
    ),
    (
        8,
        r#"
-- Event seqs come from a sequence, taken just before COMMIT without a lock, so
-- that appending transactions commit in parallel; readers are served up to the
-- delivery horizon, below which every seq is final (postgres/horizon.rs). The
-- counter row made every appender wait for the one before it to commit.
-- Replicas of an older version must be stopped before this one starts: they
-- would still take seqs from the dropped counter.
CREATE SEQUENCE event_seq AS BIGINT;
SELECT setval('event_seq', GREATEST(seq, 1), seq > 0) FROM event_counter;
DROP TABLE event_counter;
"#,
    ),
];

/// Creates the schema if asked, applies the migrations not yet recorded in
/// `schema_migrations`, and returns the schema's name (the store's key in NOTIFY
/// payloads).
pub(crate) async fn migrate(
    client: &mut deadpool_postgres::Client,
    schema: Option<&str>,
) -> Result<String> {
    let tx = client.transaction().await.map_err(|e| pg_err(&e))?;
    let key: String = match schema {
        Some(s) => s.to_string(),
        None => tx
            .query_one("SELECT COALESCE(current_schema(), '')", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_err(&e))?,
    };
    if key.is_empty() {
        return Err(Error::unavailable(
            "database unavailable: no schema of the search_path exists (pass a schema)",
        ));
    }
    // Held until COMMIT; the two-key form keeps Concord's locks apart from any
    // single-key advisory locks other software on the database may take.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('concord.migrate'), hashtext($1))",
        &[&key],
    )
    .await
    .map_err(|e| pg_err(&e))?;
    if schema.is_some() {
        // The name was checked to be a plain lowercase identifier.
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {key}; SET LOCAL search_path TO {key}"
        ))
        .await
        .map_err(|e| pg_err(&e))?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await
    .map_err(|e| pg_err(&e))?;
    for (version, sql) in MIGRATIONS {
        let done: bool = tx
            .query_one(
                "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = $1)",
                &[version],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_err(&e))?;
        if done {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| pg_err(&e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) \
             VALUES ($1, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)",
            &[version],
        )
        .await
        .map_err(|e| pg_err(&e))?;
        tracing::info!(version, schema = %key, "applied postgres migration");
    }
    tx.commit().await.map_err(|e| pg_err(&e))?;
    Ok(key)
}
