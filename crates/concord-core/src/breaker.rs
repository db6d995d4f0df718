//! Shared circuit breakers (DESIGN §8): window statistics and the
//! closed → open → half_open state machine, with no I/O.
//!
//! Both backends run the same [`Breaker::observe`] and [`Breaker::probe`] inside
//! their transaction (the breaker row locked), so a fleet sees one breaker per
//! subject whichever replica or backend took the observation. The store only
//! supplies the samples of the window; it never decides a transition itself.

use crate::error::Error;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

pub const MAX_SUBJECT_LEN: usize = 256;
pub const MAX_DETAIL_LEN: usize = 1024;
/// Longest latency accepted (1 day): beyond that a number is a bug, not a latency.
pub const MAX_LATENCY_MS: i64 = 86_400_000;
pub const MAX_BATCH: usize = 1000;

/// What a caller saw when it used the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "ok" => Some(Outcome::Ok),
            "error" => Some(Outcome::Error),
            "timeout" => Some(Outcome::Timeout),
            _ => None,
        }
    }
    /// Timeouts count as failures: a provider that hangs is as broken as one that errs.
    pub fn is_failure(self) -> bool {
        self != Outcome::Ok
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    pub fn parse(s: &str) -> Option<BreakerState> {
        match s {
            "closed" => Some(BreakerState::Closed),
            "open" => Some(BreakerState::Open),
            "half_open" => Some(BreakerState::HalfOpen),
            _ => None,
        }
    }
}

/// Subjects are names like `provider:kimi/k2p5`: letters, digits and `._:/@+-`.
pub fn validate_subject(field: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > MAX_SUBJECT_LEN {
        return Err(Error::bad_field(
            field,
            format!("must be 1..={MAX_SUBJECT_LEN} bytes"),
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:/@+-".contains(c))
    {
        return Err(Error::bad_field(
            field,
            "may contain only letters, digits and '.', '_', ':', '/', '@', '+', '-'",
        ));
    }
    Ok(())
}

// ---------- policies ----------

/// How one subject's breaker trips and recovers.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Observations older than this are ignored.
    pub window_ms: i64,
    /// No verdict on fewer samples than this: two errors out of two calls is noise.
    pub min_samples: u32,
    /// Trips at or above this share of failures (0..=1).
    pub error_rate: f64,
    /// How long the breaker stays open before a probe may test the subject.
    pub open_ms: i64,
    /// Trips only when at least this many distinct instances reported failures,
    /// so one confused (or hostile) instance cannot open a breaker for the fleet.
    pub min_instances: u32,
    /// How long a granted probe is exclusive before another may be granted.
    pub probe_ms: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            window_ms: 60_000,
            min_samples: 5,
            error_rate: 0.5,
            open_ms: 30_000,
            min_instances: 1,
            probe_ms: 10_000,
        }
    }
}

impl Policy {
    pub fn validate(&self, field: &str) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::bad_field(field, m.to_string()));
        if !(1_000..=86_400_000).contains(&self.window_ms) {
            return bad("window_ms must be between 1000 and 86400000");
        }
        if !(1..=100_000).contains(&self.min_samples) {
            return bad("min_samples must be between 1 and 100000");
        }
        if !(self.error_rate > 0.0 && self.error_rate <= 1.0) {
            return bad("error_rate must be in (0, 1]");
        }
        if !(100..=86_400_000).contains(&self.open_ms) {
            return bad("open_ms must be between 100 and 86400000");
        }
        if !(1..=1000).contains(&self.min_instances) {
            return bad("min_instances must be between 1 and 1000");
        }
        if !(100..=3_600_000).contains(&self.probe_ms) {
            return bad("probe_ms must be between 100 and 3600000");
        }
        Ok(())
    }
}

/// Parses a serve flag `PATTERN=key=value,key=value` (keys: window_ms, min_samples,
/// error_rate, open_ms, min_instances, probe_ms; the rest keep their defaults).
pub fn parse_rule(spec: &str) -> Result<(String, Policy), Error> {
    let (pattern, rest) = spec
        .split_once('=')
        .ok_or_else(|| Error::bad_field("breaker", "expected PATTERN=key=value,…"))?;
    if pattern.is_empty() {
        return Err(Error::bad_field("breaker", "empty subject pattern"));
    }
    let mut p = Policy::default();
    for kv in rest.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::bad_field("breaker", format!("{kv:?} is not key=value")))?;
        let int = || {
            v.parse::<i64>()
                .map_err(|_| Error::bad_field("breaker", format!("{k}: {v:?} is not an integer")))
        };
        match k {
            "window_ms" => p.window_ms = int()?,
            "min_samples" => p.min_samples = int()?.clamp(0, u32::MAX as i64) as u32,
            "min_instances" => p.min_instances = int()?.clamp(0, u32::MAX as i64) as u32,
            "open_ms" => p.open_ms = int()?,
            "probe_ms" => p.probe_ms = int()?,
            "error_rate" => {
                p.error_rate = v.parse::<f64>().map_err(|_| {
                    Error::bad_field("breaker", format!("error_rate: {v:?} is not a number"))
                })?
            }
            _ => {
                return Err(Error::bad_field(
                    "breaker",
                    format!("unknown setting {k:?}"),
                ))
            }
        }
    }
    p.validate("breaker")?;
    Ok((pattern.to_string(), p))
}

/// `*` matches any run of characters (slashes too: subjects are names, not paths),
/// `?` one character.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), subject.chars().collect());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < s.len() {
        if i < p.len() && (p[i] == '?' || p[i] == s[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// The policies of a hub: the first rule whose pattern matches wins, else the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    pub rules: Vec<(String, Policy)>,
    pub default: Policy,
}

impl Policies {
    pub fn for_subject(&self, subject: &str) -> &Policy {
        self.rules
            .iter()
            .find(|(p, _)| subject_matches(p, subject))
            .map(|(_, p)| p)
            .unwrap_or(&self.default)
    }
    /// The longest window of any rule: observations older than it are of no use.
    pub fn max_window_ms(&self) -> i64 {
        self.rules
            .iter()
            .map(|(_, p)| p.window_ms)
            .chain([self.default.window_ms])
            .max()
            .unwrap_or(60_000)
    }
}

// ---------- samples and statistics ----------

/// One observation as the hub recorded it: provenance from the caller's session,
/// time from the hub's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub outcome: Outcome,
    pub latency_ms: Option<i64>,
    pub instance: String,
    pub entity: Option<String>,
    pub host: Option<String>,
    pub detail: Option<String>,
    pub probe_id: Option<String>,
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub samples: u64,
    pub failures: u64,
    pub error_rate: f64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    /// Distinct instances among the failures.
    pub failing_instances: u32,
    pub last_observed_at: Option<i64>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Statistics of the samples in the window (the caller selects them).
pub fn stats(window: &[Sample]) -> Stats {
    let samples = window.len() as u64;
    let failures = window.iter().filter(|s| s.outcome.is_failure()).count() as u64;
    let mut lat: Vec<i64> = window.iter().filter_map(|s| s.latency_ms).collect();
    lat.sort_unstable();
    let failing: std::collections::BTreeSet<&str> = window
        .iter()
        .filter(|s| s.outcome.is_failure())
        .map(|s| s.instance.as_str())
        .collect();
    Stats {
        samples,
        failures,
        error_rate: if samples == 0 {
            0.0
        } else {
            failures as f64 / samples as f64
        },
        p50_ms: percentile(&lat, 0.50),
        p95_ms: percentile(&lat, 0.95),
        failing_instances: failing.len() as u32,
        last_observed_at: window.iter().map(|s| s.at).max(),
    }
}

/// Who saw the failures that tripped a breaker: one entry per instance.
pub fn provenance(window: &[Sample]) -> Value {
    let mut by: BTreeMap<&str, (Value, u64, Option<&str>, i64)> = BTreeMap::new();
    for s in window.iter().filter(|s| s.outcome.is_failure()) {
        let e = by.entry(&s.instance).or_insert_with(|| {
            (
                json!({"instance": s.instance, "entity": s.entity, "host": s.host}),
                0,
                None,
                s.at,
            )
        });
        e.1 += 1;
        if s.at >= e.3 {
            e.3 = s.at;
            e.2 = s.detail.as_deref().or(e.2);
        }
    }
    let instances: Vec<Value> = by
        .into_values()
        .map(|(mut v, n, detail, at)| {
            v["failures"] = json!(n);
            v["last_detail"] = json!(detail);
            v["last_at"] = json!(Timestamp(at));
            v
        })
        .collect();
    json!({ "instances": instances })
}

// ---------- the state machine ----------

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub id: String,
    pub expires_at: i64,
}

/// One subject's breaker as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    pub state: BreakerState,
    pub opened_at: Option<i64>,
    pub retry_at: Option<i64>,
    pub opened_by: Value,
    pub probe: Option<Probe>,
    /// Samples before this time are ignored: set when the breaker closes, so the
    /// failures that tripped it cannot trip it again the moment it recovers.
    pub since: i64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            opened_at: None,
            retry_at: None,
            opened_by: Value::Null,
            probe: None,
            since: 0,
        }
    }
}

/// A transition, each announced as `sys.breaker.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened,
    HalfOpen,
    Closed,
    ProbeGranted,
}

impl Change {
    pub fn topic(self) -> &'static str {
        match self {
            Change::Opened => "sys.breaker.opened",
            Change::HalfOpen => "sys.breaker.half_open",
            Change::Closed => "sys.breaker.closed",
            Change::ProbeGranted => "sys.breaker.probe_granted",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeDecision {
    Granted(Probe),
    /// Ask again at `retry_at` (none: the breaker is closed, no probe is needed).
    Denied {
        retry_at: Option<i64>,
    },
}

impl Breaker {
    /// The window a decision at `now` looks at.
    pub fn in_window(&self, policy: &Policy, s: &Sample, now: i64) -> bool {
        s.at > now - policy.window_ms && s.at >= self.since
    }

    /// An open breaker whose time is up becomes half-open.
    pub fn advance(&mut self, now: i64) -> Option<Change> {
        match (self.state, self.retry_at) {
            (BreakerState::Open, Some(r)) if r <= now => {
                self.state = BreakerState::HalfOpen;
                self.probe = None;
                Some(Change::HalfOpen)
            }
            _ => None,
        }
    }

    fn trip(&mut self, policy: &Policy, now: i64, opened_by: Value) {
        self.state = BreakerState::Open;
        self.opened_at = Some(now);
        self.retry_at = Some(now + policy.open_ms);
        self.opened_by = opened_by;
        self.probe = None;
    }

    /// Applies one new observation (`obs`, already part of `window`, which holds
    /// the samples of the window including it). Returns the transitions, in order.
    pub fn observe(
        &mut self,
        policy: &Policy,
        window: &[Sample],
        obs: &Sample,
        now: i64,
    ) -> Vec<Change> {
        let mut out: Vec<Change> = self.advance(now).into_iter().collect();
        match self.state {
            BreakerState::Closed => {
                let win: Vec<Sample> = window
                    .iter()
                    .filter(|s| self.in_window(policy, s, now))
                    .cloned()
                    .collect();
                let st = stats(&win);
                if st.samples >= u64::from(policy.min_samples)
                    && st.error_rate >= policy.error_rate
                    && st.failing_instances >= policy.min_instances
                {
                    let mut by = provenance(&win);
                    by["samples"] = json!(st.samples);
                    by["error_rate"] = json!(st.error_rate);
                    self.trip(policy, now, by);
                    out.push(Change::Opened);
                }
            }
            BreakerState::HalfOpen => {
                let is_probe =
                    matches!((&self.probe, &obs.probe_id), (Some(p), Some(id)) if &p.id == id);
                if is_probe {
                    if obs.outcome.is_failure() {
                        let mut by = provenance(std::slice::from_ref(obs));
                        by["probe_id"] = json!(obs.probe_id);
                        self.trip(policy, now, by);
                        out.push(Change::Opened);
                    } else {
                        self.state = BreakerState::Closed;
                        self.probe = None;
                        self.retry_at = None;
                        self.since = now;
                        out.push(Change::Closed);
                    }
                }
            }
            BreakerState::Open => {}
        }
        out
    }

    /// A request for the half-open probe: one holder at a time fleet-wide; a probe
    /// whose holder never reported lapses after `probe_ms`, so a dead prober cannot
    /// keep the breaker half-open for ever.
    pub fn probe(
        &mut self,
        policy: &Policy,
        now: i64,
        new_id: String,
    ) -> (ProbeDecision, Vec<Change>) {
        let mut changes: Vec<Change> = self.advance(now).into_iter().collect();
        let decision = match self.state {
            BreakerState::Closed => ProbeDecision::Denied { retry_at: None },
            BreakerState::Open => ProbeDecision::Denied {
                retry_at: self.retry_at,
            },
            BreakerState::HalfOpen => match &self.probe {
                Some(p) if p.expires_at > now => ProbeDecision::Denied {
                    retry_at: Some(p.expires_at),
                },
                _ => {
                    let p = Probe {
                        id: new_id,
                        expires_at: now + policy.probe_ms,
                    };
                    self.probe = Some(p.clone());
                    changes.push(Change::ProbeGranted);
                    ProbeDecision::Granted(p)
                }
            },
        };
        (decision, changes)
    }

    /// The state as a reader at `now` should see it (open past its time reads as
    /// half-open even before anyone wrote the transition).
    pub fn effective_state(&self, now: i64) -> BreakerState {
        let mut b = self.clone();
        b.advance(now);
        b.state
    }
}

// ---------- wire types ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservationRequest {
    pub subject: String,
    pub outcome: String,
    #[serde(default)]
    pub latency_ms: Option<i64>,
    #[serde(default)]
    pub detail: Option<String>,
    /// The probe this observation reports on (from `POST /v1/breakers/{subject}/probe`).
    #[serde(default)]
    pub probe_id: Option<String>,
    /// Reporting again with the same key (from the same entity) is accepted
    /// without counting the observation twice: safe to resend after a lost reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// One observation or a batch: `{"observations": […]}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ObserveBody {
    Batch(ObservationBatch),
    One(ObservationRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservationBatch {
    pub observations: Vec<ObservationRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Observed {
    /// Observations taken, including those already taken under their key.
    pub accepted: usize,
    /// Of those, how many had been taken before under the same idempotency key.
    #[serde(default)]
    pub deduplicated: usize,
}

/// Checks one observation; `prefix` names its place in a batch.
pub fn validate_observation(req: &ObservationRequest, prefix: &str) -> Result<Outcome, Error> {
    let f = |n: &str| format!("{prefix}{n}");
    validate_subject(&f("subject"), &req.subject)?;
    let outcome = Outcome::parse(&req.outcome).ok_or_else(|| {
        Error::bad_field(
            &f("outcome"),
            format!("{:?} is not one of ok, error, timeout", req.outcome),
        )
    })?;
    if let Some(l) = req.latency_ms {
        if !(0..=MAX_LATENCY_MS).contains(&l) {
            return Err(Error::bad_field(
                &f("latency_ms"),
                format!("must be between 0 and {MAX_LATENCY_MS}"),
            ));
        }
    }
    if let Some(d) = &req.detail {
        if d.len() > MAX_DETAIL_LEN {
            return Err(Error::bad_field(
                &f("detail"),
                format!("must be at most {MAX_DETAIL_LEN} bytes"),
            ));
        }
    }
    if let Some(p) = &req.probe_id {
        if p.is_empty() || p.len() > 64 {
            return Err(Error::bad_field(&f("probe_id"), "must be 1..=64 bytes"));
        }
    }
    if let Some(k) = &req.idempotency_key {
        crate::idempotency::validate_key(&f("idempotency_key"), k)?;
    }
    Ok(outcome)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BreakerView {
    pub subject: String,
    pub state: BreakerState,
    pub error_rate: f64,
    pub samples: u64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub opened_at: Option<Timestamp>,
    /// Provenance of the observations that tripped it (instances, hosts, details).
    pub opened_by: Value,
    pub retry_at: Option<Timestamp>,
    pub last_observed_at: Option<Timestamp>,
    pub policy: Value,
}

impl BreakerView {
    /// The view of a breaker at `now` over the samples of its subject.
    pub fn of(subject: &str, b: &Breaker, policy: &Policy, samples: &[Sample], now: i64) -> Self {
        let win: Vec<Sample> = samples
            .iter()
            .filter(|s| b.in_window(policy, s, now))
            .cloned()
            .collect();
        let st = stats(&win);
        let state = b.effective_state(now);
        let retry_at = match state {
            BreakerState::Open => b.retry_at,
            BreakerState::HalfOpen => b.probe.as_ref().map(|p| p.expires_at).filter(|e| *e > now),
            BreakerState::Closed => None,
        };
        BreakerView {
            subject: subject.to_string(),
            state,
            error_rate: st.error_rate,
            samples: st.samples,
            p50_ms: st.p50_ms,
            p95_ms: st.p95_ms,
            opened_at: b.opened_at.map(Timestamp),
            opened_by: b.opened_by.clone(),
            retry_at: retry_at.map(Timestamp),
            last_observed_at: samples.iter().map(|s| s.at).max().map(Timestamp),
            policy: json!({
                "window_ms": policy.window_ms, "min_samples": policy.min_samples,
                "error_rate": policy.error_rate, "open_ms": policy.open_ms,
                "min_instances": policy.min_instances, "probe_ms": policy.probe_ms,
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BreakerList {
    pub breakers: Vec<BreakerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ProbeResponse {
    pub granted: bool,
    pub probe_id: Option<String>,
    pub expires_at: Option<Timestamp>,
    /// When denied: when to ask again (none: the breaker is closed, call freely).
    pub retry_at: Option<Timestamp>,
    pub state: BreakerState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(outcome: Outcome, inst: &str, at: i64) -> Sample {
        Sample {
            outcome,
            latency_ms: Some(at % 1000),
            instance: inst.into(),
            entity: Some("e".into()),
            host: Some("h".into()),
            detail: Some("boom".into()),
            probe_id: None,
            at,
        }
    }

    fn pol(min_instances: u32) -> Policy {
        Policy {
            min_instances,
            ..Policy::default()
        }
    }

    #[test]
    fn trips_at_threshold_then_probe_closes() {
        let p = pol(2);
        let mut b = Breaker::default();
        let mut w = Vec::new();
        for (i, inst) in ["a", "b", "a", "b"].iter().enumerate() {
            w.push(s(Outcome::Error, inst, 1000 + i as i64));
            assert!(b
                .observe(&p, &w, w.last().unwrap(), 1000 + i as i64)
                .is_empty());
        }
        w.push(s(Outcome::Error, "a", 1010));
        assert_eq!(b.observe(&p, &w, &w[4].clone(), 1010), vec![Change::Opened]);
        assert_eq!(b.retry_at, Some(1010 + p.open_ms));
        assert_eq!(b.opened_by["instances"].as_array().unwrap().len(), 2);
        // Open: no probe yet.
        let (d, _) = b.probe(&p, 2000, "p1".into());
        assert_eq!(
            d,
            ProbeDecision::Denied {
                retry_at: Some(1010 + p.open_ms)
            }
        );
        let t = 1010 + p.open_ms;
        let (d, ch) = b.probe(&p, t, "p1".into());
        assert!(matches!(d, ProbeDecision::Granted(_)));
        assert_eq!(ch, vec![Change::HalfOpen, Change::ProbeGranted]);
        let (d2, _) = b.probe(&p, t + 1, "p2".into());
        assert!(matches!(d2, ProbeDecision::Denied { .. }));
        // A non-probe observation changes nothing; the probe's success closes it.
        let mut ok = s(Outcome::Ok, "c", t + 2);
        assert!(b.observe(&p, &w, &ok, t + 2).is_empty());
        ok.probe_id = Some("p1".into());
        assert_eq!(b.observe(&p, &w, &ok, t + 3), vec![Change::Closed]);
        // The old failures are before `since`: one more error does not re-trip.
        w.push(s(Outcome::Error, "b", t + 4));
        assert!(b
            .observe(&p, &w, &w.last().unwrap().clone(), t + 4)
            .is_empty());
    }

    #[test]
    fn failed_probe_reopens() {
        let p = pol(1);
        let mut b = Breaker {
            state: BreakerState::Open,
            retry_at: Some(10),
            ..Breaker::default()
        };
        let (d, _) = b.probe(&p, 10, "px".into());
        assert!(matches!(d, ProbeDecision::Granted(_)));
        let mut f = s(Outcome::Timeout, "a", 11);
        f.probe_id = Some("px".into());
        assert_eq!(b.observe(&p, &[f.clone()], &f, 11), vec![Change::Opened]);
        assert_eq!(b.state, BreakerState::Open);
        assert_eq!(b.retry_at, Some(11 + p.open_ms));
    }

    #[test]
    fn rules_parse_and_match() {
        let (pat, p) = parse_rule(
            "provider:*=window_ms=60000,min_samples=5,error_rate=0.5,open_ms=30000,min_instances=2",
        )
        .unwrap();
        assert_eq!(pat, "provider:*");
        assert_eq!(p.min_instances, 2);
        assert!(parse_rule("x=bogus=1").is_err());
        assert!(parse_rule("x=error_rate=2").is_err());
        assert!(subject_matches("provider:*", "provider:kimi/k2p5"));
        assert!(!subject_matches("provider:*", "tool:x"));
        assert!(subject_matches("a?c", "abc"));
        let ps = Policies {
            rules: vec![(pat, p.clone())],
            default: Policy::default(),
        };
        assert_eq!(ps.for_subject("provider:x"), &p);
        assert_eq!(ps.for_subject("tool:x"), &Policy::default());
    }

    #[test]
    fn bad_observations_name_the_field() {
        let r = ObservationRequest {
            subject: "provider:x".into(),
            outcome: "meh".into(),
            latency_ms: None,
            detail: None,
            probe_id: None,
            idempotency_key: None,
        };
        assert_eq!(
            validate_observation(&r, "observations[2].")
                .unwrap_err()
                .details["field"],
            "observations[2].outcome"
        );
    }

    fn arb_sample() -> impl Strategy<Value = (bool, u8, i64)> {
        (any::<bool>(), 0u8..4, 0i64..200)
    }

    proptest! {
        /// Whatever the observations, a breaker never opens on fewer samples than
        /// min_samples or fewer failing instances than min_instances, and when it
        /// opens the error rate of its window is at least the threshold.
        #[test]
        fn opens_only_past_every_threshold(obs in proptest::collection::vec(arb_sample(), 0..60), min_inst in 1u32..4, min_samples in 1u32..8) {
            let p = Policy { min_instances: min_inst, min_samples, window_ms: 1000, ..Policy::default() };
            let mut b = Breaker::default();
            let mut w: Vec<Sample> = Vec::new();
            let mut now = 0;
            for (fail, inst, dt) in obs {
                now += dt;
                let o = s(if fail { Outcome::Error } else { Outcome::Ok }, &format!("i{inst}"), now);
                w.push(o.clone());
                let was = b.state;
                let ch = b.observe(&p, &w, &o, now);
                if ch.contains(&Change::Opened) && was == BreakerState::Closed {
                    let win: Vec<Sample> = w.iter().filter(|x| x.at > now - p.window_ms).cloned().collect();
                    let st = stats(&win);
                    prop_assert!(st.samples >= u64::from(min_samples));
                    prop_assert!(st.failing_instances >= min_inst);
                    prop_assert!(st.error_rate >= p.error_rate);
                }
                if b.state == BreakerState::Open { prop_assert!(b.retry_at.is_some()); }
            }
        }

        /// Probe requests at arbitrary times from many callers: at any instant at
        /// most one granted probe is unexpired.
        #[test]
        fn one_probe_at_a_time(gaps in proptest::collection::vec(0i64..5_000, 1..80)) {
            let p = Policy::default();
            let mut b = Breaker { state: BreakerState::Open, retry_at: Some(0), ..Breaker::default() };
            let mut now = 0;
            let mut last: Option<Probe> = None;
            for (i, g) in gaps.into_iter().enumerate() {
                now += g;
                if let (ProbeDecision::Granted(pr), _) = b.probe(&p, now, format!("p{i}")) {
                    if let Some(l) = &last { prop_assert!(l.expires_at <= now, "granted while {l:?} was live"); }
                    last = Some(pr);
                }
            }
        }

        #[test]
        fn percentiles_are_ordered(lat in proptest::collection::vec(0i64..10_000, 1..100)) {
            let w: Vec<Sample> = lat.iter().enumerate().map(|(i, l)| Sample { latency_ms: Some(*l), ..s(Outcome::Ok, "a", i as i64) }).collect();
            let st = stats(&w);
            let (lo, hi) = (*lat.iter().min().unwrap(), *lat.iter().max().unwrap());
            let (p50, p95) = (st.p50_ms.unwrap(), st.p95_ms.unwrap());
            prop_assert!(lo <= p50 && p50 <= p95 && p95 <= hi);
        }
    }
}
