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
//! [`Pacing::min_interval`], and stops when the writer does (the nudge channel closes).
//!
//! A checkpoint beside a busy writer never finishes the log: frames arrive while
//! it copies, and SQLite starts the log over only when a writer finds it fully
//! copied. Left alone, the log grew by 120 MB/s under the batch queue benchmark,
//! and every read that misses it searches all of its index. So when a
//! checkpoint leaves more than [`Pacing::restart_frames`] in the log, the checkpointer
//! asks the writer to catch up: between two transactions, with nothing being
//! appended, the writer's own PASSIVE checkpoint copies the little that is left,
//! and its next transaction writes from the start of the log again.
//!
//! The checkpointer can be starved, though: on two busy cores it may not run for
//! a long while, and then nobody asked. So the writer also watches the log's
//! length itself (SQLite's WAL hook reports it after each commit) and catches up
//! unasked once the log holds twice [`Pacing::restart_frames`].

use rusqlite::Connection;
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often checkpoints run and when the writer is asked to finish one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    /// Checkpoints are at least this far apart, so a busy writer causes one
    /// every so often rather than one per commit.
    pub(crate) min_interval: Duration,
    /// Frames (pages) left in the log after a checkpoint past which the writer
    /// is asked to finish it.
    pub(crate) restart_frames: i64,
}

/// 100 ms; 8,192 frames, 32 MiB of 4 KiB pages (SQLite's own checkpoint
/// threshold is 1,000 frames, taken on the writer in every case).
pub(crate) const PACING: Pacing = Pacing {
    min_interval: Duration::from_millis(100),
    restart_frames: 8192,
};

/// The log file is cut back to this size when it starts over, so that a burst
/// does not leave a large file behind.
pub(crate) const LOG_SIZE_LIMIT: i64 = 64 << 20;

/// The writer's handle: nudges after commits, never blocks.
pub(crate) struct Nudge {
    nudges: SyncSender<()>,
    catch_up: Arc<AtomicBool>,
    /// Log frames past which the writer catches up unasked.
    overdue_frames: i64,
}

thread_local! {
    /// Frames in the log after the last commit on this thread's connection, as
    /// SQLite's WAL hook reported them. Thread-local because the hook is a plain
    /// function, and only the writer thread commits on the write connection.
    static LOG_FRAMES: Cell<i64> = const { Cell::new(0) };
}

fn note_log_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    LOG_FRAMES.with(|f| f.set(i64::from(frames)));
    Ok(())
}

/// Has the write connection report the log's length after each commit. Call it
/// after `wal_autocheckpoint = 0`: SQLite's automatic checkpoint is itself a WAL
/// hook, and setting that pragma replaces ours.
pub(crate) fn watch_log(conn: &Connection) {
    conn.wal_hook(Some(note_log_frames));
}

impl Nudge {
    pub(crate) fn commit_done(&self) {
        // Full means a nudge is already waiting; disconnected means the
        // checkpointer could not start, and SQLite's own checkpoint is back on.
        let _ = self.nudges.try_send(());
    }

    /// Whether the writer should finish a checkpoint itself now (see the module
    /// doc): once per request of the checkpointer, and after every commit while
    /// the log is overdue. Repeating that is cheap when a reader's snapshot keeps
    /// the log from starting over: a checkpoint with nothing left to copy does
    /// no I/O.
    pub(crate) fn take_catch_up(&self) -> bool {
        let asked = self.catch_up.swap(false, Ordering::Relaxed);
        asked || LOG_FRAMES.with(Cell::get) > self.overdue_frames
    }
}

/// The writer's catch-up: a PASSIVE checkpoint on its own connection between
/// transactions, so that nothing is appended while it copies.
pub(crate) fn catch_up(conn: &Connection) {
    if let Err(e) = passive(conn) {
        tracing::warn!("sqlite checkpoint (catch-up) failed: {e}");
    }
}

/// Runs a PASSIVE checkpoint; returns the frames in the log.
fn passive(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
}

/// Starts the checkpointer on its own connection to `path`, and returns the
/// writer's nudge. If it cannot start, the writer keeps SQLite's automatic
/// checkpoints (the caller leaves `wal_autocheckpoint` alone on `Err`).
pub(crate) fn start(path: &Path, pacing: Pacing) -> std::io::Result<Nudge> {
    let conn = Connection::open(path).map_err(std::io::Error::other)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(std::io::Error::other)?;
    let (tx, rx) = sync_channel(1);
    let catch_up = Arc::new(AtomicBool::new(false));
    let asks = catch_up.clone();
    std::thread::Builder::new()
        .name("concord-ckpt".into())
        .spawn(move || run(conn, rx, asks, pacing))?;
    Ok(Nudge {
        nudges: tx,
        catch_up,
        overdue_frames: 2 * pacing.restart_frames,
    })
}

fn run(conn: Connection, nudges: Receiver<()>, catch_up: Arc<AtomicBool>, pacing: Pacing) {
    let mut last = Instant::now() - pacing.min_interval;
    while nudges.recv().is_ok() {
        let since = last.elapsed();
        if since < pacing.min_interval {
            // Rate limiting, not a wait for some other thread: the commits that
            // arrive meanwhile are covered by the one checkpoint after it.
            std::thread::sleep(pacing.min_interval - since);
        }
        last = Instant::now();
        match passive(&conn) {
            Ok(frames) if frames > pacing.restart_frames => catch_up.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::warn!("sqlite checkpoint failed: {e}"),
        }
    }
    tracing::debug!("sqlite checkpointer stopped");
}

#[cfg(test)]
mod tests {
    use crate::sqlite::{Durability, SqliteStore};
    use crate::{EventStore, Store};
    use concord_core::api::EventSource;

    /// Publishes events `0..n` of `pad_len` bytes of padding, one after another.
    async fn publish_padded(store: &SqliteStore, n: usize, pad_len: usize) {
        let pad = "x".repeat(pad_len);
        for i in 0..n {
            store
                .publish(
                    "t.ck",
                    EventSource::default(),
                    serde_json::json!({"i": i, "pad": pad}),
                )
                .await
                .unwrap();
        }
    }

    /// The log file, and the times it started over: its header's checkpoint
    /// sequence number (bytes 12..16).
    fn read_log(dir: &tempfile::TempDir) -> (Vec<u8>, u32) {
        let wal = std::fs::read(dir.path().join("c.db-wal")).unwrap();
        let restarts = u32::from_be_bytes([wal[12], wal[13], wal[14], wal[15]]);
        (wal, restarts)
    }

    /// Writers that never pause and readers that never stop would keep a
    /// checkpoint from ever finishing the log; the writer's catch-up does, so
    /// the log starts over and its file stays near the restart threshold
    /// instead of holding every frame written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_log_starts_over_under_sustained_writes_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = std::sync::Arc::new(
            SqliteStore::open_with(
                &path,
                Durability::Normal,
                super::Pacing {
                    min_interval: std::time::Duration::from_millis(2),
                    restart_frames: 64,
                },
            )
            .unwrap(),
        );
        let pad = "x".repeat(3000);
        let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (store, writing) = (store.clone(), writing.clone());
            readers.push(tokio::spawn(async move {
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    store.last_event_seq().await.unwrap();
                    store.read_events(0, 1).await.unwrap();
                }
            }));
        }
        let mut writers = Vec::new();
        for w in 0..8 {
            let (store, pad) = (store.clone(), pad.clone());
            writers.push(tokio::spawn(async move {
                for i in 0..800 {
                    store
                        .publish(
                            "t.ck",
                            EventSource::default(),
                            serde_json::json!({"w": w, "i": i, "pad": pad}),
                        )
                        .await
                        .unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        writing.store(false, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }
        // The log's header counts the times it started over (its checkpoint
        // sequence number, bytes 12..16); that it did, many times, is what this
        // test is about. The file's size is bounded loosely: a thread descheduled
        // on a loaded 2-core machine (a reader inside its read transaction, or the
        // checkpointer) keeps the log from starting over meanwhile, and with a
        // build running beside the test such runs reached 12.7 MB. A log that
        // never starts over holds more than everything written (a 4 KiB page
        // and a frame header per 3,000-byte event, and the index pages).
        let written = 8 * 800 * 3000;
        let (wal, restarts) = read_log(&dir);
        assert!(
            restarts >= 3,
            "the log started over {restarts} times in {written} bytes of events"
        );
        let log = wal.len();
        assert!(
            log < written,
            "the log holds {log} bytes after {written} bytes of events"
        );
        assert_eq!(store.read_events(0, 10_000).await.unwrap().len(), 6400);
    }

    /// A checkpointer that never gets to run (here: it waits an hour between
    /// checkpoints, as a thread starved of CPU would) must not let the log grow
    /// without end: the writer sees the log's length after each commit and
    /// catches up unasked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_restarts_the_log_when_the_checkpointer_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open_with(
            &path,
            Durability::Normal,
            super::Pacing {
                min_interval: std::time::Duration::from_secs(3600),
                restart_frames: 64,
            },
        )
        .unwrap();
        publish_padded(&store, 1500, 3000).await;
        let written = 1500 * 3000;
        let (wal, restarts) = read_log(&dir);
        assert!(
            restarts >= 3,
            "the log started over {restarts} times in {written} bytes of events"
        );
        // Loosely: the checkpointer's one checkpoint, descheduled while it holds
        // the checkpoint lock, makes the writer's catch-ups wait (seen: 1.2 MB
        // with a build running beside the test, 0.5 MB otherwise); without the
        // catch-up it held 18.6 MB.
        assert!(
            wal.len() < written / 2,
            "the log holds {} bytes after {written} bytes of events",
            wal.len()
        );
        assert_eq!(store.read_events(0, 10_000).await.unwrap().len(), 1500);
    }

    /// The writer no longer checkpoints in COMMIT, so this thread must: after more
    /// than SQLite's 1,000-page threshold of writes, the pages reach the database
    /// file, and the events read back whole from the table and from memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_pages_reach_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path, Durability::Normal).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        publish_padded(&store, 3000, 2000).await;
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
