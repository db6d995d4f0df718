//! Task counts per (queue, state), folded over a whole group transaction and
//! written once before its COMMIT.
//!
//! Why: every operation that moves a task (enqueue, claim, complete, …) changes
//! two counts, and writing them at each job's end cost one upsert per queue and
//! state per job: five statements per task of the single-call queue cycle, about
//! 6% of the writer thread. Folded over a batch, a busy queue's commit writes its
//! three or four rows once, whatever number of jobs moved them.
//!
//! How it stays exact: the deltas are noted in a thread-local journal on the
//! writer thread (the operations that move tasks have only the connection in
//! hand). A job whose savepoint is rolled back drops its deltas with
//! `roll_back_to`, so what is flushed is exactly what the committing jobs did;
//! the flush runs inside the transaction, so the counts and the tasks commit or
//! fail together. Off the writer thread (migrations, unit tests on a bare
//! connection) a delta is written at once, as before.

use super::db_err;
use concord_core::Result;
use rusqlite::{params, Connection};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

thread_local! {
    /// Set on the writer thread only.
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// Deltas noted in the open transaction, in order (a log, so that a job's
    /// own can be cut off when its savepoint rolls back).
    static PENDING: RefCell<Vec<(String, &'static str, i64)>> = const { RefCell::new(Vec::new()) };
}

const UPSERT: &str = "INSERT INTO task_counts (queue, state, n) VALUES (?1, ?2, ?3) \
     ON CONFLICT (queue, state) DO UPDATE SET n = n + excluded.n";

/// Adds `deltas` to the counts: noted for the writer's flush on the writer
/// thread, written now anywhere else.
pub(crate) fn add(
    c: &Connection,
    deltas: impl IntoIterator<Item = (String, &'static str, i64)>,
) -> Result<()> {
    if DEFERRING.with(Cell::get) {
        PENDING.with(|p| p.borrow_mut().extend(deltas));
        return Ok(());
    }
    write(c, deltas)
}

fn write(
    c: &Connection,
    deltas: impl IntoIterator<Item = (String, &'static str, i64)>,
) -> Result<()> {
    let mut s = c.prepare_cached(UPSERT).map_err(db_err)?;
    for (queue, state, n) in deltas {
        if n != 0 {
            s.execute(params![queue, state, n]).map_err(db_err)?;
        }
    }
    Ok(())
}

/// The writer thread's side.
pub(crate) mod deferred {
    use super::*;

    /// Marks the calling thread as the writer.
    pub(crate) fn start() {
        DEFERRING.with(|d| d.set(true));
    }

    /// Where the pending deltas stand before a job runs.
    pub(crate) fn mark() -> usize {
        PENDING.with(|p| p.borrow().len())
    }

    /// Forgets what a rolled-back job noted.
    pub(crate) fn roll_back_to(mark: usize) {
        PENDING.with(|p| p.borrow_mut().truncate(mark));
    }

    /// Writes the transaction's deltas, folded per (queue, state), leaving none
    /// pending whatever the outcome (a failed flush fails the whole COMMIT).
    pub(crate) fn flush(c: &Connection) -> Result<()> {
        let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
        if pending.is_empty() {
            return Ok(());
        }
        let mut folded: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for (queue, state, n) in pending {
            *folded.entry((queue, state)).or_default() += n;
        }
        write(c, folded.into_iter().map(|((q, s), n)| (q, s, n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(c: &Connection) -> Vec<(String, String, i64)> {
        let mut s = c
            .prepare("SELECT queue, state, n FROM task_counts ORDER BY queue, state")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn table() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE task_counts (queue TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL, \
             PRIMARY KEY (queue, state)) WITHOUT ROWID",
        )
        .unwrap();
        c
    }

    #[test]
    fn the_writer_flushes_what_its_kept_jobs_moved_folded() {
        std::thread::spawn(|| {
            let c = table();
            deferred::start();
            add(&c, [("q".into(), "pending", 1), ("q".into(), "pending", 1)]).unwrap();
            assert!(counts(&c).is_empty(), "nothing is written before the flush");
            let before_failed_job = deferred::mark();
            add(
                &c,
                [("q".into(), "pending", -1), ("q".into(), "running", 1)],
            )
            .unwrap();
            deferred::roll_back_to(before_failed_job);
            add(
                &c,
                [("r".into(), "pending", 1), ("r".into(), "pending", -1)],
            )
            .unwrap();
            deferred::flush(&c).unwrap();
            assert_eq!(
                counts(&c),
                vec![("q".into(), "pending".into(), 2)],
                "the rolled-back job's moves are gone, and a net zero writes no row"
            );
            deferred::flush(&c).unwrap();
            assert_eq!(counts(&c).len(), 1, "a flush leaves nothing pending");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_threads_write_at_once() {
        let c = table();
        add(&c, [("q".into(), "pending", 3)]).unwrap();
        assert_eq!(counts(&c), vec![("q".into(), "pending".into(), 3)]);
    }
}
