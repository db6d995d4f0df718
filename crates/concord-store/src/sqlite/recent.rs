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
//!
//! How big it gets: at most [`CAPACITY`] events and about [`BUDGET`] bytes of
//! them, whichever binds first. A count alone was not a bound: a batch of 100
//! task claims is one event of 100 task refs, some 60 KB once parsed, and under
//! the batch queue benchmark those took the hub past 1 GB in ten seconds;
//! 16,384 user events of 64 KiB would hold at least 1 GiB. An event's size in
//! memory is estimated from the JSON the writer serialized for its row anyway
//! ([`Held::cost`]).

use concord_core::api::Event;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Events held; older ones are read from the table.
const CAPACITY: usize = 16_384;

/// Estimated bytes the held events may take in memory.
const BUDGET: usize = 64 << 20;

/// Parsed JSON takes several times its text (a string's header, a map's nodes:
/// a task ref of 75 bytes of JSON is three map entries in a B-tree node); 8 was
/// measured on batch task events, about the worst case, plus a fixed overhead
/// for the event's own fields.
fn cost(json_bytes: usize) -> usize {
    256 + 8 * json_bytes
}

/// A committed event and its estimated size in memory.
pub(crate) struct Held {
    pub(crate) event: Event,
    cost: usize,
}

thread_local! {
    /// Set on the writer thread only: appends made anywhere else (none today) are
    /// not journaled rather than left to pile up.
    static JOURNALING: Cell<bool> = const { Cell::new(false) };
    /// Events appended in the writer's open transaction, in order.
    static JOURNAL: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
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

/// Called by `append_event` with the event it inserted and the length of the
/// JSON it wrote for it.
pub(crate) fn note_appended(json_bytes: usize, event: impl FnOnce() -> Event) {
    if JOURNALING.with(Cell::get) {
        JOURNAL.with(|j| {
            j.borrow_mut().push(Held {
                event: event(),
                cost: cost(json_bytes),
            })
        });
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
    pub(crate) fn take() -> Vec<Held> {
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
    lot: Vec<Vec<Held>>,
    /// Events in the lot, and their estimated bytes.
    held: usize,
    held_cost: usize,
    tx: Option<std::sync::mpsc::Sender<Vec<Vec<Held>>>>,
}

/// Events a lot gathers before it is handed over, unless it reaches
/// [`LOT_BUDGET`] first.
const LOT: usize = 4096;
/// Estimated bytes a lot gathers before it is handed over.
const LOT_BUDGET: usize = 4 << 20;

impl Reclaimer {
    /// Starts the thread; it ends when the reclaimer is dropped.
    pub(crate) fn start() -> Reclaimer {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Vec<Held>>>();
        let started = std::thread::Builder::new()
            .name("concord-reclaim".into())
            .spawn(move || while rx.recv().is_ok() {});
        if let Err(e) = &started {
            tracing::warn!("no reclaimer thread ({e}); the writer frees old events itself");
        }
        Reclaimer {
            lot: Vec::new(),
            held: 0,
            held_cost: 0,
            tx: started.ok().map(|_| tx),
        }
    }

    /// Takes `events` to be dropped later, elsewhere.
    pub(crate) fn retire(&mut self, events: Vec<Held>) {
        let Some(tx) = &self.tx else {
            return;
        };
        if events.is_empty() {
            return;
        }
        self.held += events.len();
        self.held_cost += events.iter().map(|h| h.cost).sum::<usize>();
        self.lot.push(events);
        if self.held >= LOT || self.held_cost >= LOT_BUDGET {
            self.held = 0;
            self.held_cost = 0;
            // A send fails only if the thread is gone; the lot is then dropped here.
            let _ = tx.send(std::mem::take(&mut self.lot));
        }
    }
}

/// The shared window of recent events. A std Mutex: it is held to push a commit's
/// events or to clone a page of them, never across an await or a query.
#[derive(Default)]
pub(crate) struct RecentEvents {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    events: VecDeque<Held>,
    /// The held events' estimated bytes.
    cost: usize,
}

impl Window {
    fn pop_front(&mut self) -> Option<Held> {
        let held = self.events.pop_front()?;
        self.cost -= held.cost;
        Some(held)
    }
}

impl RecentEvents {
    /// Adds a committed transaction's events (in seq order); answers the oldest
    /// ones it let go, for the caller to drop where it costs least (`Reclaimer`).
    pub(crate) fn push(&self, committed: Vec<Held>) -> Vec<Held> {
        let Ok(mut w) = self.window.lock() else {
            return Vec::new();
        };
        for h in committed {
            debug_assert!(w.events.back().is_none_or(|b| b.event.seq < h.event.seq));
            w.cost += h.cost;
            w.events.push_back(h);
        }
        let mut let_go = Vec::new();
        while w.events.len() > CAPACITY || w.cost > BUDGET {
            match w.pop_front() {
                Some(h) => let_go.push(h),
                None => break,
            }
        }
        let_go
    }

    /// Forgets the events through `cut` (deleted by retention).
    pub(crate) fn forget_through(&self, cut: i64) {
        if let Ok(mut w) = self.window.lock() {
            while w.events.front().is_some_and(|h| h.event.seq <= cut) {
                w.pop_front();
            }
        }
    }

    /// Up to `limit` events after `after`, if this window holds all of them:
    /// `None` when the read starts before the oldest event held (or nothing is held).
    pub(crate) fn read(&self, after: i64, limit: usize) -> Option<Vec<Event>> {
        let w = self.window.lock().ok()?;
        let q = &w.events;
        let first = q.front()?.event.seq;
        if after.saturating_add(1) < first {
            return None;
        }
        // Seqs are contiguous from `first`, but find the start by search anyway, so
        // a gap (there is none today) could never make this skip an event.
        let start = q.partition_point(|h| h.event.seq <= after);
        Some(
            q.range(start..)
                .take(limit)
                .map(|h| h.event.clone())
                .collect(),
        )
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

    /// A small event, as the journal holds it.
    fn held(seq: i64) -> Held {
        Held {
            event: ev(seq),
            cost: cost(4),
        }
    }

    #[test]
    fn reads_only_what_it_holds_in_full() {
        let r = RecentEvents::default();
        assert!(r.read(0, 10).is_none(), "empty: go to the table");
        r.push((5..=9).map(held).collect());
        assert!(r.read(3, 10).is_none(), "seq 4 is not held");
        let seqs = |v: Vec<Event>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(r.read(4, 10).unwrap()), vec![5, 6, 7, 8, 9]);
        assert_eq!(seqs(r.read(6, 2).unwrap()), vec![7, 8]);
        assert_eq!(seqs(r.read(9, 10).unwrap()), Vec::<i64>::new());
    }

    #[test]
    fn pruned_events_leave_the_window() {
        let r = RecentEvents::default();
        r.push((1..=10).map(held).collect());
        r.forget_through(6);
        assert!(r.read(0, 10).is_none(), "1..=6 are gone: the table answers");
        assert_eq!(r.read(6, 10).unwrap()[0].seq, 7);
        r.forget_through(10);
        assert!(r.read(10, 10).is_none());
    }

    #[test]
    fn keeps_the_newest_capacity_events() {
        let r = RecentEvents::default();
        let let_go = r.push((1..=(CAPACITY as i64 + 10)).map(held).collect());
        let seqs: Vec<i64> = let_go.iter().map(|h| h.event.seq).collect();
        assert_eq!(
            seqs,
            (1..=10).collect::<Vec<_>>(),
            "the oldest go, for the reclaimer"
        );
        assert!(r.read(5, 1).is_none());
        assert_eq!(r.read(10, 1).unwrap()[0].seq, 11);
    }

    /// Large events are bounded by their bytes, not only their number: the
    /// window keeps the newest that fit [`BUDGET`], lets the older go, and a
    /// read from before them goes to the table.
    #[test]
    fn keeps_about_budget_bytes_of_large_events() {
        let r = RecentEvents::default();
        // 64 KiB of JSON each: the largest event a client may publish.
        let big = |seq| Held {
            event: ev(seq),
            cost: cost(64 << 10),
        };
        let fit = (BUDGET / cost(64 << 10)) as i64;
        let let_go = r.push((1..=fit + 5).map(big).collect());
        assert_eq!(let_go.len(), 5, "{fit} fit the budget");
        assert_eq!(let_go[0].event.seq, 1);
        assert!(
            r.read(4, 1).is_none(),
            "seq 5 was let go: the table answers"
        );
        assert_eq!(r.read(5, 1).unwrap()[0].seq, 6);
        let held = r.window.lock().unwrap();
        assert!(held.cost <= BUDGET);
        assert_eq!(held.events.len() as i64, fit);
        drop(held);
        // Retention then forgets some: their bytes leave the count with them.
        r.forget_through(fit);
        let held = r.window.lock().unwrap();
        assert_eq!(held.events.len(), 5);
        assert_eq!(held.cost, 5 * cost(64 << 10));
    }

    #[test]
    fn a_rolled_back_job_leaves_no_note() {
        std::thread::spawn(|| {
            journal::start();
            note_appended(4, || ev(1));
            let m = journal::mark();
            note_appended(4, || ev(2));
            journal::roll_back_to(m);
            note_appended(4, || ev(2));
            let seqs: Vec<i64> = journal::take().into_iter().map(|h| h.event.seq).collect();
            assert_eq!(seqs, vec![1, 2]);
            assert!(journal::take().is_empty());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_threads_do_not_journal() {
        note_appended(4, || ev(1));
        assert!(journal::take().is_empty());
    }
}
