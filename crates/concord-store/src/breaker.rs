//! Observations and shared circuit breakers (DESIGN §8), the store's side.
//!
//! The rules (window statistics, transitions, the single probe) are
//! `concord_core::breaker`; a backend records the observation, loads the window
//! and the breaker row (locked on PostgreSQL; the single writer on SQLite), runs
//! the rule and writes the result and its events in the same transaction. The
//! helpers here keep the two backends' events identical.

use async_trait::async_trait;
use concord_core::api::EventSource;
use concord_core::breaker::{
    Breaker, BreakerState, BreakerView, Change, Policies, ProbeResponse, Sample,
};
use concord_core::{Result, Timestamp};
use serde_json::{json, Value};

/// One observation as the hub took it: provenance from the caller's session,
/// never from the body. `sample.at` is ignored: the store's clock sets it.
#[derive(Debug, Clone)]
pub struct NewObservation {
    pub subject: String,
    pub sample: Sample,
    pub token: String,
    /// (scope, key): an observation already taken under it is not counted again.
    pub idempotency: Option<(String, String)>,
}

impl NewObservation {
    pub(crate) fn source(&self) -> EventSource {
        EventSource {
            instance: Some(self.sample.instance.clone()),
            entity: self.sample.entity.clone(),
            token: Some(self.token.clone()),
        }
    }
}

/// Who asks for a probe.
#[derive(Debug, Clone)]
pub struct Prober {
    pub instance: String,
    pub entity: Option<String>,
    pub token: String,
}

#[async_trait]
pub trait BreakerStore: Send + Sync {
    /// Records the observations (in order, one transaction) and applies each to
    /// its subject's breaker; a transition appends `sys.breaker.*` with who saw what.
    /// An observation whose idempotency key was taken before is skipped; returns
    /// how many were skipped so.
    async fn observe(&self, obs: Vec<NewObservation>, policies: &Policies) -> Result<usize>;
    /// `None` for a subject never observed.
    async fn get_breaker(&self, subject: &str, policies: &Policies) -> Result<Option<BreakerView>>;
    /// Every breaker (in the state given, as seen now), by subject.
    async fn list_breakers(
        &self,
        state: Option<BreakerState>,
        policies: &Policies,
    ) -> Result<Vec<BreakerView>>;
    /// Grants the half-open probe to one caller at a time, fleet-wide.
    async fn probe_breaker(
        &self,
        subject: &str,
        policies: &Policies,
        prober: Prober,
    ) -> Result<ProbeResponse>;
    /// Writes (and announces) open → half_open for breakers whose time is up, so
    /// watchers hear of it without polling. Returns how many moved.
    async fn advance_breakers(&self, policies: &Policies) -> Result<usize>;
}

/// The event of a transition.
pub(crate) fn change_event(
    change: Change,
    subject: &str,
    b: &Breaker,
    by: Option<&Sample>,
) -> (&'static str, Value) {
    let who = by.map(
        |s| json!({"instance": s.instance, "entity": s.entity, "host": s.host, "detail": s.detail}),
    );
    let data = match change {
        Change::Opened => json!({
            "subject": subject,
            "opened_by": b.opened_by,
            "retry_at": b.retry_at.map(Timestamp),
            "reported_by": who,
        }),
        Change::HalfOpen => json!({"subject": subject}),
        Change::Closed => {
            json!({"subject": subject, "probe_id": by.and_then(|s| s.probe_id.clone()), "by": who})
        }
        Change::ProbeGranted => json!({
            "subject": subject,
            "probe_id": b.probe.as_ref().map(|p| p.id.clone()),
            "expires_at": b.probe.as_ref().map(|p| Timestamp(p.expires_at)),
        }),
    };
    (change.topic(), data)
}

/// The answer to a probe request.
pub(crate) fn probe_response(
    decision: &concord_core::breaker::ProbeDecision,
    b: &Breaker,
) -> ProbeResponse {
    use concord_core::breaker::ProbeDecision::*;
    match decision {
        Granted(p) => ProbeResponse {
            granted: true,
            probe_id: Some(p.id.clone()),
            expires_at: Some(Timestamp(p.expires_at)),
            retry_at: None,
            state: b.state,
        },
        Denied { retry_at } => ProbeResponse {
            granted: false,
            probe_id: None,
            expires_at: None,
            retry_at: retry_at.map(Timestamp),
            state: b.state,
        },
    }
}

/// The JSON column form of a probe (id and expiry), for both backends.
pub(crate) fn probe_cols(b: &Breaker) -> (Option<String>, Option<i64>) {
    (
        b.probe.as_ref().map(|p| p.id.clone()),
        b.probe.as_ref().map(|p| p.expires_at),
    )
}
