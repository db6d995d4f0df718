//! The PostgreSQL event horizon's rule (`postgres::horizon`), checked against a
//! simulated database: transactions take xids and seqs, commit or roll back in any
//! order, foreign transactions hold xids without taking seqs, and a reader follows
//! the horizon. No seq may ever appear below what the reader has passed, and once
//! everything has ended the horizon reaches the last seq.

use concord_store::postgres::horizon::{Horizon, Snapshot};
use proptest::prelude::*;
use std::collections::BTreeSet;

#[test]
fn snapshots_parse_from_their_text_form() {
    assert_eq!(
        Snapshot::parse("10:20:10,14,15"),
        Some(Snapshot {
            xmin: 10,
            xip: vec![10, 14, 15]
        })
    );
    assert_eq!(
        Snapshot::parse("7:7:"),
        Some(Snapshot {
            xmin: 7,
            xip: vec![]
        })
    );
    assert_eq!(Snapshot::parse("7:x:"), None);
    assert_eq!(Snapshot::parse("7:9:8,y"), None);
    assert_eq!(Snapshot::parse(""), None);
}

fn snap(xmin: u64, xip: &[u64]) -> Snapshot {
    Snapshot {
        xmin,
        xip: xip.to_vec(),
    }
}

#[test]
fn contiguous_seqs_move_the_horizon_and_a_gap_waits_for_its_transactions() {
    let mut h = Horizon::new(0);
    assert!(h.advance(&snap(5, &[5]), &[1, 2, 3]));
    assert_eq!(h.get(), 3);
    // 4 is missing below 5 and 6, and xid 5 was running: wait for it.
    assert!(!h.advance(&snap(5, &[5, 7]), &[5, 6]));
    assert_eq!(h.get(), 3);
    assert!(h.waiting());
    // 4 shows up: the horizon moves over it, still waiting on the old gap's xids.
    assert!(h.advance(&snap(7, &[7]), &[4, 5, 6]));
    assert_eq!(h.get(), 6);
    assert!(!h.waiting(), "a gap at or below the horizon is forgotten");
}

#[test]
fn a_rolled_back_seq_is_passed_once_everything_running_then_has_ended() {
    let mut h = Horizon::new(10);
    // 11 was taken by xid 20, which rolls back; 12 is visible. 21 is unrelated.
    h.advance(&snap(20, &[20, 21]), &[12]);
    assert_eq!(h.get(), 10);
    // 20 has ended, 21 still runs: 11 might still be 21's.
    h.advance(&snap(21, &[21]), &[12]);
    assert_eq!(h.get(), 10);
    // Both ended: 11 will never appear.
    assert!(h.advance(&snap(30, &[]), &[12]));
    assert_eq!(h.get(), 12);
    assert!(!h.waiting());
}

#[test]
fn with_nothing_running_a_gap_is_final_at_once() {
    let mut h = Horizon::new(0);
    assert!(h.advance(&snap(9, &[]), &[1, 3, 4]));
    assert_eq!(h.get(), 4);
}

#[test]
fn any_subset_of_visible_seqs_is_sound() {
    // The start-up read lists only the highest visible seq.
    let mut h = Horizon::new(0);
    h.advance(&snap(3, &[3]), &[40]);
    assert_eq!(h.get(), 0);
    h.advance(&snap(4, &[4]), &[]);
    assert_eq!(h.get(), 40);
}

/// One step of the simulation, chosen by proptest.
#[derive(Clone, Debug)]
enum Step {
    /// A Concord transaction starts (no xid yet).
    Begin,
    /// A begun transaction gets its xid and takes 1–3 seqs.
    Append(u8),
    /// The `n`th transaction holding seqs commits (or rolls back).
    End(usize, bool),
    /// A foreign transaction takes an xid, or the oldest one ends.
    Foreign(bool),
    /// The horizon task reads, and the reader follows it.
    Round,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Begin),
        3 => (1u8..=3).prop_map(Step::Append),
        3 => (any::<usize>(), proptest::bool::weighted(0.85)).prop_map(|(n, c)| Step::End(n, c)),
        1 => any::<bool>().prop_map(Step::Foreign),
        3 => Just(Step::Round),
    ]
}

#[derive(Default)]
struct Db {
    next_xid: u64,
    next_seq: i64,
    /// Running xids (Concord's and foreign ones).
    running: BTreeSet<u64>,
    /// Concord transactions that have begun but taken no seqs.
    fresh: usize,
    /// Concord transactions holding seqs: xid → seqs.
    holding: Vec<(u64, Vec<i64>)>,
    foreign: Vec<u64>,
    visible: BTreeSet<i64>,
}

impl Db {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            xmin: self.running.first().copied().unwrap_or(self.next_xid),
            xip: self.running.iter().copied().collect(),
        }
    }

    fn xid(&mut self) -> u64 {
        self.next_xid += 1;
        self.running.insert(self.next_xid);
        self.next_xid
    }
}

/// Runs a round and the reader after it: the reader takes every visible seq in
/// (cursor, horizon] and moves its cursor to the horizon.
fn round(db: &Db, h: &mut Horizon, cursor: &mut i64, read: &mut Vec<i64>) {
    let snap = db.snapshot();
    let visible: Vec<i64> = db.visible.range(h.get() + 1..).copied().collect();
    h.advance(&snap, &visible);
    assert!(h.get() >= *cursor, "the horizon went back");
    if h.get() > *cursor {
        read.extend(db.visible.range(*cursor + 1..=h.get()).copied());
        *cursor = h.get();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn the_reader_never_misses_a_seq_and_the_horizon_catches_up(steps in proptest::collection::vec(step(), 1..120)) {
        let mut db = Db { next_xid: 100, ..Db::default() };
        let mut h = Horizon::new(0);
        let (mut cursor, mut read) = (0i64, Vec::new());
        for s in steps {
            match s {
                Step::Begin => db.fresh += 1,
                Step::Append(k) if db.fresh > 0 => {
                    db.fresh -= 1;
                    // The xid is forced before the seqs are taken.
                    let xid = db.xid();
                    let seqs: Vec<i64> = (0..k).map(|_| { db.next_seq += 1; db.next_seq }).collect();
                    db.holding.push((xid, seqs));
                }
                Step::End(n, commit) if !db.holding.is_empty() => {
                    let (xid, seqs) = db.holding.remove(n % db.holding.len());
                    db.running.remove(&xid);
                    if commit { db.visible.extend(seqs); }
                }
                Step::Foreign(true) => { let x = db.xid(); db.foreign.push(x); }
                Step::Foreign(false) if !db.foreign.is_empty() => {
                    let x = db.foreign.remove(0);
                    db.running.remove(&x);
                }
                Step::Round => round(&db, &mut h, &mut cursor, &mut read),
                _ => {}
            }
        }
        // Everything ends; two rounds settle the horizon.
        for (xid, seqs) in std::mem::take(&mut db.holding) {
            db.running.remove(&xid);
            db.visible.extend(seqs);
        }
        for x in std::mem::take(&mut db.foreign) { db.running.remove(&x); }
        round(&db, &mut h, &mut cursor, &mut read);
        round(&db, &mut h, &mut cursor, &mut read);
        let last = db.visible.last().copied().unwrap_or(0);
        prop_assert!(h.get() >= last, "the horizon {} reaches the last committed seq {}", h.get(), last);
        let expected: Vec<i64> = db.visible.iter().copied().collect();
        prop_assert_eq!(read, expected, "the reader read every committed seq, in order");
    }
}
