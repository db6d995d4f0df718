//! The hub's embedder: an OpenAI-compatible `/v1/embeddings` endpoint (Ollama,
//! llama.cpp server, vLLM, OpenAI), and the task that fills in the vectors of
//! memories written without one.
//!
//! Writes never wait for the embedder: a memory without a vector is stored with
//! `embed_pending`, full-text recall finds it at once, and [`fill`] computes the
//! vectors in batches off the request path. While the embedder is down the task
//! backs off and retries; the pending flag is durable, so nothing is lost across
//! a restart, and the vectors appear (and reach the ANN index through the memory
//! log) as soon as the embedder answers again.

use crate::AppState;
use concord_core::{Error, Result};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Most texts sent in one request.
const BATCH: usize = 64;
/// A query's embedding is on the request path: it must answer quickly or recall
/// goes full-text.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const FILL_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Embedder {
    url: String,
    model: String,
    client: reqwest::Client,
}

impl Embedder {
    /// `url` is the server (`http://127.0.0.1:11434`) or the full endpoint
    /// (`…/v1/embeddings`).
    pub fn new(url: &str, model: &str) -> Embedder {
        let url = url.trim_end_matches('/');
        let url = if url.ends_with("/embeddings") {
            url.to_string()
        } else if url.ends_with("/v1") {
            format!("{url}/embeddings")
        } else {
            format!("{url}/v1/embeddings")
        };
        Embedder {
            url,
            model: model.to_string(),
            client: reqwest::Client::new(),
        }
    }

    pub async fn embed(&self, texts: &[String], timeout: Duration) -> Result<Vec<Vec<f32>>> {
        let fail = |m: String| Error::unavailable(format!("embedder {}: {m}", self.url));
        let resp = self
            .client
            .post(&self.url)
            .timeout(timeout)
            .json(&json!({"model": self.model, "input": texts}))
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!("{status}: {body}")));
        }
        let data = body
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("answer has no `data` array".into()))?;
        let mut out: Vec<(usize, Vec<f32>)> = Vec::with_capacity(data.len());
        for (i, d) in data.iter().enumerate() {
            let idx = d
                .get("index")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(i);
            let v: Vec<f32> = d
                .get("embedding")
                .and_then(Value::as_array)
                .ok_or_else(|| fail("an item has no `embedding`".into()))?
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| fail("an embedding has a non-number".into()))?;
            out.push((idx, v));
        }
        out.sort_by_key(|x| x.0);
        if out.len() != texts.len() {
            return Err(fail(format!(
                "{} embeddings for {} texts",
                out.len(),
                texts.len()
            )));
        }
        Ok(out.into_iter().map(|x| x.1).collect())
    }
}

/// Fills in pending embeddings until `stop`. Woken by every commit that moved the
/// memory log (`Store::watch_memory`), so a new memory is embedded promptly.
pub async fn fill(state: Arc<AppState>, embedder: Arc<Embedder>, mut stop: watch::Receiver<bool>) {
    let mut events = state.store.watch_memory();
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        let pending = match state.store.pending_embeddings(BATCH).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("embedder: cannot read pending memories: {e}");
                Vec::new()
            }
        };
        if pending.is_empty() {
            tokio::select! {
                _ = stop.changed() => return,
                r = events.changed() => if r.is_err() { return },
            }
            continue;
        }
        let texts: Vec<String> = pending.iter().map(|p| p.text.clone()).collect();
        match embedder.embed(&texts, FILL_TIMEOUT).await {
            Ok(vectors) => {
                backoff = Duration::from_millis(200);
                let pairs = pending.into_iter().map(|p| p.id).zip(vectors).collect();
                if let Err(e) = state.store.set_embeddings(pairs).await {
                    tracing::warn!("embedder: cannot store embeddings: {e}");
                }
                state.memory.index.nudge();
            }
            Err(e) => {
                tracing::warn!("{e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
