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

use concord_core::{Error, Result};
use rusqlite::Connection;
use std::panic::{catch_unwind, AssertUnwindSafe};
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

/// Most jobs one transaction takes; bounds the latency a large batch adds.
const MAX_BATCH: usize = 512;

#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread. It stops when every `Writer` handle is dropped.
    pub(crate) fn start(conn: Connection, last_seq: watch::Sender<i64>) -> Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>(8192);
        std::thread::Builder::new()
            .name("concord-sqlite-writer".into())
            .spawn(move || run(conn, rx, last_seq))
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

fn exec(conn: &Connection, sql: &str) -> Result<()> {
    conn.execute_batch(sql).map_err(super::db_err)
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Job>, last_seq: watch::Sender<i64>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE") {
            for job in batch.drain(..) {
                job.abort(e.clone());
            }
            continue;
        }
        let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            let now = concord_core::Timestamp::now().millis();
            if let Err(e) = exec(&conn, "SAVEPOINT job") {
                job.abort(e);
                continue;
            }
            match catch_unwind(AssertUnwindSafe(|| job.run(&conn, now))) {
                Ok((ok, finish)) => {
                    let sp = if ok {
                        "RELEASE job"
                    } else {
                        "ROLLBACK TO job; RELEASE job"
                    };
                    if let Err(e) = exec(&conn, sp) {
                        tracing::error!("savepoint failed: {e}");
                    }
                    finishers.push(finish);
                }
                Err(_) => {
                    // The job's reply sender was dropped in the unwind: its caller
                    // gets an internal error. Undo whatever it half-wrote.
                    tracing::error!("a write job panicked; its changes were rolled back");
                    let _ = exec(&conn, "ROLLBACK TO job; RELEASE job");
                }
            }
        }
        let commit = exec(&conn, "COMMIT");
        if commit.is_err() {
            let _ = exec(&conn, "ROLLBACK");
        }
        if commit.is_ok() {
            // Wake event readers before answering, so a writer that then reads
            // finds every subscriber already woken for what it wrote.
            if let Ok(seq) = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            }) {
                last_seq.send_if_modified(|cur| {
                    let changed = *cur != seq;
                    *cur = seq;
                    changed
                });
            }
        }
        for finish in finishers {
            finish(commit.clone());
        }
    }
    tracing::debug!("sqlite writer stopped");
}
