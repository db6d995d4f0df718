//! Counters of the store's write path, for `/metrics`.
//!
//! The question they answer at 2 a.m. is "are writes queuing behind the store?".
//! On SQLite one writer thread runs every transaction, so the rate of
//! [`WriteStats::busy_us`] is that thread's utilization: near one second per
//! second, writes wait for it, and operations per commit say how much each
//! fsync is shared. On PostgreSQL transactions run side by side on the pool, so
//! the busy rate can exceed one; commit time there is mostly the WAL flush.
//! Plain atomics, bumped once per transaction: nothing on the path allocates or
//! locks for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct WriteStats {
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Operations those transactions carried (a group commit carries many).
    pub operations: AtomicU64,
    /// Microseconds from BEGIN to the end of COMMIT, fsync included.
    pub busy_us: AtomicU64,
    /// Microseconds of that spent in COMMIT alone.
    pub commit_us: AtomicU64,
}

impl WriteStats {
    /// Records one committed transaction.
    pub fn committed(&self, operations: usize, busy: Duration, commit: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.operations
            .fetch_add(operations as u64, Ordering::Relaxed);
        self.busy_us
            .fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
        self.commit_us
            .fetch_add(commit.as_micros() as u64, Ordering::Relaxed);
    }
}
