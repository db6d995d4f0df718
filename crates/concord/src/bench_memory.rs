//! The memory suites of `concord bench` (DESIGN §10): `ingest` (memories/s
//! through `POST /v1/memories/batch`, with 384-d vectors) and `recall` (full-text
//! and hybrid p99 over the ingested corpus through `POST /v1/memories/search`,
//! and the ANN's recall@10 against exact search over the same filter).
//!
//! The corpus is generated from a seed, so runs are comparable: topics with their
//! own vocabulary (Zipf-distributed words over a shared background vocabulary),
//! lengths from a few words to a paragraph, tags, several writers and spaces,
//! and vectors clustered around topic centres (what real embeddings look like).

use anyhow::{anyhow, Result};
use concord_client::Client;
use concord_core::memory::{SearchRequest, WriteMemoryRequest};
use concord_server::recall::Filter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DIM: usize = 384;
const TOPICS: usize = 64;
const SEED: u64 = 0xC0_4C0D;

const BACKGROUND: &[&str] = &[
    "the",
    "a",
    "when",
    "after",
    "before",
    "during",
    "with",
    "without",
    "because",
    "so",
    "then",
    "we",
    "it",
    "they",
    "should",
    "must",
    "never",
    "always",
    "often",
    "sometimes",
    "run",
    "runs",
    "check",
    "retry",
    "wait",
    "use",
    "avoid",
    "prefer",
    "noted",
    "seen",
    "again",
    "today",
    "team",
    "build",
    "deploy",
    "test",
    "review",
    "main",
    "branch",
    "config",
    "file",
    "log",
    "error",
    "request",
    "response",
    "time",
    "slow",
    "fast",
    "fails",
    "works",
    "broken",
    "fixed",
    "issue",
];

/// A deterministic corpus: topic vocabularies and centres.
pub struct Corpus {
    topics: Vec<(Vec<String>, Vec<f32>)>,
}

fn gauss(rng: &mut StdRng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.gen_range(1e-7..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

impl Corpus {
    pub fn new() -> Corpus {
        let mut rng = StdRng::seed_from_u64(SEED);
        let syll = [
            "ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "do", "gu", "ba",
        ];
        let topics = (0..TOPICS)
            .map(|_| {
                let words = (0..40)
                    .map(|_| {
                        let n = rng.gen_range(2..4);
                        (0..n)
                            .map(|_| syll[rng.gen_range(0..syll.len())])
                            .collect::<String>()
                    })
                    .collect();
                let centre = (0..DIM).map(|_| gauss(&mut rng)).collect();
                (words, centre)
            })
            .collect();
        Corpus { topics }
    }

    fn zipf(rng: &mut StdRng, n: usize) -> usize {
        // P(k) ~ 1/k, by inverse transform over the harmonic CDF (approximate).
        let u: f64 = rng.gen_range(0.0..1.0);
        (((n as f64).powf(u)) as usize).saturating_sub(1).min(n - 1)
    }

    pub fn text(&self, rng: &mut StdRng, topic: usize, words: usize) -> String {
        let vocab = &self.topics[topic].0;
        (0..words)
            .map(|_| {
                if rng.gen_bool(0.45) {
                    vocab[Self::zipf(rng, vocab.len())].clone()
                } else {
                    BACKGROUND[Self::zipf(rng, BACKGROUND.len())].to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn vector(&self, rng: &mut StdRng, topic: usize, noise: f32) -> Vec<f32> {
        self.topics[topic]
            .1
            .iter()
            .map(|c| c + noise * gauss(rng))
            .collect()
    }

    /// The i-th memory of the corpus (same for every run).
    pub fn memory(&self, i: usize, writers: usize) -> WriteMemoryRequest {
        let mut rng = StdRng::seed_from_u64(SEED ^ (i as u64).wrapping_mul(0x9E37_79B9));
        let topic = rng.gen_range(0..TOPICS);
        let words = match rng.gen_range(0..10) {
            0..=5 => rng.gen_range(6..20),
            6..=8 => rng.gen_range(20..60),
            _ => rng.gen_range(60..160),
        };
        let space = match i % 3 {
            0 => "shared:providers".to_string(),
            1 => "shared:patterns".to_string(),
            _ => format!("shared:team-{}", i % writers),
        };
        let mut m = concord_client::memory(
            &space,
            &format!("{} {i}", self.text(&mut rng, topic, words)),
        );
        m.kind = Some(["learning", "fact", "anti_pattern", "observation"][i % 4].into());
        m.tags = vec![format!("topic-{}", topic % 16), format!("w{}", i % writers)];
        m.visibility = Some(
            if i.is_multiple_of(10) {
                "entity"
            } else {
                "public"
            }
            .into(),
        );
        m.embedding = Some(self.vector(&mut rng, topic, 0.8));
        m
    }

    pub fn query(&self, rng: &mut StdRng) -> (String, Vec<f32>) {
        let topic = rng.gen_range(0..TOPICS);
        let words = rng.gen_range(2..5);
        let vocab = &self.topics[topic].0;
        let text = (0..words)
            .map(|_| vocab[Self::zipf(rng, vocab.len())].clone())
            .collect::<Vec<_>>()
            .join(" ");
        (text, self.vector(rng, topic, 0.8))
    }
}

/// Labelled instances that write (one entity each).
pub async fn writers(admin: &Client, n: usize) -> Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = admin
            .register(&concord_core::api::RegisterInstanceRequest {
                entity: format!("bench-{i}"),
                role: Default::default(),
                label: Some(format!("bench writer {i}")),
                ttl_ms: Some(86_400_000),
                capabilities: vec![],
                endpoint: None,
                host: None,
                version: None,
                persistent: false,
                forked_from: None,
                meta: json!({}),
            })
            .await
            .map_err(|e| anyhow!("register: {e}"))?;
        out.push(admin.with_token(r.session_token));
    }
    Ok(out)
}

pub struct IngestFigures {
    pub memories: usize,
    pub seconds: f64,
    pub batch_latency_us: Vec<u64>,
    pub errors: u64,
}

/// Writes `n` corpus memories in batches of `batch` from `concurrency` tasks.
pub async fn ingest(
    writers: &[Client],
    corpus: Arc<Corpus>,
    n: usize,
    batch: usize,
    concurrency: usize,
    vectors: bool,
) -> Result<IngestFigures> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency.max(1) {
        let c = writers[w % writers.len()].clone();
        let (next, corpus) = (next.clone(), corpus.clone());
        let nw = writers.len();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            loop {
                let start = next.fetch_add(batch, std::sync::atomic::Ordering::SeqCst);
                if start >= n {
                    break;
                }
                let items: Vec<WriteMemoryRequest> = (start..(start + batch).min(n))
                    .map(|i| {
                        let mut m = corpus.memory(i, nw);
                        if !vectors {
                            m.embedding = None;
                        }
                        m
                    })
                    .collect();
                let t = Instant::now();
                match c.remember_batch(items).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        if errors < 3 {
                            eprintln!("ingest error: {e}");
                        }
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut figures = IngestFigures {
        memories: n,
        seconds: 0.0,
        batch_latency_us: Vec::new(),
        errors: 0,
    };
    while let Some(r) = tasks.join_next().await {
        let (lat, e) = r?;
        figures.batch_latency_us.extend(lat);
        figures.errors += e;
    }
    figures.seconds = t0.elapsed().as_secs_f64();
    Ok(figures)
}

pub struct RecallFigures {
    pub fulltext_us: Vec<u64>,
    pub hybrid_us: Vec<u64>,
    pub hybrid_modes_ok: bool,
    pub recall_at_10: f64,
    pub recall_queries: usize,
    pub mean_hits: f64,
}

/// Latency of full-text and hybrid recall as one writer (visibility filters on),
/// each for `duration` from `concurrency` tasks; then recall@10 of the ANN
/// against exact search over the same filter, in process.
pub async fn recall(
    reader: &Client,
    index: Option<Arc<concord_server::recall::RecallIndex>>,
    corpus: Arc<Corpus>,
    duration: Duration,
    concurrency: usize,
) -> Result<RecallFigures> {
    let run = |hybrid: bool| {
        let (reader, corpus) = (reader.clone(), corpus.clone());
        async move {
            let stop = Instant::now() + duration;
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..concurrency.max(1) {
                let (c, corpus) = (reader.clone(), corpus.clone());
                tasks.spawn(async move {
                    let mut rng =
                        StdRng::seed_from_u64(SEED + w as u64 + if hybrid { 1000 } else { 0 });
                    let (mut lat, mut hits, mut modes_ok) = (Vec::new(), 0usize, true);
                    while Instant::now() < stop {
                        let (text, vector) = corpus.query(&mut rng);
                        let req = SearchRequest {
                            query: text,
                            limit: Some(10),
                            embedding: hybrid.then_some(vector),
                            ..Default::default()
                        };
                        let t = Instant::now();
                        if let Ok(r) = c.recall(&req).await {
                            lat.push(t.elapsed().as_micros() as u64);
                            hits += r.results.len();
                            modes_ok &= (r.mode == "hybrid") == hybrid;
                        }
                    }
                    (lat, hits, modes_ok)
                });
            }
            let (mut lat, mut hits, mut ok) = (Vec::new(), 0, true);
            while let Some(r) = tasks.join_next().await {
                if let Ok((l, h, m)) = r {
                    lat.extend(l);
                    hits += h;
                    ok &= m;
                }
            }
            (lat, hits, ok)
        }
    };
    let (fulltext_us, hits, _) = run(false).await;
    let (hybrid_us, _, hybrid_modes_ok) = run(true).await;
    let mean_hits = hits as f64 / fulltext_us.len().max(1) as f64;
    let (mut found, mut total, mut queries) = (0usize, 0usize, 0usize);
    if let Some(index) = index {
        let mut rng = StdRng::seed_from_u64(SEED + 7);
        let now = concord_core::Timestamp::now().millis();
        for i in 0..200 {
            let (_, q) = corpus.query(&mut rng);
            // Alternate a broad filter (everything public) and a narrower one (one space).
            let filter = Filter {
                acl: Some(vec!["public".into()]),
                spaces: if i % 2 == 0 {
                    vec![]
                } else {
                    vec!["shared:providers".into()]
                },
                now,
                ..Default::default()
            };
            let exact = index
                .exact_vector(&filter, &q, 10)
                .map_err(|e| anyhow!("{e}"))?;
            let ann = index
                .ann_vector(&filter, &q, 10)
                .map_err(|e| anyhow!("{e}"))?;
            found += ann.iter().filter(|k| exact.contains(k)).count();
            total += exact.len();
            queries += 1;
        }
    }
    Ok(RecallFigures {
        fulltext_us,
        hybrid_us,
        hybrid_modes_ok,
        recall_at_10: found as f64 / total.max(1) as f64,
        recall_queries: queries,
        mean_hits,
    })
}

pub fn quantiles(mut v: Vec<u64>) -> Value {
    v.sort_unstable();
    let q = |p: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0
        }
    };
    json!({"count": v.len(), "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99), "max_ms": q(1.0)})
}
