//! The recall index (DESIGN §2 "Recall index"): derived from the memory log, one
//! implementation for both backends, kept in the hub process.
//!
//! - [`text`]: tantivy, BM25 plus the filter fields, so visibility and every
//!   filter apply inside the index before anything is scored;
//! - [`hnsw`]: the ANN graph over embeddings, one per dimension;
//! - [`embedder`]: the optional OpenAI-compatible embedder and its fill-in task.
//!
//! One applier task follows the memory log (`memory_changes` after the
//! watermark) and applies each batch to both indexes; it runs when a commit that
//! may have moved the memory log is announced (`Store::watch_memory`: on SQLite
//! the writer's note of memory-log positions taken, on PostgreSQL every commit
//! and other replicas' NOTIFY), and
//! on demand: a handler that wrote a memory calls [`RecallIndex::sync`] before it
//! answers, so the writer's next recall on this replica sees its write
//! (read-your-writes). Concurrent `sync` calls share one pass, like a group commit.
//!
//! Both indexes persist in `<data dir>/recall/` with the watermark they reflect
//! (tantivy's commit payload; a header of each vector file). At start the applier
//! catches up from there; deleting the directory costs a rebuild, never data.

pub mod embedder;
pub mod hnsw;
pub mod text;

use concord_core::memory::Explain;
use concord_core::recall::fuse;
use concord_core::{Error, Result};
use concord_store::{DynStore, StoredMemory};
use hnsw::Hnsw;
use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{mpsc, oneshot, watch};

/// Rows read from the memory log per pass.
const PAGE: usize = 2000;
/// Below this many allowed memories a vector search is exact (a brute-force
/// scan of a few thousand dot products is faster than a filtered graph walk
/// that must visit most of the graph to find them, and it is exact).
const EXACT_BELOW: usize = 4000;
/// Search breadth of the graph walk (multiplied for selective filters).
const EF_SEARCH: usize = 96;
/// How often the applier saves the vector graphs when they changed.
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// What a reader may and wants to see, resolved by the handler from the caller
/// and the request. Every field narrows; none widens.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The reader's access tokens; `None` for an admin (sees everything).
    pub acl: Option<Vec<String>>,
    /// Writer tokens the reader's entity trusts (`trusted_only`).
    pub trusted: Option<Vec<String>>,
    /// Writer tokens asked for (`writers`).
    pub writers: Option<Vec<String>>,
    /// Empty: every space.
    pub spaces: Vec<String>,
    pub kinds: Vec<String>,
    /// All must be present.
    pub tags: Vec<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub as_of: Option<i64>,
    pub include_closed: bool,
    pub now: i64,
    /// A fork reader: its entity's canonical space and its fork point.
    pub fork: Option<(String, i64)>,
}

impl Filter {
    fn validity(&self, f: &text::Fields) -> Vec<Box<dyn tantivy::query::Query>> {
        let mut v = Vec::new();
        if let Some(t) = self.as_of {
            v.push(text::range(
                f.created_at,
                Bound::Unbounded,
                Bound::Included(t),
            ));
            v.push(text::range(
                f.valid_at,
                Bound::Unbounded,
                Bound::Included(t),
            ));
            if !self.include_closed {
                v.push(text::range(
                    f.invalid_at,
                    Bound::Excluded(t),
                    Bound::Unbounded,
                ));
            }
        } else if !self.include_closed {
            v.push(text::eq_i64(f.invalid_at, text::OPEN));
            v.push(text::range(
                f.valid_at,
                Bound::Unbounded,
                Bound::Included(self.now),
            ));
        }
        v
    }

    pub fn query(&self, f: &text::Fields) -> Box<dyn tantivy::query::Query> {
        let mut must: Vec<Box<dyn tantivy::query::Query>> = Vec::new();
        if let Some(acl) = &self.acl {
            must.push(text::any_of(f.acl, acl));
        }
        if let Some(t) = &self.trusted {
            must.push(text::any_of(f.writer, t));
        }
        if let Some(w) = &self.writers {
            must.push(text::any_of(f.writer, w));
        }
        if !self.spaces.is_empty() {
            must.push(text::any_of(f.space, &self.spaces));
        }
        if !self.kinds.is_empty() {
            must.push(text::any_of(f.kind, &self.kinds));
        }
        for t in &self.tags {
            must.push(text::term(f.tags, t));
        }
        if self.since.is_some() || self.until.is_some() {
            let lo = self.since.map(Bound::Included).unwrap_or(Bound::Unbounded);
            let hi = self.until.map(Bound::Included).unwrap_or(Bound::Unbounded);
            must.push(text::range(f.created_at, lo, hi));
        }
        match &self.fork {
            None => must.extend(self.validity(f)),
            Some((canonical, point)) => {
                // Canonical as of the fork point (what was written by then and not
                // closed by then); everything else as usual.
                let mut at_fork = vec![
                    text::term(f.space, canonical),
                    text::range(f.seq, Bound::Unbounded, Bound::Included(*point)),
                ];
                if !self.include_closed {
                    at_fork.push(text::range(
                        f.closed_seq,
                        Bound::Excluded(*point),
                        Bound::Unbounded,
                    ));
                }
                if let Some(t) = self.as_of {
                    at_fork.push(text::range(
                        f.created_at,
                        Bound::Unbounded,
                        Bound::Included(t),
                    ));
                }
                let others =
                    text::but_not(text::all(self.validity(f)), text::term(f.space, canonical));
                must.push(text::either(vec![text::all(at_fork), others]));
            }
        }
        text::all(must)
    }
}

/// One recall hit before the handler fetches the memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub seq: i64,
    pub score: f32,
    pub explain: Explain,
}

pub struct Searched {
    pub hybrid: bool,
    pub note: Option<String>,
    pub found: Vec<Found>,
}

type Waiter = oneshot::Sender<Result<()>>;

pub struct RecallIndex {
    store: DynStore,
    text: Arc<Mutex<text::TextIndex>>,
    reader: tantivy::IndexReader,
    index: tantivy::Index,
    fields: text::Fields,
    vectors: Arc<RwLock<HashMap<usize, Hnsw>>>,
    /// Everything at or below is in the text index / the vector graphs.
    text_mark: AtomicI64,
    vector_mark: AtomicI64,
    dir: Option<PathBuf>,
    requests: mpsc::UnboundedSender<Option<Waiter>>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Option<Waiter>>>>,
    /// True once the first catch-up after start has run: searches wait for it,
    /// so that a restarted hub never answers from a half-rebuilt index.
    ready: watch::Sender<bool>,
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("vectors.meta")
}

impl RecallIndex {
    /// Opens (or creates) the index under `dir` (`None`: in memory only).
    pub fn open(store: DynStore, dir: Option<&Path>) -> Result<RecallIndex> {
        let text = text::TextIndex::open(dir.map(|d| d.join("text")).as_deref())?;
        let (vectors, vector_mark) = match dir {
            Some(d) => Self::load_vectors(d),
            None => (HashMap::new(), 0),
        };
        let (requests, inbox) = mpsc::unbounded_channel();
        Ok(RecallIndex {
            store,
            reader: text.reader(),
            index: text.index().clone(),
            fields: text.fields,
            text_mark: AtomicI64::new(text.watermark()),
            vector_mark: AtomicI64::new(vector_mark),
            text: Arc::new(Mutex::new(text)),
            vectors: Arc::new(RwLock::new(vectors)),
            dir: dir.map(Path::to_path_buf),
            requests,
            inbox: Mutex::new(Some(inbox)),
            ready: watch::channel(false).0,
        })
    }

    /// The vector graphs and their watermark; empty (rebuilt from the log) if any
    /// file is missing or unreadable.
    fn load_vectors(dir: &Path) -> (HashMap<usize, Hnsw>, i64) {
        let load = || -> std::io::Result<(HashMap<usize, Hnsw>, i64)> {
            let meta = std::fs::read_to_string(meta_path(dir))?;
            let mut lines = meta.lines();
            let mark: i64 = lines
                .next()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| std::io::Error::other("bad vectors.meta"))?;
            let mut out = HashMap::new();
            for l in lines {
                let dim: usize = l.parse().map_err(std::io::Error::other)?;
                let (h, m) = Hnsw::load(&dir.join(format!("vectors-{dim}.bin")))?;
                if m != mark || h.dim() != dim {
                    return Err(std::io::Error::other("vector files disagree"));
                }
                out.insert(dim, h);
            }
            Ok((out, mark))
        };
        match load() {
            Ok(x) => x,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(
                        "vector index unreadable ({e}); rebuilding it from the memory log"
                    );
                }
                (HashMap::new(), 0)
            }
        }
    }

    fn save_vectors(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        let graphs = self
            .vectors
            .read()
            .map_err(|_| std::io::Error::other("vector index lock poisoned"))?;
        let mark = self.vector_mark.load(Ordering::SeqCst);
        let mut meta = format!("{mark}\n");
        for (dim, h) in graphs.iter() {
            h.save(&dir.join(format!("vectors-{dim}.bin")), mark)?;
            meta.push_str(&format!("{dim}\n"));
        }
        let tmp = meta_path(dir).with_extension("tmp");
        std::fs::write(&tmp, meta)?;
        std::fs::rename(tmp, meta_path(dir))
    }

    /// The memory-log position both indexes reflect.
    pub fn watermark(&self) -> i64 {
        self.text_mark
            .load(Ordering::SeqCst)
            .min(self.vector_mark.load(Ordering::SeqCst))
    }

    /// Dimensions that have vectors.
    pub fn dims(&self) -> Vec<usize> {
        self.vectors
            .read()
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Waits until everything committed before the call is indexed.
    pub async fn sync(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Some(tx))
            .map_err(|_| Error::unavailable("the recall index has stopped"))?;
        rx.await
            .map_err(|_| Error::unavailable("the recall index has stopped"))?
    }

    /// Asks for a catch-up pass without waiting for it.
    pub fn nudge(&self) {
        let _ = self.requests.send(None);
    }

    /// Applies one page of the memory log; returns how many rows it had.
    async fn pass_page(self: &Arc<Self>) -> Result<usize> {
        let from = self.watermark();
        let t0 = std::time::Instant::now();
        let rows = self.store.memory_changes(from, PAGE).await?;
        let t_read = t0.elapsed();
        let Some(last) = rows.last().map(|r| r.changed_seq) else {
            return Ok(0);
        };
        let n = rows.len();
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.apply(rows, last))
            .await
            .map_err(|e| Error::internal(format!("recall index task failed: {e}")))??;
        tracing::debug!(rows = n, read = ?t_read, total = ?t0.elapsed(), "recall index pass");
        Ok(n)
    }

    /// Applies a page to both indexes, the text index and the vector graphs in
    /// parallel (two threads: a tantivy commit and HNSW insertions take about as
    /// long as each other, and nothing is answered before both are done).
    fn apply(&self, rows: Vec<StoredMemory>, last: i64) -> Result<()> {
        let (tm, vm) = (
            self.text_mark.load(Ordering::SeqCst),
            self.vector_mark.load(Ordering::SeqCst),
        );
        let rows = &rows;
        let vectors = || -> Result<()> {
            if !rows
                .iter()
                .any(|r| r.changed_seq > vm && (r.embedding.is_some() || r.memory.purged))
            {
                return Ok(());
            }
            let mut graphs = self
                .vectors
                .write()
                .map_err(|_| Error::internal("vector index lock poisoned"))?;
            // Runs of new vectors go in as batches (their walks in parallel);
            // a purge ends the run, so it lands after the inserts before it.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut run: Vec<(i64, i64, &[f32])> = Vec::new();
            let flush = |graphs: &mut HashMap<usize, Hnsw>, run: &mut Vec<(i64, i64, &[f32])>| {
                // One graph per dimension: a run may mix them.
                let mut dims: Vec<usize> = run.iter().map(|r| r.2.len()).collect();
                dims.sort_unstable();
                dims.dedup();
                for dim in dims {
                    let items: Vec<(i64, i64, &[f32])> =
                        run.iter().filter(|r| r.2.len() == dim).copied().collect();
                    graphs
                        .entry(dim)
                        .or_insert_with(|| Hnsw::new(dim))
                        .insert_batch(&items, threads);
                }
                run.clear();
            };
            for r in rows.iter().filter(|r| r.changed_seq > vm) {
                if r.memory.purged {
                    flush(&mut graphs, &mut run);
                    graphs.values_mut().for_each(|g| g.purge(r.memory.seq));
                } else if let Some(v) = &r.embedding {
                    run.push((r.memory.seq, r.memory.created_at.millis(), v));
                }
            }
            flush(&mut graphs, &mut run);
            Ok(())
        };
        let text = || -> Result<()> {
            let mut text = self
                .text
                .lock()
                .map_err(|_| Error::internal("recall index lock poisoned"))?;
            let mut staged = false;
            for r in rows.iter().filter(|r| r.changed_seq > tm) {
                text.stage(r)?;
                staged = true;
            }
            if staged || last > tm {
                text.commit(last)?;
            }
            Ok(())
        };
        let (t, v) = std::thread::scope(|s| {
            let v = s.spawn(vectors);
            let t = text();
            (t, v.join())
        });
        t?;
        self.text_mark.store(last, Ordering::SeqCst);
        v.map_err(|_| Error::internal("vector index insertion panicked"))??;
        self.vector_mark.store(last, Ordering::SeqCst);
        Ok(())
    }

    async fn catch_up(self: &Arc<Self>) -> Result<()> {
        while self.pass_page().await? == PAGE {}
        Ok(())
    }

    /// An index ahead of the store belongs to another database (a data dir
    /// pointed elsewhere, a restored backup): start it over.
    async fn check_origin(self: &Arc<Self>) -> Result<()> {
        let head = self.store.last_memory_seq().await?;
        let mark = self
            .text_mark
            .load(Ordering::SeqCst)
            .max(self.vector_mark.load(Ordering::SeqCst));
        if mark <= head {
            return Ok(());
        }
        tracing::warn!(
            index = mark,
            store = head,
            "the recall index is ahead of the memory log; rebuilding it"
        );
        let me = self.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut text = me
                .text
                .lock()
                .map_err(|_| Error::internal("recall index lock poisoned"))?;
            text.clear()?;
            me.vectors
                .write()
                .map_err(|_| Error::internal("vector index lock poisoned"))?
                .clear();
            me.text_mark.store(0, Ordering::SeqCst);
            me.vector_mark.store(0, Ordering::SeqCst);
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(format!("recall index task failed: {e}")))?
    }

    /// The applier: catches up at start, then on every commit announcement and
    /// every `sync`/`nudge`, until `stop`; saves the vector graphs now and then
    /// and when stopping.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(mut inbox) = self.inbox.lock().ok().and_then(|mut i| i.take()) else {
            return;
        };
        let mut events = self.store.watch_memory();
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saved_mark = self.vector_mark.load(Ordering::SeqCst);
        let mut waiters: Vec<Waiter> = Vec::new();
        if let Err(e) = self.check_origin().await {
            tracing::warn!("cannot compare the recall index with the store: {e}");
        }
        let mut run_now = true;
        loop {
            if run_now {
                while let Ok(w) = inbox.try_recv() {
                    waiters.extend(w);
                }
                let r = self.catch_up().await;
                if let Err(e) = &r {
                    tracing::warn!("recall index catch-up failed: {e}");
                }
                for w in waiters.drain(..) {
                    let _ = w.send(r.clone());
                }
                self.ready.send_replace(true);
            }
            run_now = true;
            tokio::select! {
                _ = stop.changed() => break,
                w = inbox.recv() => match w {
                    Some(w) => waiters.extend(w),
                    None => break,
                },
                r = events.changed() => if r.is_err() { break },
                _ = save.tick() => {
                    run_now = false;
                    let mark = self.vector_mark.load(Ordering::SeqCst);
                    if mark != saved_mark {
                        let me = self.clone();
                        match tokio::task::spawn_blocking(move || me.save_vectors()).await {
                            Ok(Ok(())) => saved_mark = mark,
                            Ok(Err(e)) => tracing::warn!("cannot save the vector index: {e}"),
                            Err(e) => tracing::warn!("cannot save the vector index: {e}"),
                        }
                    }
                }
            }
        }
        let me = self.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.save_vectors()).await {
            tracing::warn!("cannot save the vector index: {e}");
        }
    }

    /// Searches: BM25 over `query`'s words and, with a vector, the ANN graph of
    /// its dimension, both restricted by `filter`; fused by reciprocal rank with
    /// recency. Returns at most `limit` hits, best first.
    pub async fn search(
        self: &Arc<Self>,
        filter: Filter,
        query: String,
        vector: Option<Vec<f32>>,
        limit: usize,
        half_life_ms: Option<i64>,
    ) -> Result<Searched> {
        let mut ready = self.ready.subscribe();
        ready
            .wait_for(|r| *r)
            .await
            .map_err(|_| Error::unavailable("the recall index has stopped"))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.search_now(&filter, &query, vector.as_deref(), limit, half_life_ms)
        })
        .await
        .map_err(|e| Error::internal(format!("recall search failed: {e}")))?
    }

    fn search_now(
        &self,
        filter: &Filter,
        query: &str,
        vector: Option<&[f32]>,
        limit: usize,
        half_life_ms: Option<i64>,
    ) -> Result<Searched> {
        let now = filter.now;
        let depth = (limit * 4).max(50);
        let fq = filter.query(&self.fields);
        let mut created: HashMap<i64, i64> = HashMap::new();
        let tq = text::text_query(&self.index, &self.fields, query, fq.box_clone());
        let has_text = tq.is_some();
        let bm25: Vec<(i64, f32)> = match tq {
            Some(q) => text::top_bm25(&self.reader, q.as_ref(), depth)?
                .into_iter()
                .map(|(s, score, c)| {
                    created.insert(s, c);
                    (s, score)
                })
                .collect(),
            None => Vec::new(),
        };
        let mut note = None;
        let mut vec_hits: Vec<(i64, f32)> = Vec::new();
        let mut hybrid = false;
        if let Some(q) = vector {
            let graphs = self
                .vectors
                .read()
                .map_err(|_| Error::internal("vector index lock poisoned"))?;
            match graphs.get(&q.len()) {
                None => {
                    note = Some(format!(
                        "no memory has a {}-dimensional vector yet",
                        q.len()
                    ))
                }
                Some(g) => {
                    hybrid = true;
                    let allowed = text::allowed_seqs(&self.reader, fq.as_ref())?;
                    let hits = if allowed.len() < EXACT_BELOW {
                        let keys: Vec<i64> = allowed.iter().collect();
                        g.exact(q, &keys, depth)
                    } else {
                        let allow = |k: i64| allowed.contains(k);
                        // A selective filter needs a wider walk to fill `depth`.
                        let share = allowed.len() as f64 / g.len().max(1) as f64;
                        let ef = ((EF_SEARCH.max(depth) as f64) / share.clamp(0.05, 1.0)) as usize;
                        g.search(q, depth, ef, Some(&allow))
                    };
                    for (s, sim, c) in hits {
                        created.insert(s, c);
                        vec_hits.push((s, sim));
                    }
                }
            }
        }
        if !has_text && vector.is_none() {
            // Nothing to rank by: the newest matching memories.
            let newest = text::newest(&self.reader, fq.as_ref(), limit)?;
            return Ok(Searched {
                hybrid: false,
                note: Some("no query words and no vector: newest first".into()),
                found: newest
                    .into_iter()
                    .map(|(seq, c)| {
                        let r = concord_core::recall::recency(now - c, half_life_ms);
                        Found {
                            seq,
                            score: r,
                            explain: Explain {
                                recency: r,
                                ..Default::default()
                            },
                        }
                    })
                    .collect(),
            });
        }
        let lists = if hybrid { 2 } else { 1 };
        let fused = fuse(
            &bm25,
            &vec_hits,
            lists,
            |k| now - created.get(k).copied().unwrap_or(now),
            half_life_ms,
            limit,
        );
        Ok(Searched {
            hybrid,
            note,
            found: fused
                .into_iter()
                .map(|f| Found {
                    seq: f.key,
                    score: f.score,
                    explain: f.explain,
                })
                .collect(),
        })
    }

    /// Exact vector search over everything the filter admits (the benchmark's
    /// ground truth for recall@10).
    pub fn exact_vector(&self, filter: &Filter, q: &[f32], k: usize) -> Result<Vec<i64>> {
        let graphs = self
            .vectors
            .read()
            .map_err(|_| Error::internal("vector index lock poisoned"))?;
        let Some(g) = graphs.get(&q.len()) else {
            return Ok(Vec::new());
        };
        let allowed: Vec<i64> =
            text::allowed_seqs(&self.reader, filter.query(&self.fields).as_ref())?
                .iter()
                .collect();
        Ok(g.exact(q, &allowed, k).into_iter().map(|h| h.0).collect())
    }

    /// Approximate vector search alone, as `search` runs it (for the benchmark).
    pub fn ann_vector(&self, filter: &Filter, q: &[f32], k: usize) -> Result<Vec<i64>> {
        let s = self.search_now(filter, "", Some(q), k, None)?;
        Ok(s.found.into_iter().map(|f| f.seq).collect())
    }
}
