//! The ANN half of the recall index: an HNSW graph (Malkov & Yashunin, 2016) over
//! unit-normalized vectors, so that cosine similarity is a dot product.
//!
//! Why our own rather than `hnsw_rs` or `usearch`: recall must filter *inside* the
//! graph walk (visibility is applied before ranking, never after), memories are
//! closed and purged (a node must be able to drop its vector), and the index is
//! persisted with the memory-log watermark it reflects. `hnsw_rs` cannot delete,
//! reloads through a borrowing loader and pulls rayon, env_logger, mmap-rs and a
//! second `rand` into the build; `usearch` is a C++ build. The algorithm itself
//! is small: one arena of half-precision vectors (`dot.rs`), neighbour lists
//! (`links.rs`), the paper's neighbour-selection heuristic, and a filtered
//! layer-0 search that walks every node but only admits allowed ones to the
//! result set (as hnswlib does). Keys are memory-log positions (`seq`), the
//! same key the text index uses.
//!
//! Insertion is a graph walk per new vector, and a walk is bound by memory,
//! not arithmetic: the vectors are read at random from far more than the
//! cache holds. Hence the half-precision vectors, the flat layer-0 lists, the
//! prefetches in `search_layer` and the huge pages of `memory.rs`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

mod dot;
mod links;
mod memory;

use dot::{dot, extend_half, widen};
use half::f16;
use links::{Links, LAYER0_CAP, UPPER_CAP};

const M: usize = 16;
const M0: usize = 2 * M;
const EF_CONSTRUCTION: usize = 64;
/// A neighbour list may grow this far past its bound before it is pruned back
/// with the heuristic: pruning costs O(m²) dot products, and doing it on every
/// overflow (as the paper does) was most of the insertion time at 384-d.
const SLACK: usize = M / 2;
const MAGIC: &[u8; 8] = b"CNCHNSW2";
/// How many vectors ahead of the one being scored the walk asks the CPU to load.
const PREFETCH_AHEAD: usize = 2;
/// Most nodes of one [`Hnsw::insert_batch`] chunk: they find each other by exact
/// distance, not through the graph, which costs chunk² / 2 dot products.
const PARALLEL_CHUNK: usize = 256;

#[derive(Clone, Copy, PartialEq)]
struct Near {
    dist: f32,
    node: u32,
}
impl Eq for Near {}
impl Ord for Near {
    fn cmp(&self, o: &Self) -> Ordering {
        self.dist
            .partial_cmp(&o.dist)
            .unwrap_or(Ordering::Equal)
            .then(self.node.cmp(&o.node))
    }
}
impl PartialOrd for Near {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Per-search visited set: a bitset over node numbers.
struct Visited(Vec<u64>);
impl Visited {
    fn new(n: usize) -> Self {
        Visited(vec![0; n.div_ceil(64)])
    }
    /// Marks `i`; true if it was not marked yet.
    fn insert(&mut self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !was
    }
}

pub struct Hnsw {
    dim: usize,
    /// Unit vectors in half precision (see `dot.rs`), `dim` per node.
    vectors: Vec<f16>,
    keys: Vec<i64>,
    /// Creation times (ms), for recency without a store round trip.
    created: Vec<i64>,
    /// Purged: the vector is zeroed and the node never returned.
    dead: Vec<bool>,
    links: Links,
    entry: Option<u32>,
    by_key: HashMap<i64, u32>,
    rng: u64,
}

impl Hnsw {
    pub fn new(dim: usize) -> Hnsw {
        Hnsw {
            dim,
            vectors: Vec::new(),
            keys: Vec::new(),
            created: Vec::new(),
            dead: Vec::new(),
            links: Links::new(),
            entry: None,
            by_key: HashMap::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, key: i64) -> bool {
        self.by_key.contains_key(&key)
    }

    fn vec_of(&self, n: u32) -> &[f16] {
        let s = n as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    /// Starts loading node `n`'s vector into the cache.
    #[inline]
    fn prefetch(&self, n: u32) {
        memory::prefetch(self.vec_of(n));
    }

    fn dist(&self, q: &[f32], n: u32) -> f32 {
        1.0 - dot(q, self.vec_of(n))
    }

    fn random_level(&mut self) -> usize {
        // xorshift64*: deterministic, so a rebuild from the same log is the same graph.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let u = ((r >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let ml = 1.0 / (M as f64).ln();
        ((-u.ln() * ml) as usize).min(16)
    }

    /// Greedy/beam search of one level from `eps`. `allow`: only allowed nodes
    /// enter the result set (all are walked).
    fn search_layer(
        &self,
        q: &[f32],
        eps: &[Near],
        ef: usize,
        level: usize,
        allow: Option<&dyn Fn(u32) -> bool>,
        visited: &mut Visited,
    ) -> Vec<Near> {
        let mut cand: BinaryHeap<std::cmp::Reverse<Near>> = BinaryHeap::new();
        let mut best: BinaryHeap<Near> = BinaryHeap::new();
        let admit = |n: u32| !self.dead[n as usize] && allow.is_none_or(|f| f(n));
        let mut fresh: Vec<u32> = Vec::with_capacity(M0 + SLACK);
        for e in eps {
            if visited.insert(e.node) {
                cand.push(std::cmp::Reverse(*e));
                if admit(e.node) {
                    best.push(*e);
                }
            }
        }
        while let Some(std::cmp::Reverse(c)) = cand.pop() {
            if best.len() >= ef && best.peek().is_some_and(|w| c.dist > w.dist) {
                break;
            }
            if level == 0 {
                if let Some(next) = cand.peek() {
                    self.links.prefetch(next.0.node);
                }
            }
            let Some(nbrs) = self.links.get(c.node, level) else {
                continue;
            };
            // The unvisited first, so that each vector can be fetched from
            // memory while the one before it is scored: most of a distance's
            // time was the wait for its vector's cache lines.
            fresh.clear();
            fresh.extend(nbrs.iter().copied().filter(|&n| visited.insert(n)));
            for &n in fresh.iter().take(PREFETCH_AHEAD) {
                self.prefetch(n);
            }
            for (i, &n) in fresh.iter().enumerate() {
                if let Some(&ahead) = fresh.get(i + PREFETCH_AHEAD) {
                    self.prefetch(ahead);
                }
                let d = self.dist(q, n);
                if best.len() < ef || best.peek().is_some_and(|w| d < w.dist) {
                    cand.push(std::cmp::Reverse(Near { dist: d, node: n }));
                    if admit(n) {
                        best.push(Near { dist: d, node: n });
                        if best.len() > ef {
                            best.pop();
                        }
                    }
                }
            }
        }
        let mut v = best.into_vec();
        v.sort();
        v
    }

    /// The paper's heuristic (algorithm 4): keep a candidate only if it is closer
    /// to the base than to every neighbour kept so far; spreads links across
    /// clusters, which is what keeps recall high on clustered data.
    fn select(&self, cands: &[Near], m: usize) -> Vec<u32> {
        let mut out: Vec<Near> = Vec::with_capacity(m);
        let mut cv = Vec::with_capacity(self.dim);
        for c in cands {
            if out.len() >= m {
                break;
            }
            widen(self.vec_of(c.node), &mut cv);
            if out
                .iter()
                .all(|k| 1.0 - dot(&cv, self.vec_of(k.node)) > c.dist)
            {
                out.push(*c);
            }
        }
        if out.len() < m {
            for c in cands {
                if out.len() >= m {
                    break;
                }
                if !out.iter().any(|k| k.node == c.node) {
                    out.push(*c);
                }
            }
        }
        out.into_iter().map(|n| n.node).collect()
    }

    /// Adds a vector (normalized here) under `key`; a key already present is left
    /// as it is (a memory's vector never changes once set).
    pub fn insert(&mut self, key: i64, created_at: i64, v: &[f32]) {
        if v.len() != self.dim || self.by_key.contains_key(&key) {
            return;
        }
        let (node, level) = self.append(key, created_at, v);
        let Some(entry) = self.entry else {
            self.entry = Some(node);
            return;
        };
        let top = self.links.level(entry);
        for (l, w) in self.walk(node, entry, top, level).iter().enumerate().rev() {
            self.link(node, l, w);
        }
        if level > top {
            self.entry = Some(node);
        }
    }

    /// Adds a vector (normalized here) as a node with no links yet, so that no
    /// walk reaches it until it is linked; returns the node and its level.
    fn append(&mut self, key: i64, created_at: i64, v: &[f32]) -> (u32, usize) {
        let mut q = v.to_vec();
        concord_core::recall::normalize(&mut q);
        let node = self.keys.len() as u32;
        let level = self.random_level();
        memory::reserve_huge(&mut self.vectors, self.dim);
        extend_half(&mut self.vectors, &q);
        self.keys.push(key);
        self.created.push(created_at);
        self.dead.push(false);
        self.links.push_node(level);
        self.by_key.insert(key, node);
        (node, level)
    }

    /// A new node's walk down from `entry` (whose level is `top`): its link
    /// candidates, nearest first, at each level it shares with the graph
    /// (indexed by level). Reads the graph only.
    fn walk(&self, node: u32, entry: u32, top: usize, level: usize) -> Vec<Vec<Near>> {
        let mut q = Vec::with_capacity(self.dim);
        widen(self.vec_of(node), &mut q);
        let q = q.as_slice();
        let mut eps = vec![Near {
            dist: self.dist(q, entry),
            node: entry,
        }];
        for l in (level + 1..=top).rev() {
            eps = self.search_layer(q, &eps, 1, l, None, &mut Visited::new(self.keys.len()));
        }
        let mut found = vec![Vec::new(); level.min(top) + 1];
        for l in (0..=level.min(top)).rev() {
            let w = self.search_layer(
                q,
                &eps,
                EF_CONSTRUCTION,
                l,
                None,
                &mut Visited::new(self.keys.len()),
            );
            found[l] = w.clone();
            eps = w;
        }
        found
    }

    /// Gives `node` its neighbours at level `l`, chosen from `cands` (sorted,
    /// nearest first), and links each of them back, pruning a list that has
    /// grown past its slack.
    fn link(&mut self, node: u32, l: usize, cands: &[Near]) {
        let max = if l == 0 { M0 } else { M };
        let nbrs = self.select(cands, M);
        for &n in &nbrs {
            let Some(list) = self.links.get(n, l) else {
                continue;
            };
            if list.len() < max + SLACK {
                self.links.push(n, l, node);
                continue;
            }
            // Full: back to `max` by the heuristic, the new node a candidate.
            let mut base = Vec::with_capacity(self.dim);
            widen(self.vec_of(n), &mut base);
            let mut cands: Vec<Near> = list
                .iter()
                .copied()
                .chain([node])
                .map(|x| Near {
                    dist: 1.0 - dot(&base, self.vec_of(x)),
                    node: x,
                })
                .collect();
            cands.sort();
            let kept = self.select(&cands, max);
            self.links.set(n, l, &kept);
        }
        self.links.set(node, l, &nbrs);
    }

    /// Adds many vectors, as `insert` does, with the graph walks (most of an
    /// insertion's work) on up to `threads` threads. Items whose dimension is
    /// wrong or whose key is present (or repeated) are skipped.
    ///
    /// Why: a memory write waits for this replica's index (read-your-writes), and
    /// one thread walking the graph bounded `concord bench ingest` while the
    /// other core was half idle.
    ///
    /// How: the items go in chunks. A chunk's nodes walk the graph as it was
    /// before the chunk, side by side and read-only; then each is linked in
    /// order, its candidates completed with the chunk's earlier nodes at their
    /// exact distances (the walks cannot see them). The graph depends only on the
    /// items and the chunking, not on the threads, so the same batches give the
    /// same graph.
    pub fn insert_batch(&mut self, items: &[(i64, i64, &[f32])], threads: usize) {
        let mut seen = std::collections::HashSet::new();
        let items: Vec<(i64, i64, &[f32])> = items
            .iter()
            .filter(|(k, _, v)| {
                v.len() == self.dim && !self.by_key.contains_key(k) && seen.insert(*k)
            })
            .copied()
            .collect();
        let mut rest = items.as_slice();
        // The first node is the entry point: nothing to walk yet.
        while self.entry.is_none() {
            let Some(((key, created, v), tail)) = rest.split_first() else {
                return;
            };
            self.insert(*key, *created, v);
            rest = tail;
        }
        for chunk in rest.chunks(PARALLEL_CHUNK) {
            self.insert_chunk(chunk, threads.max(1));
        }
    }

    fn insert_chunk(&mut self, chunk: &[(i64, i64, &[f32])], threads: usize) {
        let Some(entry) = self.entry else { return };
        let top = self.links.level(entry);
        let first = self.keys.len() as u32;
        let levels: Vec<usize> = chunk
            .iter()
            .map(|(key, created, v)| self.append(*key, *created, v).1)
            .collect();
        let me = &*self;
        let walk = |i: usize| me.walk(first + i as u32, entry, top, levels[i]);
        // Thread t walks items t, t + threads, …: neighbouring items cost alike.
        let threads = threads.min(chunk.len());
        let mut walks: Vec<Vec<Vec<Near>>> = vec![Vec::new(); chunk.len()];
        std::thread::scope(|s| {
            let walk = &walk;
            let others: Vec<_> = (1..threads)
                .map(|t| {
                    s.spawn(move || {
                        (t..chunk.len())
                            .step_by(threads)
                            .map(|i| (i, walk(i)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for i in (0..chunk.len()).step_by(threads) {
                walks[i] = walk(i);
            }
            for h in others {
                // A walk only reads the graph; should one panic anyway, its
                // nodes are linked from the chunk's other nodes alone.
                if let Ok(done) = h.join() {
                    for (i, w) in done {
                        walks[i] = w;
                    }
                }
            }
        });
        for (i, mut found) in walks.into_iter().enumerate() {
            let node = first + i as u32;
            let mut q = Vec::with_capacity(self.dim);
            widen(self.vec_of(node), &mut q);
            let top_now = self.entry.map_or(0, |e| self.links.level(e));
            for l in (0..=levels[i]).rev() {
                let mut cands = found.get_mut(l).map(std::mem::take).unwrap_or_default();
                cands.extend((0..i).filter(|&j| levels[j] >= l).map(|j| {
                    let other = first + j as u32;
                    Near {
                        dist: 1.0 - dot(&q, self.vec_of(other)),
                        node: other,
                    }
                }));
                if cands.is_empty() {
                    continue;
                }
                cands.sort();
                self.link(node, l, &cands);
            }
            if levels[i] > top_now {
                self.entry = Some(node);
            }
        }
    }

    /// Drops a node's vector for good (an admin purge): it stays in the graph as
    /// a waypoint with a zero vector and is never returned.
    pub fn purge(&mut self, key: i64) {
        if let Some(&n) = self.by_key.get(&key) {
            self.dead[n as usize] = true;
            let s = n as usize * self.dim;
            self.vectors[s..s + self.dim].fill(f16::ZERO);
        }
    }

    /// The `k` nearest allowed keys to `q`, as (key, cosine, created_at), best first.
    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        allow: Option<&dyn Fn(i64) -> bool>,
    ) -> Vec<(i64, f32, i64)> {
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        if q.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let mut q = q.to_vec();
        concord_core::recall::normalize(&mut q);
        let top = self.links.level(entry);
        let mut eps = vec![Near {
            dist: self.dist(&q, entry),
            node: entry,
        }];
        for l in (1..=top).rev() {
            let mut visited = Visited::new(self.keys.len());
            eps = self.search_layer(&q, &eps, 1, l, None, &mut visited);
        }
        let keys = &self.keys;
        let node_allow = allow.map(|f| move |n: u32| f(keys[n as usize]));
        let dyn_allow: Option<&dyn Fn(u32) -> bool> =
            node_allow.as_ref().map(|f| f as &dyn Fn(u32) -> bool);
        let mut visited = Visited::new(self.keys.len());
        let found = self.search_layer(&q, &eps, ef.max(k), 0, dyn_allow, &mut visited);
        found
            .into_iter()
            .take(k)
            .map(|n| {
                (
                    self.keys[n.node as usize],
                    1.0 - n.dist,
                    self.created[n.node as usize],
                )
            })
            .collect()
    }

    /// Exact search over the given keys (for selective filters, where a graph walk
    /// would visit most of the graph to find a few allowed nodes anyway).
    pub fn exact(&self, q: &[f32], keys: &[i64], k: usize) -> Vec<(i64, f32, i64)> {
        let mut q = q.to_vec();
        concord_core::recall::normalize(&mut q);
        let mut all: Vec<(i64, f32, i64)> = keys
            .iter()
            .filter_map(|key| self.by_key.get(key).map(|&n| (key, n)))
            .filter(|(_, n)| !self.dead[*n as usize])
            .map(|(key, n)| (*key, dot(&q, self.vec_of(n)), self.created[n as usize]))
            .collect();
        all.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        all.truncate(k);
        all
    }

    pub fn write_to(&self, w: &mut impl Write, watermark: i64) -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        for x in [
            self.dim as u64,
            self.keys.len() as u64,
            watermark as u64,
            self.rng,
        ] {
            w.write_all(&x.to_le_bytes())?;
        }
        w.write_all(&(self.entry.map(i64::from).unwrap_or(-1)).to_le_bytes())?;
        for n in 0..self.keys.len() {
            w.write_all(&self.keys[n].to_le_bytes())?;
            w.write_all(&self.created[n].to_le_bytes())?;
            let node = n as u32;
            let level = self.links.level(node);
            w.write_all(&[self.dead[n] as u8, level as u8 + 1])?;
            for x in self.vec_of(n as u32) {
                w.write_all(&x.to_bits().to_le_bytes())?;
            }
            for l in (0..=level).filter_map(|l| self.links.get(node, l)) {
                w.write_all(&(l.len() as u32).to_le_bytes())?;
                for x in l {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Reads what [`Hnsw::write_to`] wrote; returns the graph and its watermark.
    pub fn read_from(r: &mut impl Read) -> std::io::Result<(Hnsw, i64)> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(bad("not a concord vector index"));
        }
        let mut u = [0u8; 8];
        let mut next = |r: &mut dyn Read| -> std::io::Result<u64> {
            r.read_exact(&mut u)?;
            Ok(u64::from_le_bytes(u))
        };
        let dim = next(r)? as usize;
        let n = next(r)? as usize;
        let watermark = next(r)? as i64;
        let rng = next(r)?;
        let entry = next(r)? as i64;
        if dim == 0 || dim > concord_core::memory::MAX_EMBEDDING_DIM {
            return Err(bad("bad dimension"));
        }
        let mut h = Hnsw::new(dim);
        h.rng = rng;
        let mut b4 = [0u8; 4];
        let mut b8 = [0u8; 8];
        for node in 0..n {
            r.read_exact(&mut b8)?;
            let key = i64::from_le_bytes(b8);
            r.read_exact(&mut b8)?;
            let created = i64::from_le_bytes(b8);
            let mut fl = [0u8; 2];
            r.read_exact(&mut fl)?;
            memory::reserve_huge(&mut h.vectors, dim);
            let mut b2 = [0u8; 2];
            for _ in 0..dim {
                r.read_exact(&mut b2)?;
                h.vectors.push(f16::from_bits(u16::from_le_bytes(b2)));
            }
            let mut levels = Vec::with_capacity(fl[1] as usize);
            for level in 0..fl[1] {
                r.read_exact(&mut b4)?;
                let c = u32::from_le_bytes(b4) as usize;
                if c > if level == 0 { LAYER0_CAP } else { UPPER_CAP } {
                    return Err(bad("bad neighbour count"));
                }
                let mut l = Vec::with_capacity(c);
                for _ in 0..c {
                    r.read_exact(&mut b4)?;
                    let x = u32::from_le_bytes(b4);
                    if x as usize >= n {
                        return Err(bad("bad neighbour"));
                    }
                    l.push(x);
                }
                levels.push(l);
            }
            if levels.is_empty() {
                return Err(bad("node without levels"));
            }
            h.keys.push(key);
            h.created.push(created);
            h.dead.push(fl[0] != 0);
            h.links.push_node(levels.len() - 1);
            for (l, list) in levels.iter().enumerate() {
                h.links.set(node as u32, l, list);
            }
            h.by_key.insert(key, node as u32);
        }
        h.entry = (entry >= 0 && (entry as usize) < n).then_some(entry as u32);
        Ok((h, watermark))
    }

    pub fn save(&self, path: &Path, watermark: i64) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        {
            let f = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::new(f);
            self.write_to(&mut w, watermark)?;
            w.flush()?;
        }
        std::fs::rename(tmp, path)
    }

    pub fn load(path: &Path) -> std::io::Result<(Hnsw, i64)> {
        let f = std::fs::File::open(path)?;
        Hnsw::read_from(&mut std::io::BufReader::new(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vecs(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                (0..dim)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                    })
                    .collect()
            })
            .collect()
    }

    /// Keys (index + 1) of the `k` vectors of `data` nearest to `q` by cosine,
    /// computed in f32 without the index.
    fn exact_f32(data: &[Vec<f32>], q: &[f32], k: usize) -> Vec<i64> {
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let mut all: Vec<(f32, i64)> = data
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let cos = q.iter().zip(v).map(|(a, b)| a * b).sum::<f32>() / (norm(q) * norm(v));
                (cos, i as i64 + 1)
            })
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0));
        all.into_iter().take(k).map(|x| x.1).collect()
    }

    #[test]
    fn finds_the_exact_neighbours_mostly_and_respects_the_filter() {
        let dim = 32;
        let data = rand_vecs(2000, dim, 7);
        let mut h = Hnsw::new(dim);
        for (i, v) in data.iter().enumerate() {
            h.insert(i as i64 + 1, 0, v);
        }
        let keys: Vec<i64> = (1..=2000).collect();
        let queries = rand_vecs(50, dim, 99);
        let (mut hits, mut exact_hits) = (0, 0);
        for q in &queries {
            // The truth in full precision, from the vectors as given.
            let truth = exact_f32(&data, q, 10);
            let exact: Vec<i64> = h.exact(q, &keys, 10).iter().map(|x| x.0).collect();
            exact_hits += exact.iter().filter(|k| truth.contains(k)).count();
            let got: Vec<i64> = h.search(q, 10, 64, None).iter().map(|x| x.0).collect();
            hits += got.iter().filter(|k| truth.contains(k)).count();
            let even: Vec<(i64, f32, i64)> = h.search(q, 10, 64, Some(&|k| k % 2 == 0));
            assert!(even.iter().all(|x| x.0 % 2 == 0));
            assert_eq!(even.len(), 10);
        }
        let recall = hits as f64 / 500.0;
        assert!(recall > 0.9, "recall@10 {recall}");
        // Half precision moves only near-ties across the top 10's edge.
        let agree = exact_hits as f64 / 500.0;
        assert!(agree > 0.98, "exact search in f16 against f32: {agree}");
    }

    /// Batches (several chunks, walks on several threads) find what one-by-one
    /// insertion finds, skip what `insert` skips, and give the same graph
    /// whatever the number of threads.
    #[test]
    fn batch_insertion_finds_the_neighbours_and_does_not_depend_on_threads() {
        let dim = 32;
        let data = rand_vecs(3000, dim, 11);
        let build = |threads: usize| {
            let mut h = Hnsw::new(dim);
            // Uneven batches, as the applier sees them; the first starts the graph.
            for (b, part) in data.chunks(700).enumerate() {
                let mut items: Vec<(i64, i64, &[f32])> = part
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ((b * 700 + i) as i64 + 1, 0, v.as_slice()))
                    .collect();
                // A repeated key, a present key and a wrong dimension: skipped.
                items.push(items[0]);
                items.push((1, 0, data[1].as_slice()));
                items.push((999_999, 0, &data[2][..dim - 1]));
                h.insert_batch(&items, threads);
            }
            h
        };
        let (one, three) = (build(1), build(3));
        assert_eq!(one.len(), 3000);
        assert!(!one.contains(999_999));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        one.write_to(&mut a, 0).unwrap();
        three.write_to(&mut b, 0).unwrap();
        assert!(a == b, "the graph depends on the thread count");

        let keys: Vec<i64> = (1..=3000).collect();
        let queries = rand_vecs(50, dim, 5);
        let mut hits = 0;
        for q in &queries {
            let exact: Vec<i64> = three.exact(q, &keys, 10).iter().map(|x| x.0).collect();
            let got: Vec<i64> = three.search(q, 10, 64, None).iter().map(|x| x.0).collect();
            hits += got.iter().filter(|k| exact.contains(k)).count();
            let odd = three.search(q, 10, 64, Some(&|k| k % 2 == 1));
            assert!(odd.iter().all(|x| x.0 % 2 == 1));
            assert_eq!(odd.len(), 10);
        }
        let recall = hits as f64 / 500.0;
        assert!(recall > 0.9, "recall@10 {recall}");
        // Every stored vector is findable as its own nearest neighbour.
        let found = data
            .iter()
            .enumerate()
            .step_by(37)
            .filter(|(i, v)| three.search(v, 1, 64, None)[0].0 == *i as i64 + 1)
            .count();
        assert_eq!(found, data.len().div_ceil(37));
    }

    #[test]
    fn purge_and_persistence() {
        let dim = 8;
        let data = rand_vecs(300, dim, 3);
        let mut h = Hnsw::new(dim);
        for (i, v) in data.iter().enumerate() {
            h.insert(i as i64, i as i64 * 10, v);
        }
        let q = &data[5];
        assert_eq!(h.search(q, 1, 32, None)[0].0, 5);
        h.purge(5);
        assert!(h.search(q, 10, 32, None).iter().all(|x| x.0 != 5));
        let mut buf = Vec::new();
        h.write_to(&mut buf, 42).unwrap();
        let (back, wm) = Hnsw::read_from(&mut buf.as_slice()).unwrap();
        assert_eq!(wm, 42);
        assert_eq!(back.len(), 300);
        assert_eq!(
            back.search(&data[7], 1, 32, None)[0],
            h.search(&data[7], 1, 32, None)[0]
        );
        assert!(Hnsw::read_from(&mut &buf[..20]).is_err());
    }
}
