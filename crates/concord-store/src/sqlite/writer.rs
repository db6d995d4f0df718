//! The group-commit writer (DESIGN §2 Storage).
//!
//! SQLite allows one writer at a time, so instead of letting request tasks contend
//! for the write lock, one dedicated thread owns the write connection and drains a
//! channel of write jobs, running as many as are queued inside one transaction. Each
//! job runs under its own SAVEPOINT, so a job that fails (a fenced write, a held
//! primary) rolls back alone while its neighbours commit. Replies are sent only after
//! the COMMIT returned: an acknowledged write is on disk (fsync'd with
//! `--durability full`). Under load one fsync then covers hundreds of writes.
//!
//! A std thread, not a tokio task: rusqlite calls block, and a commit with fsync can
//! take milliseconds that must not stall the async workers.

use super::counts::deferred as counts;
use super::recent::{journal, RecentEvents, Reclaimer};
use concord_core::{Error, Result};
use rusqlite::Connection;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Sends the job's outcome once the commit's outcome is known.
type Finish = Box<dyn FnOnce(Result<()>) + Send>;

/// A queued write: run it inside the batch transaction, or abort it unrun.
trait WriteJob: Send {
    /// Runs the operation; returns whether it succeeded (else its savepoint is rolled
    /// back) and the finisher that answers the caller after COMMIT.
    fn run(self: Box<Self>, conn: &Connection, now: i64) -> (bool, Finish);
    fn abort(self: Box<Self>, error: Error);
}

struct TypedJob<T, F> {
    op: F,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> WriteJob for TypedJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, i64) -> Result<T> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection, now: i64) -> (bool, Finish) {
        let TypedJob { op, reply } = *self;
        let outcome = op(conn, now);
        let ok = outcome.is_ok();
        let finish: Finish = Box::new(move |commit| {
            let _ = reply.send(match commit {
                Ok(()) => outcome,
                Err(e) => Err(e),
            });
        });
        (ok, finish)
    }
    fn abort(self: Box<Self>, error: Error) {
        let _ = self.reply.send(Err(error));
    }
}

type Job = Box<dyn WriteJob>;

/// What the writer tells the rest of the store after each commit.
pub(crate) struct Watches {
    /// The last event seq committed (wakes the log tail and event waiters).
    pub(crate) last_seq: watch::Sender<i64>,
    /// Bumped by each commit that moved the memory log.
    pub(crate) memory: watch::Sender<i64>,
    /// The committed events themselves.
    pub(crate) recent: Arc<RecentEvents>,
    /// The checkpointer, when it runs (else SQLite checkpoints in COMMIT).
    pub(crate) checkpoint: Option<super::checkpoint::Nudge>,
    /// Commits, operations and time, for `/metrics`.
    pub(crate) stats: Arc<crate::WriteStats>,
}

/// Most jobs one transaction takes; bounds the latency a large batch adds.
const MAX_BATCH: usize = 512;

#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread. It stops when every `Writer` handle is dropped.
    pub(crate) fn start(conn: Connection, watches: Watches) -> Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>(8192);
        std::thread::Builder::new()
            .name("concord-writer".into())
            .spawn(move || run(conn, rx, watches))
            .map_err(|e| Error::internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Writer { tx })
    }

    /// Runs `op` in the next group transaction; resolves after the commit.
    /// `op` gets the connection and the hub's clock (ms) for this job.
    pub(crate) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, i64) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<T>>();
        self.tx
            .send(Box::new(TypedJob { op, reply }))
            .await
            .map_err(|_| Error::unavailable("the store's writer has stopped"))?;
        rx.await
            .map_err(|_| Error::internal("a write job ended without an answer"))?
    }
}

/// Runs one statement from the connection's statement cache. Every job opens and
/// releases a savepoint, so parsing those each time showed up in profiles.
fn exec(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(super::db_err)
}

/// Undoes a job's changes and forgets its savepoint.
fn roll_back_job(conn: &Connection) -> Result<()> {
    exec(conn, "ROLLBACK TO job")?;
    exec(conn, "RELEASE job")
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Job>, watches: Watches) {
    journal::start();
    counts::start();
    let mut reclaimer = Reclaimer::start();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let began = Instant::now();
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE") {
            for job in batch.drain(..) {
                job.abort(e.clone());
            }
            continue;
        }
        let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
        // Jobs that succeeded (a failed one is rolled back to its savepoint).
        let mut carried = 0;
        for job in batch.drain(..) {
            let now = concord_core::Timestamp::now().millis();
            if let Err(e) = exec(&conn, "SAVEPOINT job") {
                job.abort(e);
                continue;
            }
            let (mark, counted) = (journal::mark(), counts::mark());
            match catch_unwind(AssertUnwindSafe(|| job.run(&conn, now))) {
                Ok((ok, finish)) => {
                    let done = if ok {
                        carried += 1;
                        exec(&conn, "RELEASE job")
                    } else {
                        journal::roll_back_to(mark);
                        counts::roll_back_to(counted);
                        roll_back_job(&conn)
                    };
                    if let Err(e) = done {
                        tracing::error!("savepoint failed: {e}");
                    }
                    finishers.push(finish);
                }
                Err(_) => {
                    // The job's reply sender was dropped in the unwind: its caller
                    // gets an internal error. Undo whatever it half-wrote.
                    tracing::error!("a write job panicked; its changes were rolled back");
                    journal::roll_back_to(mark);
                    counts::roll_back_to(counted);
                    let _ = roll_back_job(&conn);
                }
            }
        }
        let committing = Instant::now();
        // The task counts the batch moved, once per queue and state; inside the
        // transaction, so a failed flush fails the COMMIT with it.
        let commit = counts::flush(&conn).and_then(|()| exec(&conn, "COMMIT"));
        if commit.is_ok() {
            watches
                .stats
                .committed(carried, began.elapsed(), committing.elapsed());
        }
        let appended = journal::take();
        let memory_moved = journal::take_memory_moved();
        let pruned = journal::take_pruned();
        if commit.is_err() {
            let _ = exec(&conn, "ROLLBACK");
        } else {
            // Publish the events, then wake their readers, before answering: a
            // writer that then reads finds every subscriber already woken for
            // what it wrote.
            if pruned > 0 {
                watches.recent.forget_through(pruned);
            }
            if let Some(seq) = appended.last().map(|h| h.event.seq) {
                reclaimer.retire(watches.recent.push(appended));
                watches.last_seq.send_if_modified(|cur| {
                    let changed = *cur != seq;
                    *cur = seq;
                    changed
                });
            }
            if memory_moved {
                watches.memory.send_modify(|n| *n += 1);
            }
            if let Some(c) = &watches.checkpoint {
                c.commit_done();
            }
        }
        for finish in finishers {
            finish(commit.clone());
        }
        // After answering: the callers of this batch do not wait for it.
        if let Some(c) = &watches.checkpoint {
            if c.take_catch_up() {
                super::checkpoint::catch_up(&conn);
            }
        }
    }
    tracing::debug!("sqlite writer stopped");
}
