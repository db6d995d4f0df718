//! Observations, circuit breakers and resource leases (DESIGN §8).

use crate::{pct, Client};
use concord_core::api::*;
use concord_core::Result;
use reqwest::Method;

impl Client {
    /// Reports one observation (needs an instance session token). Spooled in
    /// degraded mode.
    pub async fn observe(&self, obs: &ObservationRequest) -> Result<Observed> {
        self.write_typed(crate::SpoolKind::Observation, obs).await
    }
    pub async fn observe_batch(&self, observations: Vec<ObservationRequest>) -> Result<Observed> {
        self.write_typed(
            crate::SpoolKind::Observation,
            &ObservationBatch { observations },
        )
        .await
    }
    pub async fn breakers(&self, state: Option<BreakerState>) -> Result<BreakerList> {
        let qs = state
            .map(|s| format!("?state={}", s.as_str()))
            .unwrap_or_default();
        self.get(&format!("/v1/breakers{qs}")).await
    }
    pub async fn breaker(&self, subject: &str) -> Result<BreakerView> {
        self.get(&format!("/v1/breakers/{}", pct(subject))).await
    }
    /// Asks for the half-open probe of a subject.
    pub async fn probe(&self, subject: &str) -> Result<ProbeResponse> {
        self.post(
            &format!("/v1/breakers/{}/probe", pct(subject)),
            &serde_json::json!({}),
        )
        .await
    }
    pub async fn acquire_lease(&self, req: &AcquireLeaseRequest) -> Result<LeaseEnvelope> {
        self.post("/v1/leases", req).await
    }
    pub async fn renew_lease(&self, id: &str, ttl_ms: Option<i64>) -> Result<Lease> {
        self.post::<_, LeaseEnvelope>(
            &format!("/v1/leases/{}/renew", pct(id)),
            &RenewLeaseRequest { ttl_ms },
        )
        .await
        .map(|e| e.lease)
    }
    /// Releases a lease: the holder's, or with `force` (admin) anyone's.
    pub async fn release_lease(&self, id: &str, force: bool) -> Result<Lease> {
        let q = if force { "?force=true" } else { "" };
        self.call::<(), LeaseEnvelope>(Method::DELETE, &format!("/v1/leases/{}{q}", pct(id)), None)
            .await
            .map(|e| e.lease)
    }
    pub async fn leases(&self, resource: Option<&str>, holder: Option<&str>) -> Result<LeaseList> {
        let mut q = Vec::new();
        if let Some(r) = resource {
            q.push(format!("resource={}", pct(r)));
        }
        if let Some(h) = holder {
            q.push(format!("holder={}", pct(h)));
        }
        let qs = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        self.get(&format!("/v1/leases{qs}")).await
    }
}
