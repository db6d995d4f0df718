//! The PostgreSQL side of breakers, one for one with `sqlite/breaker.rs`. Every
//! transition locks the subject's breaker row first (`FOR UPDATE`, created if
//! missing), so replicas deciding on the same subject at once take turns: one
//! probe is granted fleet-wide and a trip is announced once.

use super::*;
use crate::breaker::*;
use crate::postgres::PostgresStore;
use async_trait::async_trait;
use concord_core::breaker::{
    Breaker, BreakerState, BreakerView, Outcome, Policies, Probe, ProbeResponse, Sample,
};
use concord_core::idempotency::KeyKind;
use concord_core::Result;

const COLS: &str =
    "state, opened_at, retry_at, opened_by, probe_id, probe_expires_at, since, subject";

fn breaker_from_row(r: &Row) -> R<Breaker> {
    let state: String = get(r, 0)?;
    let probe_id: Option<String> = get(r, 4)?;
    let probe_exp: Option<i64> = get(r, 5)?;
    Ok(Breaker {
        state: BreakerState::parse(&state).unwrap_or(BreakerState::Closed),
        opened_at: get(r, 1)?,
        retry_at: get(r, 2)?,
        opened_by: get::<Option<Value>>(r, 3)?.unwrap_or(Value::Null),
        probe: probe_id
            .zip(probe_exp)
            .map(|(id, expires_at)| Probe { id, expires_at }),
        since: get(r, 6)?,
    })
}

/// The breaker row, locked; created (closed) if the subject is new.
async fn lock(t: &Tx<'_>, subject: &str) -> R<Breaker> {
    exec(
        t.c,
        "INSERT INTO breakers (subject, state, opened_by, since, updated_at) VALUES ($1, 'closed', 'null', 0, $2) ON CONFLICT DO NOTHING",
        &[&subject, &t.now],
    )
    .await?;
    let r = row_one(
        t.c,
        &format!("SELECT {COLS} FROM breakers WHERE subject = $1 FOR UPDATE"),
        &[&subject],
    )
    .await?;
    breaker_from_row(&r)
}

async fn save(t: &Tx<'_>, subject: &str, b: &Breaker) -> R<()> {
    let (pid, pexp) = probe_cols(b);
    exec(
        t.c,
        "UPDATE breakers SET state = $2, opened_at = $3, retry_at = $4, opened_by = $5, probe_id = $6, probe_expires_at = $7, since = $8, updated_at = $9 WHERE subject = $1",
        &[&subject, &b.state.as_str(), &b.opened_at, &b.retry_at, &Json(&b.opened_by), &pid, &pexp, &b.since, &t.now],
    )
    .await?;
    Ok(())
}

async fn samples<C: GenericClient>(c: &C, subject: &str, after: i64) -> R<Vec<Sample>> {
    let rs = rows(
        c,
        "SELECT outcome, latency_ms, instance, entity, host, detail, probe_id, recorded_at FROM observations WHERE subject = $1 AND recorded_at > $2 ORDER BY id",
        &[&subject, &after],
    )
    .await?;
    rs.iter()
        .map(|r| {
            let o: String = get(r, 0)?;
            Ok(Sample {
                outcome: Outcome::parse(&o).unwrap_or(Outcome::Error),
                latency_ms: get(r, 1)?,
                instance: get(r, 2)?,
                entity: get(r, 3)?,
                host: get(r, 4)?,
                detail: get(r, 5)?,
                probe_id: get(r, 6)?,
                at: get(r, 7)?,
            })
        })
        .collect()
}

/// Applies one observation; false if its idempotency key was taken before.
async fn observe_one(t: &mut Tx<'_>, o: &NewObservation, policies: &Policies) -> R<bool> {
    if let Some((scope, key)) = &o.idempotency {
        if !super::events::take_key(t, KeyKind::Observation, scope, key).await? {
            return Ok(false);
        }
    }
    let policy = policies.for_subject(&o.subject);
    // Lock first: the window read below must include every observation committed
    // before this transition.
    let mut b = lock(t, &o.subject).await?;
    let s = &o.sample;
    exec(
        t.c,
        "INSERT INTO observations (subject, outcome, latency_ms, instance, entity, host, detail, probe_id, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[&o.subject, &s.outcome.as_str(), &s.latency_ms, &s.instance, &s.entity, &s.host, &s.detail, &s.probe_id, &t.now],
    )
    .await?;
    exec(
        t.c,
        "DELETE FROM observations WHERE subject = $1 AND recorded_at <= $2",
        &[&o.subject, &(t.now - policy.window_ms)],
    )
    .await?;
    let window = samples(t.c, &o.subject, t.now - policy.window_ms).await?;
    let mut sample = s.clone();
    sample.at = t.now;
    let changes = b.observe(policy, &window, &sample, t.now);
    if !changes.is_empty() {
        save(t, &o.subject, &b).await?;
    }
    for ch in changes {
        let (topic, data) = change_event(ch, &o.subject, &b, Some(&sample));
        t.event(topic, &o.source(), data);
    }
    Ok(true)
}

async fn view<C: GenericClient>(
    c: &C,
    now: i64,
    subject: &str,
    b: &Breaker,
    policies: &Policies,
) -> R<BreakerView> {
    let policy = policies.for_subject(subject);
    let window = samples(c, subject, now - policy.window_ms).await?;
    Ok(BreakerView::of(subject, b, policy, &window, now))
}

#[async_trait]
impl BreakerStore for PostgresStore {
    async fn observe(&self, obs: Vec<NewObservation>, policies: &Policies) -> Result<usize> {
        let policies = policies.clone();
        let mut obs = obs;
        // One lock order across replicas: subjects in name order.
        obs.sort_by(|a, b| a.subject.cmp(&b.subject));
        self.inner
            .write(move |t| {
                let (obs, policies) = (obs.clone(), policies.clone());
                Box::pin(async move {
                    let mut skipped = 0;
                    for o in &obs {
                        if !observe_one(t, o, &policies).await? {
                            skipped += 1;
                        }
                    }
                    Ok(skipped)
                })
            })
            .await
    }

    async fn get_breaker(&self, subject: &str, policies: &Policies) -> Result<Option<BreakerView>> {
        let c = self.inner.client().await?;
        async {
            let now = now_ms(&c).await?;
            let Some(r) = row_opt(
                &c,
                &format!("SELECT {COLS} FROM breakers WHERE subject = $1"),
                &[&subject],
            )
            .await?
            else {
                return Ok(None);
            };
            let b = breaker_from_row(&r)?;
            view(&c, now, subject, &b, policies).await.map(Some)
        }
        .await
        .map_err(Error::from)
    }

    async fn list_breakers(
        &self,
        state: Option<BreakerState>,
        policies: &Policies,
    ) -> Result<Vec<BreakerView>> {
        let c = self.inner.client().await?;
        async {
            let now = now_ms(&c).await?;
            let rs = rows(
                &c,
                &format!("SELECT {COLS} FROM breakers ORDER BY subject"),
                &[],
            )
            .await?;
            let mut out = Vec::new();
            for r in rs {
                let b = breaker_from_row(&r)?;
                let subject: String = get(&r, 7)?;
                if state.is_none_or(|st| b.effective_state(now) == st) {
                    out.push(view(&c, now, &subject, &b, policies).await?);
                }
            }
            R::Ok(out)
        }
        .await
        .map_err(Error::from)
    }

    async fn probe_breaker(
        &self,
        subject: &str,
        policies: &Policies,
        prober: Prober,
    ) -> Result<ProbeResponse> {
        let (subject, policies) = (subject.to_string(), policies.clone());
        self.inner
            .write(move |t| {
                let (subject, policies, prober) =
                    (subject.clone(), policies.clone(), prober.clone());
                Box::pin(async move {
                    let mut b = lock(t, &subject).await?;
                    let policy = policies.for_subject(&subject);
                    let (decision, changes) = b.probe(policy, t.now, ids::new_id("prb"));
                    if !changes.is_empty() {
                        save(t, &subject, &b).await?;
                        let source = EventSource {
                            instance: Some(prober.instance.clone()),
                            entity: prober.entity.clone(),
                            token: Some(prober.token.clone()),
                        };
                        for ch in changes {
                            let (topic, mut data) = change_event(ch, &subject, &b, None);
                            data["prober"] = json!(prober.instance);
                            t.event(topic, &source, data);
                        }
                    }
                    Ok(probe_response(&decision, &b))
                })
            })
            .await
    }

    async fn advance_breakers(&self, _policies: &Policies) -> Result<usize> {
        self.inner
            .write(move |t| {
                Box::pin(async move {
                    let due = rows(
                        t.c,
                        "SELECT subject FROM breakers WHERE state = 'open' AND retry_at <= $1 ORDER BY subject LIMIT 256",
                        &[&t.now],
                    )
                    .await?;
                    let mut n = 0;
                    for r in due {
                        let subject: String = get(&r, 0)?;
                        let mut b = lock(t, &subject).await?;
                        if let Some(ch) = b.advance(t.now) {
                            save(t, &subject, &b).await?;
                            let (topic, data) = change_event(ch, &subject, &b, None);
                            t.event(topic, &hub_source(), data);
                            n += 1;
                        }
                    }
                    Ok(n)
                })
            })
            .await
    }
}
