//! The WAL checkpointer: copies committed pages from the write-ahead log into the
//! database file on its own thread and connection.
//!
//! Why not SQLite's automatic checkpoint: that one runs inside the COMMIT that
//! pushes the log past 1,000 pages, on the writer thread, and with
//! `--durability full` it writes and fsyncs the database file before that commit
//! returns. Every write queued behind it waited too: at 5,000 events/s that was
//! the whole p99 of publish → delivery (DESIGN §10). A PASSIVE checkpoint on
//! another connection runs beside the writer (WAL lets one writer and one
//! checkpointer work at once), so commits only ever wait for their own fsync.
//!
//! It runs when nudged by the writer after a commit, at most every
//! [`MIN_INTERVAL`], and stops when the writer does (the nudge channel closes).

use rusqlite::Connection;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

/// Checkpoints are at least this far apart, so a busy writer causes one every so
/// often rather than one per commit.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The writer's handle: nudges after commits, never blocks.
pub(crate) struct Nudge(SyncSender<()>);

impl Nudge {
    pub(crate) fn commit_done(&self) {
        // Full means a nudge is already waiting; disconnected means the
        // checkpointer could not start, and SQLite's own checkpoint is back on.
        let _ = self.0.try_send(());
    }
}

/// Starts the checkpointer on its own connection to `path`, and returns the
/// writer's nudge. If it cannot start, the writer keeps SQLite's automatic
/// checkpoints (the caller leaves `wal_autocheckpoint` alone on `Err`).
pub(crate) fn start(path: &Path) -> std::io::Result<Nudge> {
    let conn = Connection::open(path).map_err(std::io::Error::other)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(std::io::Error::other)?;
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("concord-ckpt".into())
        .spawn(move || run(conn, rx))?;
    Ok(Nudge(tx))
}

fn run(conn: Connection, nudges: Receiver<()>) {
    let mut last = Instant::now() - MIN_INTERVAL;
    while nudges.recv().is_ok() {
        let since = last.elapsed();
        if since < MIN_INTERVAL {
            // Rate limiting, not a wait for some other thread: the commits that
            // arrive meanwhile are covered by the one checkpoint after it.
            std::thread::sleep(MIN_INTERVAL - since);
        }
        last = Instant::now();
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("sqlite checkpoint failed: {e}");
        }
    }
    tracing::debug!("sqlite checkpointer stopped");
}

#[cfg(test)]
mod tests {
    use crate::sqlite::{Durability, SqliteStore};
    use crate::{EventStore, Store};
    use concord_core::api::EventSource;

    /// The writer no longer checkpoints in COMMIT, so this thread must: after more
    /// than SQLite's 1,000-page threshold of writes, the pages reach the database
    /// file, and the events read back whole from the table and from memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_pages_reach_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path, Durability::Normal).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let pad = "x".repeat(2000);
        for i in 0..3000 {
            store
                .publish(
                    "t.ck",
                    EventSource::default(),
                    serde_json::json!({"i": i, "pad": pad}),
                )
                .await
                .unwrap();
        }
        // Wait for the checkpointer's copy (bounded; it runs every 100 ms while
        // nudged), by watching the database file grow.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let now = std::fs::metadata(&path).unwrap().len();
            if now > before + 3000 * 2000 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint: database file {now} bytes"
            );
            // Another commit nudges it again.
            store
                .publish("t.ck", EventSource::default(), serde_json::json!({}))
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let events = store.read_events(0, 5000).await.unwrap();
        assert!(events.len() >= 3000);
        assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(events[2999].data["i"], 2999);
    }
}
