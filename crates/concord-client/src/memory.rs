//! Shared memory (DESIGN §5): write, version, forget, read, recall; trust,
//! circles, fork diffs and promotion. Kept apart from `lib.rs` so that each
//! feature's client methods live beside each other.

use crate::{pct, Client};
use concord_core::memory::*;
use concord_core::Result;
use reqwest::Method;

impl Client {
    /// Writes a memory; `deduplicated` says it already existed. Spooled in
    /// degraded mode when it goes to a shared space or this instance's own.
    pub async fn remember(&self, req: &WriteMemoryRequest) -> Result<MemoryWritten> {
        self.write_typed(crate::SpoolKind::Memory, req).await
    }

    /// Writes many memories in one transaction (all or nothing).
    pub async fn remember_batch(
        &self,
        memories: Vec<WriteMemoryRequest>,
    ) -> Result<MemoryBatchWritten> {
        self.post("/v1/memories/batch", &WriteMemoryBatch { memories })
            .await
    }

    pub async fn recall(&self, req: &SearchRequest) -> Result<SearchResponse> {
        self.post("/v1/memories/search", req).await
    }

    /// A memory, with every version when `history`.
    pub async fn memory(&self, id: &str, history: bool) -> Result<MemoryEnvelope> {
        let q = if history { "?history=true" } else { "" };
        self.get(&format!("/v1/memories/{}{q}", pct(id))).await
    }

    /// Writes a new version (absent fields keep their value).
    pub async fn update_memory(
        &self,
        id: &str,
        req: &UpdateMemoryRequest,
    ) -> Result<MemoryEnvelope> {
        self.call(Method::PUT, &format!("/v1/memories/{}", pct(id)), Some(req))
            .await
    }

    /// Closes a memory without successor; `purge` (admin) erases its bytes.
    pub async fn forget(
        &self,
        id: &str,
        fence: Option<u64>,
        purge: bool,
    ) -> Result<MemoryEnvelope> {
        let mut q = vec![];
        if let Some(f) = fence {
            q.push(format!("fence={f}"));
        }
        if purge {
            q.push("purge=true".to_string());
        }
        let q = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/memories/{}{q}", pct(id)),
            None,
        )
        .await
    }

    pub async fn put_trust(&self, entity: &str, trusts: Vec<String>) -> Result<TrustList> {
        self.call(
            Method::PUT,
            &format!("/v1/trust/{}", pct(entity)),
            Some(&PutTrustRequest { trusts }),
        )
        .await
    }

    pub async fn trust(&self, entity: &str) -> Result<TrustList> {
        self.get(&format!("/v1/trust/{}", pct(entity))).await
    }

    pub async fn put_circle(&self, name: &str, members: Vec<String>) -> Result<Circle> {
        self.call(
            Method::PUT,
            &format!("/v1/circles/{}", pct(name)),
            Some(&PutCircleRequest { members }),
        )
        .await
    }

    pub async fn circles(&self) -> Result<CircleList> {
        self.get("/v1/circles").await
    }

    pub async fn fork_diff(&self, fork: &str) -> Result<ForkDiff> {
        self.get(&format!("/v1/forks/{}/diff", pct(fork))).await
    }

    pub async fn promote(
        &self,
        fork: &str,
        memory_ids: Vec<String>,
        fence: Option<u64>,
    ) -> Result<Promoted> {
        self.post(
            &format!("/v1/forks/{}/promote", pct(fork)),
            &PromoteRequest { memory_ids, fence },
        )
        .await
    }
}

/// A write request with the defaults filled in: `remember(space, text)` style.
pub fn memory(space: &str, text: &str) -> WriteMemoryRequest {
    WriteMemoryRequest {
        space: space.into(),
        kind: None,
        text: text.into(),
        tags: vec![],
        metadata: serde_json::json!({}),
        visibility: None,
        embedding: None,
        fence: None,
        valid_at: None,
        idempotency_key: None,
    }
}
