//! The most recently committed events, kept in memory so that the log tail and
//! subscribers that are only a little behind read them without a query; and the
//! writer's note of whether a commit moved the memory log, so that the recall
//! index is woken by memory changes rather than by every commit.
//!
//! Why: every commit wakes the log tail, which used to read the new events back
//! from the table on a blocking thread; at 5,000 events/s that re-read (a statement
//! step, row decoding, JSON parsing) cost a fifth of a core and a thread hop of
//! latency before fan-out (DESIGN §10). The writer already has the events in hand
//! when it appends them, so it keeps them.
//!
//! How it stays exact: the writer thread notes each event as it is appended (a
//! thread-local journal, since `append_event` is called deep inside the operations
//! with only the connection in hand). A job whose savepoint is rolled back drops
//! its notes, as does a transaction whose COMMIT fails, so the journal holds exactly
//! what committed, and it is published here only after COMMIT returned. Every event
//! is appended by the one writer thread, so from the first event this holds
//! onwards it holds all of them, in seq order, without gaps; a read that starts
//! before the oldest one held goes to the table.

use concord_core::api::Event;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Events held; older ones are read from the table.
const CAPACITY: usize = 16_384;

thread_local! {
    /// Set on the writer thread only: appends made anywhere else (none today) are
    /// not journaled rather than left to pile up.
    static JOURNALING: Cell<bool> = const { Cell::new(false) };
    /// Events appended in the writer's open transaction, in order.
    static JOURNAL: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
    /// Whether the open transaction moved the memory log.
    static MEMORY_MOVED: Cell<bool> = const { Cell::new(false) };
    /// The highest seq the open transaction's retention deleted through.
    static PRUNED: Cell<i64> = const { Cell::new(0) };
}

/// Called when retention deletes the events through `cut`: after COMMIT they
/// leave the window too, so a read never returns an event the table no longer
/// has. Not undone with a job's savepoint: dropping events that stayed only sends
/// a later read to the table.
pub(crate) fn note_pruned(cut: i64) {
    PRUNED.with(|p| p.set(p.get().max(cut)));
}

/// Called when an operation takes a memory-log position. Not undone with a job's
/// savepoint: it only wakes the recall index, which then finds nothing new.
pub(crate) fn note_memory_moved() {
    MEMORY_MOVED.with(|m| m.set(true));
}

/// Called by `append_event` with the event it inserted.
pub(crate) fn note_appended(event: impl FnOnce() -> Event) {
    if JOURNALING.with(Cell::get) {
        JOURNAL.with(|j| j.borrow_mut().push(event()));
    }
}

/// The writer thread's side of the journal.
pub(crate) mod journal {
    use super::*;

    /// Marks the calling thread as the writer.
    pub(crate) fn start() {
        JOURNALING.with(|j| j.set(true));
    }

    /// Where the journal stands before a job runs.
    pub(crate) fn mark() -> usize {
        JOURNAL.with(|j| j.borrow().len())
    }

    /// Forgets what a rolled-back job appended.
    pub(crate) fn roll_back_to(mark: usize) {
        JOURNAL.with(|j| j.borrow_mut().truncate(mark));
    }

    /// Everything the transaction appended, leaving the journal empty.
    pub(crate) fn take() -> Vec<Event> {
        JOURNAL.with(|j| std::mem::take(&mut *j.borrow_mut()))
    }

    /// Whether the transaction moved the memory log, clearing the note.
    pub(crate) fn take_memory_moved() -> bool {
        MEMORY_MOVED.with(|m| m.replace(false))
    }

    /// The seq the transaction pruned through (0: none), clearing the note.
    pub(crate) fn take_pruned() -> i64 {
        PRUNED.with(|p| p.replace(0))
    }
}

/// Drops the events the window lets go on a thread of its own.
///
/// Why: an event's JSON data is a dozen small allocations, and freeing them on
/// the writer thread (which the window is pushed from) cost 3% of it under the
/// single-call queue benchmark, where that thread is the bottleneck and a core
/// is partly idle. Handed over in lots of a few thousand events, so the hand-off
/// costs one wake-up per lot. Without the thread (it could not be started), the
/// events are dropped where they are.
pub(crate) struct Reclaimer {
    lot: Vec<Vec<Event>>,
    held: usize,
    tx: Option<std::sync::mpsc::Sender<Vec<Vec<Event>>>>,
}

/// Events a lot gathers before it is handed over.
const LOT: usize = 4096;

impl Reclaimer {
    /// Starts the thread; it ends when the reclaimer is dropped.
    pub(crate) fn start() -> Reclaimer {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Vec<Event>>>();
        let started = std::thread::Builder::new()
            .name("concord-reclaim".into())
            .spawn(move || while rx.recv().is_ok() {});
        if let Err(e) = &started {
            tracing::warn!("no reclaimer thread ({e}); the writer frees old events itself");
        }
        Reclaimer {
            lot: Vec::new(),
            held: 0,
            tx: started.ok().map(|_| tx),
        }
    }

    /// Takes `events` to be dropped later, elsewhere.
    pub(crate) fn retire(&mut self, events: Vec<Event>) {
        let Some(tx) = &self.tx else {
            return;
        };
        if events.is_empty() {
            return;
        }
        self.held += events.len();
        self.lot.push(events);
        if self.held >= LOT {
            self.held = 0;
            // A send fails only if the thread is gone; the lot is then dropped here.
            let _ = tx.send(std::mem::take(&mut self.lot));
        }
    }
}

/// The shared window of recent events. A std Mutex: it is held to push a commit's
/// events or to clone a page of them, never across an await or a query.
#[derive(Default)]
pub(crate) struct RecentEvents {
    events: Mutex<VecDeque<Event>>,
}

impl RecentEvents {
    /// Adds a committed transaction's events (in seq order); answers the oldest
    /// ones it let go, for the caller to drop where it costs least (`Reclaimer`).
    pub(crate) fn push(&self, committed: Vec<Event>) -> Vec<Event> {
        let Ok(mut q) = self.events.lock() else {
            return Vec::new();
        };
        for e in committed {
            debug_assert!(q.back().is_none_or(|b| b.seq < e.seq));
            q.push_back(e);
        }
        let over = q.len().saturating_sub(CAPACITY);
        q.drain(..over).collect()
    }

    /// Forgets the events through `cut` (deleted by retention).
    pub(crate) fn forget_through(&self, cut: i64) {
        if let Ok(mut q) = self.events.lock() {
            while q.front().is_some_and(|e| e.seq <= cut) {
                q.pop_front();
            }
        }
    }

    /// Up to `limit` events after `after`, if this window holds all of them:
    /// `None` when the read starts before the oldest event held (or nothing is held).
    pub(crate) fn read(&self, after: i64, limit: usize) -> Option<Vec<Event>> {
        let q = self.events.lock().ok()?;
        let first = q.front()?.seq;
        if after.saturating_add(1) < first {
            return None;
        }
        // Seqs are contiguous from `first`, but find the start by search anyway, so
        // a gap (there is none today) could never make this skip an event.
        let start = q.partition_point(|e| e.seq <= after);
        Some(q.range(start..).take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::api::EventSource;
    use concord_core::Timestamp;

    fn ev(seq: i64) -> Event {
        Event {
            seq,
            topic: "t".into(),
            time: Timestamp(0),
            source: EventSource::default(),
            data: serde_json::Value::Null,
        }
    }

    #[test]
    fn reads_only_what_it_holds_in_full() {
        let r = RecentEvents::default();
        assert!(r.read(0, 10).is_none(), "empty: go to the table");
        r.push((5..=9).map(ev).collect());
        assert!(r.read(3, 10).is_none(), "seq 4 is not held");
        let seqs = |v: Vec<Event>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(r.read(4, 10).unwrap()), vec![5, 6, 7, 8, 9]);
        assert_eq!(seqs(r.read(6, 2).unwrap()), vec![7, 8]);
        assert_eq!(seqs(r.read(9, 10).unwrap()), Vec::<i64>::new());
    }

    #[test]
    fn pruned_events_leave_the_window() {
        let r = RecentEvents::default();
        r.push((1..=10).map(ev).collect());
        r.forget_through(6);
        assert!(r.read(0, 10).is_none(), "1..=6 are gone: the table answers");
        assert_eq!(r.read(6, 10).unwrap()[0].seq, 7);
        r.forget_through(10);
        assert!(r.read(10, 10).is_none());
    }

    #[test]
    fn keeps_the_newest_capacity_events() {
        let r = RecentEvents::default();
        let let_go = r.push((1..=(CAPACITY as i64 + 10)).map(ev).collect());
        let seqs: Vec<i64> = let_go.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=10).collect::<Vec<_>>(),
            "the oldest go, for the reclaimer"
        );
        assert!(r.read(5, 1).is_none());
        assert_eq!(r.read(10, 1).unwrap()[0].seq, 11);
    }

    #[test]
    fn a_rolled_back_job_leaves_no_note() {
        std::thread::spawn(|| {
            journal::start();
            note_appended(|| ev(1));
            let m = journal::mark();
            note_appended(|| ev(2));
            journal::roll_back_to(m);
            note_appended(|| ev(2));
            let seqs: Vec<i64> = journal::take().into_iter().map(|e| e.seq).collect();
            assert_eq!(seqs, vec![1, 2]);
            assert!(journal::take().is_empty());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_threads_do_not_journal() {
        note_appended(|| ev(1));
        assert!(journal::take().is_empty());
    }
}
