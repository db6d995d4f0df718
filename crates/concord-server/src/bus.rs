//! Fan-out of the event log to subscribers (SSE streams, long-polls, inbox waits).
//!
//! One task per hub (`tail.rs`) reads the log in seq order and broadcasts each
//! event once; every subscriber holds a bounded `broadcast` receiver. A subscriber
//! that falls behind (its client reads slowly) is told it lagged and catches up from
//! the store by itself, so it never slows the publisher or the others: the tail
//! never waits for anybody. Delivery is gap-free and duplicate-free because a
//! subscription keeps its own cursor and drops anything at or below it.

use crate::AppState;
use bytes::Bytes;
use concord_core::api::Event;
use concord_core::topic::PatternSet;
use concord_core::{Error, ErrorCode, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events buffered per subscriber before it must catch up from the store.
pub const BUS_CAPACITY: usize = 4096;
/// Events read from the store per catch-up query.
const CATCH_UP_BATCH: usize = 500;

/// A committed event as the bus carries it: the event, and its SSE frame
/// serialized at most once.
///
/// Why the frame travels with the event: at 5,000 events/s to 100 streams, encoding
/// each event once per subscriber was the hub's largest cost (DESIGN §10); encoded
/// once here, a stream only copies bytes. Why on first use: the tail encodes it
/// only while somebody is subscribed; with nobody following the log (a queue's
/// task events, say), encoding every event was 3% of the hub's CPU under
/// `concord bench queue`. Derefs to the [`Event`], so long-polls and the other
/// waiters read it as before.
pub struct BusEvent {
    event: Event,
    sse: std::sync::OnceLock<Bytes>,
}

impl BusEvent {
    pub fn new(event: Event) -> BusEvent {
        BusEvent {
            event,
            sse: std::sync::OnceLock::new(),
        }
    }

    /// `id: <seq>`, `event: <topic>`, `data: <event json>` and the blank line,
    /// encoded by the first stream that sends it.
    pub fn sse_frame(&self) -> &Bytes {
        self.sse.get_or_init(|| sse_frame(&self.event))
    }

    pub fn event(&self) -> &Event {
        &self.event
    }
}

impl std::ops::Deref for BusEvent {
    type Target = Event;
    fn deref(&self) -> &Event {
        &self.event
    }
}

/// One SSE frame. Compact JSON holds no raw newline and topics are dotted words,
/// so each field is one line.
fn sse_frame(e: &Event) -> Bytes {
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    let mut out = String::with_capacity(data.len() + e.topic.len() + 40);
    out.push_str("id: ");
    out.push_str(&e.seq.to_string());
    out.push_str("\nevent: ");
    out.push_str(&e.topic);
    out.push_str("\ndata: ");
    out.push_str(&data);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// Counts live subscriptions for /metrics; decremented on drop, so a client that
/// disconnects mid-stream is accounted for.
#[derive(Default)]
pub struct SubscriberCount(AtomicI64);

impl SubscriberCount {
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Subscription {
    state: Arc<AppState>,
    patterns: PatternSet,
    /// Everything at or below this seq has been examined.
    cursor: i64,
    rx: broadcast::Receiver<Arc<BusEvent>>,
    pending: VecDeque<Arc<BusEvent>>,
    catching_up: bool,
}

impl Subscription {
    /// Subscribes to events after `from`. Subscribing to the bus happens first, so
    /// nothing committed between the store read and the bus can be missed.
    pub fn new(state: Arc<AppState>, patterns: PatternSet, from: i64) -> Subscription {
        let rx = state.bus.subscribe();
        state.subscribers.0.fetch_add(1, Ordering::Relaxed);
        Subscription {
            state,
            patterns,
            cursor: from,
            rx,
            pending: VecDeque::new(),
            catching_up: true,
        }
    }

    /// Where a client should resume to receive exactly what it has not seen:
    /// the cursor, less whatever is still queued here.
    pub fn resume_point(&self) -> i64 {
        match self.pending.front() {
            Some(e) => e.seq - 1,
            None => self.cursor,
        }
    }

    async fn catch_up(&mut self) -> Result<()> {
        let floor = self.state.store.event_floor().await?;
        if self.cursor < floor {
            return Err(Error::new(
                ErrorCode::CursorExpired,
                format!(
                    "events up to {floor} are no longer retained; cursor {} is too old",
                    self.cursor
                ),
            )
            .with_details(
                serde_json::json!({"cursor": self.cursor, "oldest_available": floor + 1}),
            ));
        }
        let events = self
            .state
            .store
            .read_events(self.cursor, CATCH_UP_BATCH)
            .await?;
        if events.len() < CATCH_UP_BATCH {
            self.catching_up = false;
        }
        for e in events {
            self.cursor = e.seq;
            if self.patterns.matches(&e.topic) {
                self.pending.push_back(Arc::new(BusEvent::new(e)));
            }
        }
        Ok(())
    }

    /// The next matching event that is already available without waiting for a
    /// new publish: queued here, or still to be read from the store. `None` once
    /// caught up with the log.
    pub async fn next_ready(&mut self) -> Result<Option<Arc<BusEvent>>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            if self.catching_up {
                self.catch_up().await?;
                continue;
            }
            match self.rx.try_recv() {
                Ok(e) if e.seq <= self.cursor => continue,
                Ok(e) if e.seq > self.cursor + 1 => self.catching_up = true,
                Ok(e) => {
                    self.cursor = e.seq;
                    if self.patterns.matches(&e.topic) {
                        return Ok(Some(e));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Err(Error::unavailable("the hub is shutting down"));
                }
            }
        }
    }

    /// The next matching event. Cancel-safe: state changes only after each await.
    pub async fn next(&mut self) -> Result<Arc<BusEvent>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            if self.catching_up {
                self.catch_up().await?;
                continue;
            }
            match self.rx.recv().await {
                Ok(e) if e.seq <= self.cursor => continue,
                Ok(e) if e.seq > self.cursor + 1 => {
                    // Something between is not in hand: read it from the store.
                    self.catching_up = true;
                }
                Ok(e) => {
                    self.cursor = e.seq;
                    if self.patterns.matches(&e.topic) {
                        return Ok(e);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Error::unavailable("the hub is shutting down"));
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.state.subscribers.0.fetch_sub(1, Ordering::Relaxed);
    }
}
