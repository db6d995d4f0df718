//! The graph's neighbour lists.

use super::{M, M0, SLACK};

/// Most neighbours a layer-0 list holds between prunings.
pub(super) const LAYER0_CAP: usize = M0 + SLACK;
/// Most neighbours an upper-layer list holds between prunings.
pub(super) const UPPER_CAP: usize = M + SLACK;
/// A node's layer-0 slots: the count, then the neighbours.
const STRIDE: usize = 1 + LAYER0_CAP;

/// Every node's neighbour lists, at every level it has.
///
/// Why layer 0 is one flat array with a fixed stride: a walk reads the list
/// of every node it expands, in no order the cache can guess, and nearly all
/// of a walk is on layer 0. As nested `Vec`s (per node, per level) a list was
/// two dependent cache misses before its first neighbour; here it is one, at
/// an address known in advance, so the walk can prefetch the next candidate's
/// list while it scores the current one. Upper layers hold about one node in
/// `M`, are walked with a beam of one, and stay as `Vec`s.
pub(super) struct Links {
    layer0: Vec<u32>,
    /// Per node, its lists at levels 1..=level: empty for most nodes.
    upper: Vec<Vec<Vec<u32>>>,
}

impl Links {
    pub fn new() -> Links {
        Links {
            layer0: Vec::new(),
            upper: Vec::new(),
        }
    }

    /// Room for `additional` more nodes, in memory advised for huge pages.
    pub fn reserve(&mut self, additional: usize) {
        super::memory::reserve_huge(&mut self.layer0, additional * STRIDE);
        self.upper.reserve(additional);
    }

    /// Appends a node with empty lists at levels 0..=level.
    pub fn push_node(&mut self, level: usize) {
        self.reserve(1);
        self.layer0.extend([0; STRIDE]);
        self.upper.push(vec![Vec::new(); level]);
    }

    /// The node's highest level.
    pub fn level(&self, n: u32) -> usize {
        self.upper[n as usize].len()
    }

    /// The node's neighbours at level `l`; `None` above its level.
    #[inline]
    pub fn get(&self, n: u32, l: usize) -> Option<&[u32]> {
        if l == 0 {
            let at = n as usize * STRIDE;
            let count = self.layer0[at] as usize;
            Some(&self.layer0[at + 1..at + 1 + count])
        } else {
            self.upper[n as usize].get(l - 1).map(Vec::as_slice)
        }
    }

    /// Replaces the node's list at level `l` (a level it has), keeping at most
    /// the level's capacity (callers never pass more).
    pub fn set(&mut self, n: u32, l: usize, list: &[u32]) {
        if l == 0 {
            let list = &list[..list.len().min(LAYER0_CAP)];
            let at = n as usize * STRIDE;
            self.layer0[at] = list.len() as u32;
            self.layer0[at + 1..at + 1 + list.len()].copy_from_slice(list);
        } else if let Some(slot) = self.upper[n as usize].get_mut(l - 1) {
            slot.clear();
            slot.extend_from_slice(&list[..list.len().min(UPPER_CAP)]);
        }
    }

    /// Appends `x` to the node's list at level `l`, which must have room
    /// (its length is below the level's capacity).
    pub fn push(&mut self, n: u32, l: usize, x: u32) {
        if l == 0 {
            let at = n as usize * STRIDE;
            let count = self.layer0[at] as usize;
            if count < LAYER0_CAP {
                self.layer0[at + 1 + count] = x;
                self.layer0[at] += 1;
            }
        } else if let Some(slot) = self.upper[n as usize].get_mut(l - 1) {
            slot.push(x);
        }
    }

    /// Starts loading the node's layer-0 list into the cache.
    #[inline]
    pub fn prefetch(&self, n: u32) {
        let at = n as usize * STRIDE;
        if let Some(slots) = self.layer0.get(at..at + STRIDE) {
            super::memory::prefetch(slots);
        }
    }
}
