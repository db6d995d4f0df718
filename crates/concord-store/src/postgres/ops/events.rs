//! The PostgreSQL side of events and inboxes, one for one with `sqlite/events.rs`.
//! A child of `ops` so it shares its transaction type and helpers.

use super::*;
use crate::postgres::PostgresStore;
use crate::EventStore;
use async_trait::async_trait;
use concord_core::address::Address;
use concord_core::api::{InboxMessage, MessageFrom, SentMessage};
use concord_core::idempotency::KeyKind;
use concord_core::Result;

const FLOOR_KEY: &str = "events_floor";

pub(crate) async fn event_floor<C: GenericClient>(c: &C) -> R<i64> {
    Ok(row_opt(
        c,
        "SELECT value FROM log_meta WHERE key = $1",
        &[&FLOOR_KEY],
    )
    .await?
    .map(|r| get::<i64>(&r, 0))
    .transpose()?
    .unwrap_or(0))
}

/// Locks the `events_floor` row so two replicas pruning at once do not interleave.
/// `head` is the horizon: nothing above it is ever pruned.
async fn prune(
    t: &mut Tx<'_>,
    head: i64,
    max_age_ms: i64,
    max_count: i64,
    inbox_retention_ms: i64,
) -> R<u64> {
    exec(
        t.c,
        "INSERT INTO log_meta (key, value) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING",
        &[&FLOOR_KEY],
    )
    .await?;
    let floor: i64 = get(
        &row_one(
            t.c,
            "SELECT value FROM log_meta WHERE key = $1 FOR UPDATE",
            &[&FLOOR_KEY],
        )
        .await?,
        0,
    )?;
    let age_cut = t.now - max_age_ms;
    let by_age: i64 = get(
        &row_one(
            t.c,
            "SELECT COALESCE(MAX(seq), 0)::bigint FROM events WHERE time < $1",
            &[&age_cut],
        )
        .await?,
        0,
    )?;
    // The newest event always stays, as in SQLite (where it must: an emptied table
    // would number its rows from 1 again), so both backends retain the same log.
    let cut = by_age.max((head - max_count).max(0)).min(head - 1);
    let mut removed = 0u64;
    if cut > floor {
        removed += exec(t.c, "DELETE FROM events WHERE seq <= $1", &[&cut]).await?;
        exec(
            t.c,
            "UPDATE log_meta SET value = $2 WHERE key = $1",
            &[&FLOOR_KEY, &cut],
        )
        .await?;
    }
    removed += exec(
        t.c,
        "DELETE FROM request_keys WHERE created_at < $1",
        &[&age_cut],
    )
    .await?;
    let ended_before = t.now - inbox_retention_ms;
    removed += exec(
        t.c,
        "DELETE FROM inbox WHERE instance IN (SELECT id FROM instances WHERE state <> 'live' AND ended_at < $1)",
        &[&ended_before],
    )
    .await?;
    exec(
        t.c,
        "DELETE FROM messages m WHERE NOT EXISTS (SELECT 1 FROM inbox b WHERE b.message_id = m.id)",
        &[],
    )
    .await?;
    Ok(removed)
}

async fn live_ids(t: &Tx<'_>, sql: &str, arg: &str) -> R<Vec<String>> {
    rows(t.c, sql, &[&arg, &t.now])
        .await?
        .iter()
        .map(|r| get::<String>(r, 0))
        .collect()
}

async fn recipients(t: &Tx<'_>, to: &Address) -> R<Vec<String>> {
    match to {
        Address::Instance(id) => Ok(get_instance(t.c, id)
            .await?
            .filter(|i| i.state == InstanceState::Live && i.lease_until.millis() >= t.now)
            .map(|i| vec![i.id])
            .unwrap_or_default()),
        Address::Entity(e) => {
            live_ids(
                t,
                "SELECT id FROM instances WHERE entity = $1 AND state = 'live' AND lease_until >= $2 ORDER BY id",
                e,
            )
            .await
        }
        Address::Primary(e) => {
            live_ids(
                t,
                "SELECT i.id FROM entities e JOIN instances i ON i.id = e.primary_instance \
                 WHERE e.name = $1 AND i.state = 'live' AND i.lease_until >= $2",
                e,
            )
            .await
        }
        Address::Capability(cap) => {
            live_ids(
                t,
                "SELECT id FROM instances WHERE state = 'live' AND lease_until >= $2 \
                 AND EXISTS (SELECT 1 FROM json_array_elements_text(capabilities) AS c(v) WHERE c.v = $1) ORDER BY id",
                cap,
            )
            .await
        }
    }
}

async fn send(t: &mut Tx<'_>, m: &NewMessage) -> R<SentMessage> {
    let to = recipients(t, &m.to).await?;
    if to.is_empty() {
        return Err(Fail::Done(
            Error::not_found(format!("no live recipient for {}", m.to_text))
                .with_details(json!({"to": m.to_text})),
        ));
    }
    let thread = m.thread_id.clone().unwrap_or_else(|| m.id.clone());
    exec(
        t.c,
        "INSERT INTO messages (id, thread_id, from_instance, from_entity, to_addr, subject, body, ack_required, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[&m.id, &thread, &m.from.instance, &m.from.entity, &m.to_text, &m.subject, &Json(&m.body), &m.ack_required, &t.now],
    )
    .await?;
    let idx = t.event(
        topics::MESSAGE_SENT,
        &EventSource { instance: m.from.instance.clone(), entity: m.from.entity.clone(), token: Some(m.token.clone()) },
        json!({"id": m.id, "thread_id": thread, "to": m.to_text, "delivered_to": to, "subject": m.subject}),
    );
    t.flush().await?;
    let seq = t.seq_of(idx)?;
    exec(
        t.c,
        "INSERT INTO inbox (instance, message_id, cursor) SELECT r, $2, $3 FROM unnest($1::text[]) AS r",
        &[&to, &m.id, &seq],
    )
    .await?;
    Ok(SentMessage {
        id: m.id.clone(),
        thread_id: thread,
        delivered_to: to,
    })
}

async fn read_inbox<C: GenericClient>(
    c: &C,
    instance: &str,
    after: i64,
    limit: usize,
    unacked_only: bool,
) -> R<Vec<InboxMessage>> {
    rows(
        c,
        "SELECT m.id, m.from_instance, m.from_entity, m.to_addr, m.subject, m.body, m.thread_id, m.ack_required, \
         b.acked_at IS NOT NULL, m.created_at, b.cursor \
         FROM inbox b JOIN messages m ON m.id = b.message_id \
         WHERE b.instance = $1 AND b.cursor > $2 AND (NOT $3 OR b.acked_at IS NULL) ORDER BY b.cursor LIMIT $4",
        &[&instance, &after, &unacked_only, &limit_param(limit)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(InboxMessage {
            id: get(r, 0)?,
            from: MessageFrom { instance: get(r, 1)?, entity: get(r, 2)? },
            to: get(r, 3)?,
            subject: get(r, 4)?,
            body: get::<Option<Value>>(r, 5)?.unwrap_or(Value::Null),
            thread_id: get(r, 6)?,
            ack_required: get(r, 7)?,
            acked: get(r, 8)?,
            created_at: Timestamp(get(r, 9)?),
            cursor: get(r, 10)?,
        })
    })
    .collect()
}

async fn ack(t: &mut Tx<'_>, instance: &str, message: &str) -> R<bool> {
    let n = exec(
        t.c,
        "UPDATE inbox SET acked_at = $3 WHERE instance = $1 AND message_id = $2 AND acked_at IS NULL",
        &[&instance, &message, &t.now],
    )
    .await?;
    if n > 0 {
        t.event(
            topics::MESSAGE_ACKED,
            &EventSource {
                instance: Some(instance.into()),
                entity: None,
                token: None,
            },
            json!({"id": message, "instance": instance}),
        );
        return Ok(true);
    }
    let present: bool = get(
        &row_one(
            t.c,
            "SELECT EXISTS(SELECT 1 FROM inbox WHERE instance = $1 AND message_id = $2)",
            &[&instance, &message],
        )
        .await?,
        0,
    )?;
    Ok(present)
}

async fn publish(t: &mut Tx<'_>, topic: &str, source: &EventSource, data: &Value) -> R<i64> {
    // Topics from clients are validated strings, not 'static: store them as owned.
    let idx = t.event_owned(topic.to_string(), source, data.clone());
    t.flush().await?;
    t.seq_of(idx)
}

/// Takes an idempotency key in this transaction; false if it was taken before.
/// The insert waits for a concurrent transaction holding the same key, so of two
/// racing writers exactly one takes it.
pub(super) async fn take_key(t: &Tx<'_>, kind: KeyKind, scope: &str, key: &str) -> R<bool> {
    Ok(exec(
        t.c,
        "INSERT INTO request_keys (kind, scope, key, result, created_at) VALUES ($1, $2, $3, NULL, $4) \
         ON CONFLICT (kind, scope, key) DO NOTHING",
        &[&kind.as_str(), &scope, &key, &t.now],
    )
    .await?
        == 1)
}

async fn publish_once(
    t: &mut Tx<'_>,
    topic: &str,
    source: &EventSource,
    data: &Value,
    scope: &str,
    key: &str,
) -> R<(i64, bool)> {
    if !take_key(t, KeyKind::Event, scope, key).await? {
        let prior: Option<i64> = get(
            &row_one(
                t.c,
                "SELECT result FROM request_keys WHERE kind = $1 AND scope = $2 AND key = $3",
                &[&KeyKind::Event.as_str(), &scope, &key],
            )
            .await?,
            0,
        )?;
        return Ok((prior.unwrap_or_default(), true));
    }
    let seq = publish(t, topic, source, data).await?;
    // The key's row is already ours: this takes no new lock.
    exec(
        t.c,
        "UPDATE request_keys SET result = $4 WHERE kind = $1 AND scope = $2 AND key = $3",
        &[&KeyKind::Event.as_str(), &scope, &key, &seq],
    )
    .await?;
    Ok((seq, false))
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn publish(&self, topic: &str, source: EventSource, data: Value) -> Result<i64> {
        let topic = topic.to_string();
        self.inner
            .write(move |t| {
                let (topic, source, data) = (topic.clone(), source.clone(), data.clone());
                Box::pin(async move { publish(t, &topic, &source, &data).await })
            })
            .await
    }

    async fn publish_once(
        &self,
        topic: &str,
        source: EventSource,
        data: Value,
        scope: &str,
        key: &str,
    ) -> Result<(i64, bool)> {
        let (topic, scope, key) = (topic.to_string(), scope.to_string(), key.to_string());
        self.inner
            .write(move |t| {
                let (topic, source, data) = (topic.clone(), source.clone(), data.clone());
                let (scope, key) = (scope.clone(), key.clone());
                Box::pin(async move { publish_once(t, &topic, &source, &data, &scope, &key).await })
            })
            .await
    }

    async fn event_floor(&self) -> Result<i64> {
        timed(async {
            let c = self.inner.client().await?;
            event_floor(&c).await.map_err(Error::from)
        })
        .await
    }

    async fn prune(&self, max_age_ms: i64, max_count: i64, inbox_retention_ms: i64) -> Result<u64> {
        let head = crate::Store::last_event_seq(self).await?;
        self.inner
            .write(move |t| {
                Box::pin(
                    async move { prune(t, head, max_age_ms, max_count, inbox_retention_ms).await },
                )
            })
            .await
    }

    async fn send_message(&self, msg: NewMessage) -> Result<SentMessage> {
        self.inner
            .write(move |t| {
                let msg = msg.clone();
                Box::pin(async move { send(t, &msg).await })
            })
            .await
    }

    async fn read_inbox(
        &self,
        instance: &str,
        after: i64,
        limit: usize,
        unacked_only: bool,
    ) -> Result<Vec<InboxMessage>> {
        timed(async {
            let c = self.inner.client().await?;
            read_inbox(&c, instance, after, limit, unacked_only)
                .await
                .map_err(Error::from)
        })
        .await
    }

    async fn ack_message(&self, instance: &str, message: &str) -> Result<bool> {
        let (i, m) = (instance.to_string(), message.to_string());
        self.inner
            .write(move |t| {
                let (i, m) = (i.clone(), m.clone());
                Box::pin(async move { ack(t, &i, &m).await })
            })
            .await
    }
}
