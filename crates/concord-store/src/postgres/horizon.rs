//! The delivery horizon of the event log on PostgreSQL: the highest seq `H` such
//! that every seq at or below it is final, either committed and visible, or never
//! going to be (its transaction rolled back). Readers are served `seq <= H` only,
//! so a reader at cursor `c` can never later find a seq `<= c` appear (DESIGN §2).
//!
//! Why not a counter row: a row updated by every appending transaction makes
//! seqs visible in order, but it also makes those transactions commit one after
//! another, each waiting for its own WAL flush while holding the lock. That
//! capped a hub on PostgreSQL at a few hundred queue cycles a second however many
//! connections it had. Seqs now come from a sequence, taken without a lock just
//! before COMMIT, and appending transactions commit in parallel, in any order.
//!
//! Why the horizon is safe. An appending transaction forces its transaction id
//! (xid) to be assigned before it takes its seqs. Take a snapshot `S` in which
//! seq `M` is visible and a lower seq `g` is not. The transaction that took `g`
//! got its xid before it took `g`, took `g` before `M` was taken (a sequence
//! hands out values in call order), and `M` committed before `S`. So at `S` that
//! transaction either had ended, and then rolled back (else `g` would be visible),
//! or was still running, and then its xid is in `S`'s in-progress list (`xip`).
//! Hence once every xid of `S.xip` has ended, every seq `<= M` is final, and a
//! snapshot taken after that shows exactly the ones that exist.
//!
//! The usual gap is a transaction that took its seq a moment before a later one
//! committed: the next read finds it visible and `H` moves over it. Waiting on
//! `xip` matters only for a seq whose transaction failed after taking it. Such a
//! gap holds `H` back until every transaction that was running on the cluster at
//! that moment has ended (Concord's own are bounded by the operation timeout;
//! a foreign transaction that keeps an xid for minutes delays delivery past such
//! a gap just as long). This type is the rule alone, with no I/O, so that it can
//! be checked against a simulation (`tests/it/horizon.rs`).

/// What a horizon read needs of a PostgreSQL snapshot (`pg_current_snapshot()`):
/// which transactions were in progress when it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Every xid below this had ended when the snapshot was taken.
    pub xmin: u64,
    /// The xids at or above `xmin` that were still in progress.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form of `pg_snapshot`, `xmin:xmax:xip1,xip2,…`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let _xmax: u64 = parts.next()?.parse().ok()?;
        let list = parts.next()?;
        let xip = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?
        };
        Some(Snapshot { xmin, xip })
    }

    /// Whether `xid`, which had been assigned before this snapshot was taken, was
    /// still in progress at it.
    fn running(&self, xid: u64) -> bool {
        xid >= self.xmin && self.xip.contains(&xid)
    }
}

/// A gap seen below a visible seq: every seq up to `upto` is final once all of
/// `waiting_on` have ended.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Gap {
    upto: i64,
    waiting_on: Vec<u64>,
}

/// The horizon and the one gap it is waiting out, if any.
#[derive(Clone, Debug)]
pub struct Horizon {
    h: i64,
    gap: Option<Gap>,
}

impl Horizon {
    /// Starts at `h`, a seq known to be final (the log's floor, or 0).
    pub fn new(h: i64) -> Horizon {
        Horizon { h, gap: None }
    }

    /// Every seq at or below this is final.
    pub fn get(&self) -> i64 {
        self.h
    }

    /// Whether a gap is being waited out: the horizon may then move without any
    /// commit announcing it (when the transactions it waits on end), so the
    /// caller should read again soon even if nothing wakes it.
    pub fn waiting(&self) -> bool {
        self.gap.is_some()
    }

    /// Takes in one read: `visible` are seqs above the horizon that `snap` shows
    /// (in ascending order; any subset of them is sound, the complete list from
    /// the horizon up moves it furthest). Returns whether the horizon moved.
    pub fn advance(&mut self, snap: &Snapshot, visible: &[i64]) -> bool {
        let before = self.h;
        if let Some(gap) = &self.gap {
            if !gap.waiting_on.iter().any(|&x| snap.running(x)) {
                // Everything the gap waited on had ended before `snap`: every seq
                // up to `upto` is visible in `snap` or never will be.
                self.h = self.h.max(gap.upto);
                self.gap = None;
            }
        }
        let start = self.h;
        let mut next = visible.iter().copied().skip_while(|&s| s <= start);
        let mut above = None;
        for s in next.by_ref() {
            if s == self.h + 1 {
                self.h = s;
            } else {
                above = Some(s);
                break;
            }
        }
        if let Some(first_above) = above {
            let upto = next.last().unwrap_or(first_above);
            if self.gap.is_none() {
                if snap.xip.is_empty() {
                    // Nothing was running: the missing seqs were rolled back.
                    self.h = upto;
                } else {
                    self.gap = Some(Gap {
                        upto,
                        waiting_on: snap.xip.clone(),
                    });
                }
            }
        }
        if self.gap.as_ref().is_some_and(|g| g.upto <= self.h) {
            self.gap = None;
        }
        self.h != before
    }
}
