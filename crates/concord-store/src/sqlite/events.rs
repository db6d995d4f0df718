//! The SQLite side of events and inboxes.

use super::ops::{append_event, get_instance};
use super::{db_err, SqliteStore};
use crate::model::{topics, NewMessage};
use crate::EventStore;
use async_trait::async_trait;
use concord_core::address::Address;
use concord_core::api::{EventSource, InboxMessage, InstanceState, MessageFrom, SentMessage};
use concord_core::idempotency::KeyKind;
use concord_core::{Error, Result, Timestamp};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

const FLOOR_KEY: &str = "events_floor";

/// The result recorded under an idempotency key: `Some(result)` if the key was
/// taken before (the result may itself be absent, for observations).
pub(crate) fn prior_key(
    c: &Connection,
    kind: KeyKind,
    scope: &str,
    key: &str,
) -> Result<Option<Option<i64>>> {
    c.prepare_cached("SELECT result FROM request_keys WHERE kind = ?1 AND scope = ?2 AND key = ?3")
        .and_then(|mut st| {
            st.query_row(params![kind.as_str(), scope, key], |r| r.get(0))
                .optional()
        })
        .map_err(db_err)
}

/// Takes an idempotency key (the caller checked [`prior_key`] in this transaction).
pub(crate) fn record_key(
    c: &Connection,
    now: i64,
    kind: KeyKind,
    scope: &str,
    key: &str,
    result: Option<i64>,
) -> Result<()> {
    c.prepare_cached("INSERT INTO request_keys (kind, scope, key, result, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
        .and_then(|mut st| st.execute(params![kind.as_str(), scope, key, result, now]))
        .map_err(db_err)?;
    Ok(())
}

fn publish_once(
    c: &Connection,
    now: i64,
    topic: &str,
    source: &EventSource,
    data: Value,
    scope: &str,
    key: &str,
) -> Result<(i64, bool)> {
    if let Some(prior) = prior_key(c, KeyKind::Event, scope, key)? {
        return Ok((prior.unwrap_or_default(), true));
    }
    let seq = append_event(c, now, topic, source, data)?;
    record_key(c, now, KeyKind::Event, scope, key, Some(seq))?;
    Ok((seq, false))
}

fn event_floor(c: &Connection) -> Result<i64> {
    c.query_row(
        "SELECT value FROM log_meta WHERE key = ?1",
        [FLOOR_KEY],
        |r| r.get(0),
    )
    .optional()
    .map_err(db_err)
    .map(|v| v.unwrap_or(0))
}

/// The last event written before `time`, found by bisecting seqs: the writer
/// stamps events with its clock as it appends them, so time rises with seq.
/// Why not an index on time: it was one more B-tree page in every commit, for
/// a question retention asks every few seconds. Were the clock stepped back,
/// the cut lands near the step instead of exactly at `time`; retention is a
/// bound on the log's age, and stays one within that step.
fn last_older_than(c: &Connection, time: i64, head: i64) -> Result<i64> {
    let mut at = c
        .prepare_cached("SELECT seq, time FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1")
        .map_err(db_err)?;
    // The first event at or after `seq`, if any.
    let mut probe = |seq: i64| -> Result<Option<(i64, i64)>> {
        at.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db_err)
    };
    let Some((first, first_time)) = probe(0)? else {
        return Ok(0);
    };
    if first_time >= time {
        return Ok(0);
    }
    // Invariant: `lo` is an event older than `time`; every seq above `hi` is not.
    let (mut lo, mut hi) = (first, head);
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match probe(mid)? {
            Some((seq, t)) if seq <= hi && t < time => lo = seq,
            _ => hi = mid - 1,
        }
    }
    Ok(lo)
}

fn prune(
    c: &Connection,
    now: i64,
    max_age_ms: i64,
    max_count: i64,
    inbox_retention_ms: i64,
) -> Result<u64> {
    let head: i64 = c
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
        .map_err(db_err)?;
    // Everything up to `cut` goes: older than max_age, or beyond the newest max_count.
    let by_age = last_older_than(c, now - max_age_ms, head)?;
    let by_count = (head - max_count).max(0);
    // The newest event always stays: SQLite numbers a row of an emptied table from 1
    // again, which would hand out positions that readers have already passed.
    let cut = by_age.max(by_count).min(head - 1);
    let mut removed = 0u64;
    if cut > event_floor(c)? {
        removed += c
            .execute("DELETE FROM events WHERE seq <= ?1", [cut])
            .map_err(db_err)? as u64;
        super::recent::note_pruned(cut);
        c.execute(
            "INSERT INTO log_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![FLOOR_KEY, cut],
        )
        .map_err(db_err)?;
    }
    removed += c
        .execute(
            "DELETE FROM request_keys WHERE created_at < ?1",
            [now - max_age_ms],
        )
        .map_err(db_err)? as u64;
    removed += c
        .execute(
            "DELETE FROM inbox WHERE instance IN (SELECT id FROM instances WHERE state != 'live' AND ended_at < ?1)",
            [now - inbox_retention_ms],
        )
        .map_err(db_err)? as u64;
    c.execute("DELETE FROM messages WHERE NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.message_id = messages.id)", [])
        .map_err(db_err)?;
    Ok(removed)
}

fn live_ids(c: &Connection, sql: &str, arg: &str, now: i64) -> Result<Vec<String>> {
    let mut s = c.prepare_cached(sql).map_err(db_err)?;
    let rows = s
        .query_map(params![arg, now], |r| r.get::<_, String>(0))
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

fn recipients(c: &Connection, now: i64, to: &Address) -> Result<Vec<String>> {
    match to {
        Address::Instance(id) => Ok(get_instance(c, id)?
            .filter(|i| i.state == InstanceState::Live && i.lease_until.millis() >= now)
            .map(|i| vec![i.id])
            .unwrap_or_default()),
        Address::Entity(e) => live_ids(
            c,
            "SELECT id FROM instances WHERE entity = ?1 AND state = 'live' AND lease_until >= ?2 ORDER BY id",
            e,
            now,
        ),
        Address::Primary(e) => live_ids(
            c,
            "SELECT i.id FROM entities e JOIN instances i ON i.id = e.primary_instance \
             WHERE e.name = ?1 AND i.state = 'live' AND i.lease_until >= ?2",
            e,
            now,
        ),
        Address::Capability(cap) => live_ids(
            c,
            "SELECT id FROM instances WHERE state = 'live' AND lease_until >= ?2 \
             AND EXISTS (SELECT 1 FROM json_each(instances.capabilities) WHERE value = ?1) ORDER BY id",
            cap,
            now,
        ),
    }
}

fn send(c: &Connection, now: i64, m: &NewMessage) -> Result<SentMessage> {
    let to = recipients(c, now, &m.to)?;
    if to.is_empty() {
        return Err(
            Error::not_found(format!("no live recipient for {}", m.to_text))
                .with_details(json!({"to": m.to_text})),
        );
    }
    let thread = m.thread_id.clone().unwrap_or_else(|| m.id.clone());
    c.prepare_cached(
        "INSERT INTO messages (id, thread_id, from_instance, from_entity, to_addr, subject, body, ack_required, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            m.id,
            thread,
            m.from.instance,
            m.from.entity,
            m.to_text,
            m.subject,
            serde_json::to_string(&m.body).unwrap_or_else(|_| "null".into()),
            m.ack_required as i64,
            now
        ])
    })
    .map_err(db_err)?;
    let seq = append_event(
        c,
        now,
        topics::MESSAGE_SENT,
        &EventSource {
            instance: m.from.instance.clone(),
            entity: m.from.entity.clone(),
            token: Some(m.token.clone()),
        },
        json!({"id": m.id, "thread_id": thread, "to": m.to_text, "delivered_to": to, "subject": m.subject}),
    )?;
    for r in &to {
        c.prepare_cached("INSERT INTO inbox (instance, message_id, cursor) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![r, m.id, seq]))
            .map_err(db_err)?;
    }
    Ok(SentMessage {
        id: m.id.clone(),
        thread_id: thread,
        delivered_to: to,
    })
}

fn read_inbox(
    c: &Connection,
    instance: &str,
    after: i64,
    limit: usize,
    unacked_only: bool,
) -> Result<Vec<InboxMessage>> {
    let mut s = c
        .prepare_cached(
            "SELECT m.id, m.from_instance, m.from_entity, m.to_addr, m.subject, m.body, m.thread_id, m.ack_required, \
             b.acked_at IS NOT NULL, m.created_at, b.cursor \
             FROM inbox b JOIN messages m ON m.id = b.message_id \
             WHERE b.instance = ?1 AND b.cursor > ?2 AND (?3 = 0 OR b.acked_at IS NULL) ORDER BY b.cursor LIMIT ?4",
        )
        .map_err(db_err)?;
    let rows = s
        .query_map(
            params![instance, after, unacked_only as i64, limit as i64],
            |r| {
                let body: String = r.get(5)?;
                Ok(InboxMessage {
                    id: r.get(0)?,
                    from: MessageFrom {
                        instance: r.get(1)?,
                        entity: r.get(2)?,
                    },
                    to: r.get(3)?,
                    subject: r.get(4)?,
                    body: serde_json::from_str(&body).unwrap_or(Value::Null),
                    thread_id: r.get(6)?,
                    ack_required: r.get::<_, i64>(7)? != 0,
                    acked: r.get(8)?,
                    created_at: Timestamp(r.get(9)?),
                    cursor: r.get(10)?,
                })
            },
        )
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
}

fn ack(c: &Connection, now: i64, instance: &str, message: &str) -> Result<bool> {
    let n = c
        .execute(
            "UPDATE inbox SET acked_at = ?3 WHERE instance = ?1 AND message_id = ?2 AND acked_at IS NULL",
            params![instance, message, now],
        )
        .map_err(db_err)?;
    if n > 0 {
        append_event(
            c,
            now,
            topics::MESSAGE_ACKED,
            &EventSource {
                instance: Some(instance.into()),
                entity: None,
                token: None,
            },
            json!({"id": message, "instance": instance}),
        )?;
        return Ok(true);
    }
    let present: bool = c
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM inbox WHERE instance = ?1 AND message_id = ?2)",
            params![instance, message],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    Ok(present)
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn publish(&self, topic: &str, source: EventSource, data: Value) -> Result<i64> {
        let topic = topic.to_string();
        self.writer
            .write(move |c, now| append_event(c, now, &topic, &source, data))
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
        self.writer
            .write(move |c, now| publish_once(c, now, &topic, &source, data, &scope, &key))
            .await
    }

    async fn event_floor(&self) -> Result<i64> {
        self.readers.read(event_floor).await
    }

    async fn prune(&self, max_age_ms: i64, max_count: i64, inbox_retention_ms: i64) -> Result<u64> {
        self.writer
            .write(move |c, now| prune(c, now, max_age_ms, max_count, inbox_retention_ms))
            .await
    }

    async fn send_message(&self, msg: NewMessage) -> Result<SentMessage> {
        self.writer.write(move |c, now| send(c, now, &msg)).await
    }

    async fn read_inbox(
        &self,
        instance: &str,
        after: i64,
        limit: usize,
        unacked_only: bool,
    ) -> Result<Vec<InboxMessage>> {
        let instance = instance.to_string();
        self.readers
            .read(move |c| read_inbox(c, &instance, after, limit, unacked_only))
            .await
    }

    async fn ack_message(&self, instance: &str, message: &str) -> Result<bool> {
        let (i, m) = (instance.to_string(), message.to_string());
        self.writer.write(move |c, now| ack(c, now, &i, &m)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bisection answers what `MAX(seq) WHERE time < t` answered with an
    /// index, over a log with a pruned head and gaps.
    #[test]
    fn bisecting_the_log_finds_the_last_event_older_than_a_time() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE events (seq INTEGER PRIMARY KEY, time INTEGER NOT NULL)")
            .unwrap();
        assert_eq!(last_older_than(&c, 100, 0).unwrap(), 0, "empty log");
        // seqs 5..=200 with gaps at multiples of 7; several events per millisecond.
        let seqs: Vec<i64> = (5..=200).filter(|s| s % 7 != 0).collect();
        for &s in &seqs {
            c.execute(
                "INSERT INTO events (seq, time) VALUES (?1, ?2)",
                [s, 1_000 + s / 3],
            )
            .unwrap();
        }
        let head = 200;
        for time in 990..1_100 {
            let expected: i64 = c
                .query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM events WHERE time < ?1",
                    [time],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(
                last_older_than(&c, time, head).unwrap(),
                expected,
                "time {time}"
            );
        }
    }
}
