//! Versioned migrations for the SQLite backend, applied at start in one transaction
//! each. A migration is never edited once released: add a new one.

use concord_core::Result;
use rusqlite::Connection;

use super::db_err;

pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    entity      TEXT,
    name        TEXT,
    instance    TEXT,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX tokens_instance ON tokens(instance);

CREATE TABLE entities (
    name             TEXT PRIMARY KEY,
    epoch            INTEGER NOT NULL DEFAULT 0,
    primary_instance TEXT,
    created_at       INTEGER NOT NULL
);

CREATE TABLE instances (
    id            TEXT PRIMARY KEY,
    entity        TEXT NOT NULL,
    role          TEXT NOT NULL,
    label         TEXT,
    state         TEXT NOT NULL,
    persistent    INTEGER NOT NULL,
    capabilities  TEXT NOT NULL,
    endpoint      TEXT,
    host          TEXT,
    version       TEXT,
    forked_from   TEXT,
    fork_point    INTEGER,
    meta          TEXT NOT NULL,
    ttl_ms        INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    lease_until   INTEGER NOT NULL,
    lease_owner   TEXT,
    ended_at      INTEGER
);
CREATE INDEX instances_entity ON instances(entity, state);
CREATE INDEX instances_live_lease ON instances(lease_until) WHERE state = 'live';

CREATE TABLE ghosts (
    key        TEXT PRIMARY KEY,
    instance   TEXT,
    entity     TEXT,
    reason     TEXT NOT NULL,
    host       TEXT,
    first_seen INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL,
    count      INTEGER NOT NULL
);

CREATE TABLE entity_state (
    entity     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (entity, key)
);

CREATE TABLE events (
    seq    INTEGER PRIMARY KEY,
    topic  TEXT NOT NULL,
    time   INTEGER NOT NULL,
    source TEXT NOT NULL,
    data   TEXT NOT NULL
);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE log_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE INDEX events_time ON events(time);

CREATE TABLE messages (
    id            TEXT PRIMARY KEY,
    thread_id     TEXT NOT NULL,
    from_instance TEXT,
    from_entity   TEXT,
    to_addr       TEXT NOT NULL,
    subject       TEXT NOT NULL,
    body          TEXT NOT NULL,
    ack_required  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);

-- cursor is the seq of the message's sys.message.sent event (as in PostgreSQL).
CREATE TABLE inbox (
    instance   TEXT NOT NULL,
    message_id TEXT NOT NULL,
    cursor     INTEGER NOT NULL,
    acked_at   INTEGER,
    PRIMARY KEY (instance, message_id)
);
CREATE INDEX inbox_instance ON inbox(instance, cursor);
"#,
    ),
    (
        3,
        r#"
-- rowid (implicit) orders tasks of equal priority oldest first.
CREATE TABLE tasks (
    id              TEXT PRIMARY KEY,
    queue           TEXT NOT NULL,
    state           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    payload         TEXT NOT NULL,
    requires        TEXT NOT NULL,
    target          TEXT,
    attempt         INTEGER NOT NULL,
    max_attempts    INTEGER NOT NULL,
    backoff_ms      INTEGER NOT NULL,
    timeout_ms      INTEGER,
    claimed_by      TEXT,
    claim           TEXT,
    lease_ms        INTEGER,
    lease_until     INTEGER,
    progress        TEXT,
    result          TEXT,
    error           TEXT,
    idempotency_key TEXT UNIQUE,
    not_before      INTEGER NOT NULL,
    deps            INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER
);
CREATE INDEX tasks_claimable ON tasks(queue, priority DESC) WHERE state IN ('pending', 'scheduled', 'failed');
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
    payload          TEXT NOT NULL,
    every_ms         INTEGER,
    cron             TEXT,
    priority         INTEGER NOT NULL,
    requires         TEXT NOT NULL,
    max_attempts     INTEGER NOT NULL,
    next_due         INTEGER NOT NULL,
    last_enqueued_at INTEGER,
    created_at       INTEGER NOT NULL
);
"#,
    ),
    // 3 is the work queue's (built in parallel); migrations apply in list order.
    (
        4,
        r#"
-- Shared memory (DESIGN §5). seq: memory-log position of the creation;
-- closed_seq: of the close; changed_seq: of the latest change (the feed the
-- recall index follows). lineage: the id of version 1 (history).
CREATE TABLE memories (
    id              TEXT PRIMARY KEY,
    lineage         TEXT NOT NULL,
    space           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    text            TEXT NOT NULL,
    tags            TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    visibility      TEXT NOT NULL,
    owner_instance  TEXT,
    owner_entity    TEXT,
    writer_instance TEXT,
    writer_entity   TEXT,
    provenance      TEXT NOT NULL,
    content_hash    TEXT NOT NULL,
    version         INTEGER NOT NULL,
    supersedes      TEXT,
    superseded_by   TEXT,
    valid_at        INTEGER NOT NULL,
    invalid_at      INTEGER,
    created_at      INTEGER NOT NULL,
    seq             INTEGER NOT NULL UNIQUE,
    closed_seq      INTEGER,
    changed_seq     INTEGER NOT NULL,
    purged          INTEGER NOT NULL DEFAULT 0,
    embedding       BLOB,
    embedding_dim   INTEGER,
    embed_pending   INTEGER NOT NULL DEFAULT 0,
    idem_actor      TEXT,
    idempotency_key TEXT
);
CREATE INDEX memories_changed ON memories(changed_seq);
CREATE INDEX memories_lineage ON memories(lineage, version);
CREATE INDEX memories_dedup ON memories(space, content_hash) WHERE invalid_at IS NULL;
CREATE INDEX memories_space ON memories(space, seq);
CREATE INDEX memories_pending ON memories(seq) WHERE embed_pending = 1;
CREATE UNIQUE INDEX memories_idem ON memories(idem_actor, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE memory_counter (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO memory_counter (id, seq) VALUES (1, 0);

-- The embedding dimension of each space, fixed by its first vector.
CREATE TABLE memory_spaces (
    space TEXT PRIMARY KEY,
    dim   INTEGER NOT NULL
);

CREATE TABLE trust (
    entity     TEXT PRIMARY KEY,
    trusts     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE circles (
    name       TEXT PRIMARY KEY,
    members    TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
"#,
    ),
    (
        5,
        r#"
CREATE TABLE dispatches (
    id          TEXT PRIMARY KEY,
    command     TEXT NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    result      TEXT,
    outcome     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    deadline    INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX dispatches_running ON dispatches(deadline) WHERE state = 'running';
CREATE TABLE dispatch_peers (
    dispatch TEXT NOT NULL,
    instance TEXT NOT NULL,
    task     TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (dispatch, instance)
);
"#,
    ),
    (
        6,
        r#"
CREATE TABLE observations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    subject     TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    latency_ms  INTEGER,
    instance    TEXT NOT NULL,
    entity      TEXT,
    host        TEXT,
    detail      TEXT,
    probe_id    TEXT,
    recorded_at INTEGER NOT NULL
);
CREATE INDEX observations_subject ON observations(subject, recorded_at);
CREATE TABLE breakers (
    subject          TEXT PRIMARY KEY,
    state            TEXT NOT NULL,
    opened_at        INTEGER,
    retry_at         INTEGER,
    opened_by        TEXT NOT NULL,
    probe_id         TEXT,
    probe_expires_at INTEGER,
    since            INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX breakers_open ON breakers(retry_at) WHERE state = 'open';
CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    resource        TEXT NOT NULL,
    mode            TEXT NOT NULL,
    holder          TEXT NOT NULL,
    entity          TEXT,
    fence           INTEGER NOT NULL,
    reason          TEXT,
    idempotency_key TEXT,
    acquired_at     INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    state           TEXT NOT NULL,
    ended_at        INTEGER
);
CREATE INDEX leases_held ON leases(expires_at) WHERE state = 'held';
CREATE INDEX leases_holder ON leases(holder) WHERE state = 'held';
CREATE TABLE lease_counter (id INTEGER PRIMARY KEY, fence INTEGER NOT NULL);
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
    kind       TEXT NOT NULL,
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    result     INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, scope, key)
);
CREATE INDEX request_keys_created ON request_keys(created_at);
"#,
    ),
    (
        8,
        r#"
-- Fewer B-trees on the hot table. The single writer maintains every index a
-- task's row meets on each enqueue, claim and completion, and each dirty index
-- page is one more WAL frame per commit (DESIGN §10 queue budgets):
--   * the idempotency key was a UNIQUE column, whose index held an entry for
--     every task, keyless ones included; it is now a partial unique index;
--   * tasks_claimed_by served only releasing an ended instance's claims, which
--     now walks tasks_running_lease (the running tasks, a small set).
--   * the payload moves to task_payloads, written once at enqueue: a claim or
--     a completion rewrote the whole row, payload included (1 KiB in the
--     benchmark), and three such rows filled a page, so every commit dirtied
--     a page per few tasks in flight. The row that changes is now small.
--   * tasks_queue_state served only the stats, which now read task_counts;
--   * events_time served only retention by age, which now bisects events by
--     seq (the writer stamps them in order): one more page per commit, gone.
-- (Keeping task_counts by triggers was tried and was slower than the index: a
-- trigger runs per row; the writer's code adds up a job's moves first.)
-- SQLite cannot drop a column's UNIQUE constraint, so the table is rebuilt with
-- its rowids kept: they order equal-priority tasks oldest first, and key the
-- payloads.
CREATE TABLE tasks_rebuilt (
    id              TEXT PRIMARY KEY,
    queue           TEXT NOT NULL,
    state           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    requires        TEXT NOT NULL,
    target          TEXT,
    attempt         INTEGER NOT NULL,
    max_attempts    INTEGER NOT NULL,
    backoff_ms      INTEGER NOT NULL,
    timeout_ms      INTEGER,
    claimed_by      TEXT,
    claim           TEXT,
    lease_ms        INTEGER,
    lease_until     INTEGER,
    progress        TEXT,
    result          TEXT,
    error           TEXT,
    idempotency_key TEXT,
    not_before      INTEGER NOT NULL,
    deps            INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER
);
INSERT INTO tasks_rebuilt (rowid, id, queue, state, priority, requires, target, attempt,
    max_attempts, backoff_ms, timeout_ms, claimed_by, claim, lease_ms, lease_until, progress, result,
    error, idempotency_key, not_before, deps, created_at, updated_at, completed_at)
SELECT rowid, id, queue, state, priority, requires, target, attempt,
    max_attempts, backoff_ms, timeout_ms, claimed_by, claim, lease_ms, lease_until, progress, result,
    error, idempotency_key, not_before, deps, created_at, updated_at, completed_at
FROM tasks;
-- task is the task's rowid; the two are deleted together (prune).
CREATE TABLE task_payloads (
    task    INTEGER PRIMARY KEY,
    payload TEXT NOT NULL
);
INSERT INTO task_payloads (task, payload) SELECT rowid, payload FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_rebuilt RENAME TO tasks;
CREATE INDEX tasks_claimable ON tasks(queue, priority DESC) WHERE state IN ('pending', 'scheduled', 'failed');
CREATE INDEX tasks_running_lease ON tasks(lease_until) WHERE state = 'running';
CREATE INDEX tasks_waiting ON tasks(not_before) WHERE state IN ('scheduled', 'failed');
CREATE INDEX tasks_finished ON tasks(completed_at) WHERE completed_at IS NOT NULL;
CREATE UNIQUE INDEX tasks_idempotency ON tasks(idempotency_key) WHERE idempotency_key IS NOT NULL;
DROP INDEX events_time;

-- Tasks per queue and state, for the stats. The writer keeps it (one row update
-- per queue and state a job touched): the stats read a few rows instead of
-- walking every task ever kept, and no (queue, state) index takes three pages
-- of every commit.
CREATE TABLE task_counts (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (queue, state)
) WITHOUT ROWID;
INSERT INTO task_counts (queue, state, n) SELECT queue, state, count(*) FROM tasks GROUP BY queue, state;

"#,
    ),
    (
        9,
        r#"
-- The claimable index's condition as comparisons, not `IN (...)`: SQLite builds
-- a temporary table for an IN list of three or more constants each time a
-- statement evaluates one, and every INSERT and UPDATE of a task evaluates the
-- condition of every partial index on it. Queries must name the condition in
-- the same form (`queue::CLAIMABLE`) for the planner to use the index.
DROP INDEX tasks_claimable;
CREATE INDEX tasks_claimable ON tasks(queue, priority DESC)
    WHERE state = 'pending' OR state = 'scheduled' OR state = 'failed';
"#,
    ),
];

/// Applies the migrations not yet recorded in `schema_migrations`.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .map_err(db_err)?;
    for (version, sql) in MIGRATIONS {
        let tx = conn.transaction().map_err(db_err)?;
        let done: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [version],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if !done {
            tx.execute_batch(sql).map_err(db_err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                rusqlite::params![version, concord_core::Timestamp::now().millis()],
            )
            .map_err(db_err)?;
            tracing::info!(version, "applied sqlite migration");
        }
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    fn apply_through(conn: &Connection, last: i64) {
        for (_, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= last) {
            conn.execute_batch(sql).unwrap();
        }
    }

    fn insert_task(conn: &Connection, id: &str, queue: &str, state: &str, key: Option<&str>) {
        conn.execute(
            "INSERT INTO tasks (id, queue, state, priority, payload, requires, attempt, max_attempts, \
             backoff_ms, idempotency_key, not_before, deps, created_at, updated_at) \
             VALUES (?1, ?2, ?3, 0, '{}', '[]', 0, 3, 1000, ?4, 0, 0, 1, 1)",
            params![id, queue, state, key],
        )
        .unwrap();
    }

    /// Version 8 rebuilds the tasks table: existing tasks keep their rowids (the
    /// FIFO order of claims) and payloads, their counts start right, their idempotency
    /// keys stay unique, and the two lookups that lost an index still walk a narrow
    /// one.
    #[test]
    fn the_tasks_rebuild_keeps_order_and_keys() {
        let conn = Connection::open_in_memory().unwrap();
        apply_through(&conn, 7);
        insert_task(&conn, "tsk_b", "jobs", "pending", Some("k1"));
        insert_task(&conn, "tsk_a", "jobs", "completed", None);
        insert_task(&conn, "tsk_c", "mail", "running", None);
        let rowids = |conn: &Connection| -> Vec<(i64, String)> {
            let mut s = conn
                .prepare("SELECT rowid, id FROM tasks ORDER BY rowid")
                .unwrap();
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)));
            rows.unwrap().map(|r| r.unwrap()).collect()
        };
        conn.execute("UPDATE tasks SET payload = '{\"n\":' || rowid || '}'", [])
            .unwrap();
        let before = rowids(&conn);
        apply_only(&conn, 8);
        assert_eq!(rowids(&conn), before);
        let payloads: Vec<(String, String)> = {
            let mut s = conn
                .prepare("SELECT t.id, p.payload FROM tasks t JOIN task_payloads p ON p.task = t.rowid ORDER BY t.rowid")
                .unwrap();
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)));
            rows.unwrap().map(|r| r.unwrap()).collect()
        };
        let expected: Vec<(String, String)> = before
            .iter()
            .map(|(rowid, id)| (id.clone(), format!("{{\"n\":{rowid}}}")))
            .collect();
        assert_eq!(
            payloads, expected,
            "every payload moved to its task's rowid"
        );
        let counts: Vec<(String, String, i64)> = {
            let mut s = conn
                .prepare("SELECT queue, state, n FROM task_counts ORDER BY queue, state")
                .unwrap();
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)));
            rows.unwrap().map(|r| r.unwrap()).collect()
        };
        let n = |q: &str, s: &str| (q.to_string(), s.to_string(), 1);
        assert_eq!(
            counts,
            [
                n("jobs", "completed"),
                n("jobs", "pending"),
                n("mail", "running")
            ],
            "the counts start from the tasks there are"
        );
        // The idempotency key is still unique; keyless tasks are not in its index.
        let dup = conn.execute(
            "INSERT INTO tasks (id, queue, state, priority, requires, attempt, max_attempts, \
             backoff_ms, idempotency_key, not_before, deps, created_at, updated_at) \
             VALUES ('tsk_d', 'jobs', 'pending', 0, '[]', 0, 3, 1000, 'k1', 0, 0, 1, 1)",
            [],
        );
        assert!(dup.is_err(), "a second task with key k1 was accepted");
        let walks = |sql: &str| -> String {
            let mut s = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = s.query_map([], |r| r.get::<_, String>(3));
            rows.unwrap()
                .map(|r| r.unwrap())
                .collect::<Vec<_>>()
                .join("; ")
        };
        // Releasing an ended instance's claims walks the running tasks, not the table.
        let plan = walks("SELECT id FROM tasks WHERE state = 'running' AND claimed_by = 'ins_x'");
        assert!(plan.contains("tasks_running_lease"), "{plan}");
        let plan = walks("SELECT id FROM tasks WHERE idempotency_key = 'k1'");
        assert!(plan.contains("tasks_idempotency"), "{plan}");
    }

    /// Writing a task evaluates the condition of every partial index on it; none
    /// may need a temporary table per statement (see version 9).
    #[test]
    fn writing_a_task_builds_no_temporary_table() {
        let conn = Connection::open_in_memory().unwrap();
        apply_through(&conn, i64::MAX);
        let opcodes = |sql: &str| -> Vec<String> {
            let mut s = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let rows = s.query_map([], |r| r.get::<_, String>(1));
            rows.unwrap().map(|r| r.unwrap()).collect()
        };
        for sql in [
            "INSERT INTO tasks (id, queue, state, priority, requires, attempt, max_attempts, \
             backoff_ms, not_before, deps, created_at, updated_at) \
             VALUES ('tsk_a', 'jobs', 'pending', 0, '[]', 0, 3, 1000, 0, 0, 1, 1)",
            "UPDATE tasks SET state = 'running', claim = 'clm_a' WHERE id = 'tsk_a'",
            "UPDATE tasks SET state = 'completed', completed_at = 2 WHERE id = 'tsk_a'",
        ] {
            let ops = opcodes(sql);
            assert!(
                !ops.iter().any(|o| o == "OpenEphemeral"),
                "{sql} builds a temporary table: {ops:?}"
            );
        }
    }

    fn apply_only(conn: &Connection, version: i64) {
        for (_, sql) in MIGRATIONS.iter().filter(|(v, _)| *v == version) {
            conn.execute_batch(sql).unwrap();
        }
    }
}
