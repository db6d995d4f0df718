//! The log tail: keeps this replica's caches (presence, entity epochs, token cache)
//! in step with changes committed anywhere, by reading the event log.
//!
//! Every state change appends an event in its own transaction, so the log is the
//! one ordered account of what changed. On SQLite this only re-reads what this
//! hub wrote; on PostgreSQL it is how replica B learns that replica A granted a
//! primary or revoked a token (woken by NOTIFY, reading from the table).

use crate::AppState;
use concord_core::api::Event;
use concord_store::topics;
use std::sync::Arc;
use tokio::sync::watch;

const BATCH: usize = 1000;

pub(crate) async fn run(state: Arc<AppState>, mut cursor: i64, mut stop: watch::Receiver<bool>) {
    let mut seqs = state.store.watch_events();
    loop {
        loop {
            match state.store.read_events(cursor, BATCH).await {
                Ok(events) => {
                    let n = events.len();
                    for e in events {
                        apply(&state, &e);
                        cursor = e.seq;
                        let event = crate::bus::BusEvent::new(e);
                        // Encoded here, once, while anybody follows the log, so
                        // that no stream waits on another stream's task for it.
                        if state.subscribers.get() > 0 {
                            event.sse_frame();
                        }
                        // No receivers is fine: nobody is subscribed right now.
                        let _ = state.bus.send(Arc::new(event));
                    }
                    if n < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("log tail: {e}");
                    break;
                }
            }
        }
        tokio::select! {
            r = seqs.changed() => if r.is_err() { break },
            _ = stop.changed() => break,
            // Backstop for a missed wake-up hint (NOTIFY is best effort).
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

fn str_field<'a>(e: &'a Event, k: &str) -> Option<&'a str> {
    e.data.get(k).and_then(|v| v.as_str())
}

fn apply(state: &AppState, e: &Event) {
    match e.topic.as_str() {
        topics::INSTANCE_EXPIRED | topics::INSTANCE_CLOSED => {
            if let Some(id) = str_field(e, "instance") {
                state.presence.remove(id);
            }
        }
        topics::PRIMARY_GRANTED | topics::PRIMARY_TRANSFERRED => {
            if let (Some(entity), Some(id), Some(epoch)) = (
                str_field(e, "entity"),
                str_field(e, "instance"),
                e.data.get("epoch").and_then(|v| v.as_u64()),
            ) {
                state
                    .presence
                    .set_entity(entity, epoch, Some(id.to_string()));
            }
        }
        topics::PRIMARY_RELEASED => {
            if let (Some(entity), Some(id)) = (str_field(e, "entity"), str_field(e, "instance")) {
                state.presence.primary_released(entity, id);
                state.primary_released.send_modify(|v| *v += 1);
            }
        }
        topics::TOKEN_REVOKED => {
            if let Some(id) = str_field(e, "id") {
                state.auth.forget(Some(id), None);
            }
        }
        _ => {}
    }
}
