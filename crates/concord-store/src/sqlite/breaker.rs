//! The SQLite side of breakers. The single writer serializes every transition,
//! so a load-decide-save runs without interleaving.

use super::events::{prior_key, record_key};
use super::ops::append_event;
use super::{db_err, SqliteStore};
use crate::breaker::*;
use async_trait::async_trait;
use concord_core::api::EventSource;
use concord_core::breaker::{
    Breaker, BreakerState, BreakerView, Outcome, Policies, Probe, ProbeResponse, Sample,
};
use concord_core::idempotency::KeyKind;
use concord_core::{ids, Result};
use rusqlite::{params, Connection, OptionalExtension};

fn load(c: &Connection, subject: &str) -> Result<Option<Breaker>> {
    c.prepare_cached("SELECT state, opened_at, retry_at, opened_by, probe_id, probe_expires_at, since FROM breakers WHERE subject = ?1")
        .and_then(|mut s| {
            s.query_row([subject], |r| {
                let state: String = r.get(0)?;
                let by: String = r.get(3)?;
                let probe_id: Option<String> = r.get(4)?;
                let probe_exp: Option<i64> = r.get(5)?;
                Ok(Breaker {
                    state: BreakerState::parse(&state).unwrap_or(BreakerState::Closed),
                    opened_at: r.get(1)?,
                    retry_at: r.get(2)?,
                    opened_by: serde_json::from_str(&by).unwrap_or_default(),
                    probe: probe_id.zip(probe_exp).map(|(id, expires_at)| Probe { id, expires_at }),
                    since: r.get(6)?,
                })
            })
            .optional()
        })
        .map_err(db_err)
}

fn save(c: &Connection, now: i64, subject: &str, b: &Breaker) -> Result<()> {
    let (pid, pexp) = probe_cols(b);
    c.prepare_cached(
        "INSERT INTO breakers (subject, state, opened_at, retry_at, opened_by, probe_id, probe_expires_at, since, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT(subject) DO UPDATE SET state = excluded.state, opened_at = excluded.opened_at, retry_at = excluded.retry_at, \
         opened_by = excluded.opened_by, probe_id = excluded.probe_id, probe_expires_at = excluded.probe_expires_at, \
         since = excluded.since, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute(params![
            subject,
            b.state.as_str(),
            b.opened_at,
            b.retry_at,
            b.opened_by.to_string(),
            pid,
            pexp,
            b.since,
            now
        ])
    })
    .map_err(db_err)?;
    Ok(())
}

/// The subject's samples recorded after `after`, oldest first.
fn samples(c: &Connection, subject: &str, after: i64) -> Result<Vec<Sample>> {
    let mut s = c
        .prepare_cached("SELECT outcome, latency_ms, instance, entity, host, detail, probe_id, recorded_at FROM observations WHERE subject = ?1 AND recorded_at > ?2 ORDER BY id")
        .map_err(db_err)?;
    let rows = s
        .query_map(params![subject, after], |r| {
            let o: String = r.get(0)?;
            Ok(Sample {
                outcome: Outcome::parse(&o).unwrap_or(Outcome::Error),
                latency_ms: r.get(1)?,
                instance: r.get(2)?,
                entity: r.get(3)?,
                host: r.get(4)?,
                detail: r.get(5)?,
                probe_id: r.get(6)?,
                at: r.get(7)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

/// Applies one observation; false if its idempotency key was taken before.
fn observe_one(c: &Connection, now: i64, o: &NewObservation, policies: &Policies) -> Result<bool> {
    if let Some((scope, key)) = &o.idempotency {
        if prior_key(c, KeyKind::Observation, scope, key)?.is_some() {
            return Ok(false);
        }
        record_key(c, now, KeyKind::Observation, scope, key, None)?;
    }
    let policy = policies.for_subject(&o.subject);
    let s = &o.sample;
    c.prepare_cached("INSERT INTO observations (subject, outcome, latency_ms, instance, entity, host, detail, probe_id, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
        .and_then(|mut st| st.execute(params![o.subject, s.outcome.as_str(), s.latency_ms, s.instance, s.entity, s.host, s.detail, s.probe_id, now]))
        .map_err(db_err)?;
    // Older samples can never count again: keep the table to one window per subject.
    c.prepare_cached("DELETE FROM observations WHERE subject = ?1 AND recorded_at <= ?2")
        .and_then(|mut st| st.execute(params![o.subject, now - policy.window_ms]))
        .map_err(db_err)?;
    let mut b = load(c, &o.subject)?.unwrap_or_default();
    let window = samples(c, &o.subject, now - policy.window_ms)?;
    let mut sample = s.clone();
    sample.at = now;
    let changes = b.observe(policy, &window, &sample, now);
    save(c, now, &o.subject, &b)?;
    for ch in changes {
        let (topic, data) = change_event(ch, &o.subject, &b, Some(&sample));
        append_event(c, now, topic, &o.source(), data)?;
    }
    Ok(true)
}

fn view(
    c: &Connection,
    now: i64,
    subject: &str,
    b: &Breaker,
    policies: &Policies,
) -> Result<BreakerView> {
    let policy = policies.for_subject(subject);
    let window = samples(c, subject, now - policy.window_ms)?;
    Ok(BreakerView::of(subject, b, policy, &window, now))
}

#[async_trait]
impl BreakerStore for SqliteStore {
    async fn observe(&self, obs: Vec<NewObservation>, policies: &Policies) -> Result<usize> {
        let policies = policies.clone();
        self.writer
            .write(move |c, now| {
                let mut skipped = 0;
                for o in &obs {
                    if !observe_one(c, now, o, &policies)? {
                        skipped += 1;
                    }
                }
                Ok(skipped)
            })
            .await
    }

    async fn get_breaker(&self, subject: &str, policies: &Policies) -> Result<Option<BreakerView>> {
        let (subject, policies) = (subject.to_string(), policies.clone());
        let now = concord_core::Timestamp::now().millis();
        self.readers
            .read(move |c| match load(c, &subject)? {
                Some(b) => view(c, now, &subject, &b, &policies).map(Some),
                None => Ok(None),
            })
            .await
    }

    async fn list_breakers(
        &self,
        state: Option<BreakerState>,
        policies: &Policies,
    ) -> Result<Vec<BreakerView>> {
        let policies = policies.clone();
        let now = concord_core::Timestamp::now().millis();
        self.readers
            .read(move |c| {
                let subjects: Vec<String> = c
                    .prepare_cached("SELECT subject FROM breakers ORDER BY subject")
                    .and_then(|mut s| {
                        s.query_map([], |r| r.get(0))?
                            .collect::<rusqlite::Result<Vec<String>>>()
                    })
                    .map_err(db_err)?;
                let mut out = Vec::new();
                for subject in subjects {
                    if let Some(b) = load(c, &subject)? {
                        if state.is_none_or(|st| b.effective_state(now) == st) {
                            out.push(view(c, now, &subject, &b, &policies)?);
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn probe_breaker(
        &self,
        subject: &str,
        policies: &Policies,
        prober: Prober,
    ) -> Result<ProbeResponse> {
        let (subject, policies) = (subject.to_string(), policies.clone());
        self.writer
            .write(move |c, now| {
                let mut b = load(c, &subject)?.unwrap_or_default();
                let policy = policies.for_subject(&subject);
                let (decision, changes) = b.probe(policy, now, ids::new_id("prb"));
                if !changes.is_empty() {
                    save(c, now, &subject, &b)?;
                    let source = EventSource {
                        instance: Some(prober.instance.clone()),
                        entity: prober.entity.clone(),
                        token: Some(prober.token.clone()),
                    };
                    for ch in changes {
                        let (topic, mut data) = change_event(ch, &subject, &b, None);
                        data["prober"] = serde_json::json!(prober.instance);
                        append_event(c, now, topic, &source, data)?;
                    }
                }
                Ok(probe_response(&decision, &b))
            })
            .await
    }

    async fn advance_breakers(&self, _policies: &Policies) -> Result<usize> {
        self.writer
            .write(move |c, now| {
                let due: Vec<String> = c
                    .prepare_cached("SELECT subject FROM breakers WHERE state = 'open' AND retry_at <= ?1 ORDER BY subject LIMIT 256")
                    .and_then(|mut s| {
                        s.query_map([now], |r| r.get(0))?
                            .collect::<rusqlite::Result<Vec<String>>>()
                    })
                    .map_err(db_err)?;
                let mut n = 0;
                for subject in due {
                    let Some(mut b) = load(c, &subject)? else { continue };
                    if let Some(ch) = b.advance(now) {
                        save(c, now, &subject, &b)?;
                        let (topic, data) = change_event(ch, &subject, &b, None);
                        append_event(c, now, topic, &EventSource::default(), data)?;
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await
    }
}
