//! The listener: one task per replica that keeps the event log's delivery horizon
//! (`horizon.rs`) and hears the other replicas' commits.
//!
//! It owns a dedicated connection (not pooled: LISTEN is per session, and a pooled
//! connection would be recycled or lent out) and runs *rounds*: one statement
//! that reads a snapshot with the seqs it shows above the horizon, then raises the
//! horizon watch that readers, the log tail and waiting writers follow. A round
//! runs when a local commit or a read asks for one ([`HorizonWatch::kick`]), on
//! another replica's NOTIFY, every few milliseconds while a gap is being waited
//! out, and every [`LISTENER_POLL`] regardless (which also proves the connection
//! alive). Rounds are sequential, so a burst of commits costs a few rounds, not
//! one each. The task reconnects by itself, with backoff, and stops when the
//! store is dropped.

use super::horizon::{Horizon, Snapshot};
use super::{pg_err, NOTIFY_CHANNEL, POOL_WAIT};
use concord_core::Result;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_postgres::NoTls;

/// A round even without a notification: proves the dedicated connection is alive
/// and makes up for a NOTIFY that was lost while the database was unreachable.
const LISTENER_POLL: Duration = Duration::from_secs(5);
/// Longest pause between two attempts of the listener to reconnect.
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a round runs while a gap is waited out: the transactions it waits on
/// may end by rolling back, which nobody announces.
const GAP_POLL: Duration = Duration::from_millis(5);
/// Least time between the starts of two rounds. Under load every commit asks for
/// a round, and back to back they were as many statements as the writes
/// themselves (each followed by the log tail's read); spaced out, a round covers
/// more commits, for at most this much more latency, and the queue suite on
/// PostgreSQL ran about 5% faster. When idle, a round starts at once.
const ROUND_SPACING: Duration = Duration::from_millis(1);
/// Most seqs one round lists; the highest seq is read as well, so a long backlog
/// is crossed in a couple of rounds, not one per this many.
const ROUND_LIMIT: i64 = 10_000;
/// How long a writer waits for the horizon to pass its commit, and a reader for a
/// fresh round, before going on without: the listener may be reconnecting.
pub(crate) const HORIZON_WAIT: Duration = Duration::from_secs(5);

const ROUND_SQL: &str = "SELECT pg_current_snapshot()::text, \
     ARRAY(SELECT seq FROM events WHERE seq > $1 ORDER BY seq LIMIT $2), \
     (SELECT max(seq) FROM events)";

/// What the write path, the readers and the listener share.
pub(crate) struct HorizonWatch {
    /// Every seq at or below this is final. Only the listener raises it.
    pub(crate) seq: watch::Sender<i64>,
    /// Asks for a round. A `Notify` keeps one permit, so asks that arrive during
    /// a round fold into the next one.
    kick: Notify,
    /// Rounds begun and finished: a reader that needs a round whose snapshot
    /// follows its call waits for the next one to be begun to finish.
    begun: AtomicU64,
    finished: watch::Sender<u64>,
}

impl HorizonWatch {
    pub(crate) fn new(start: i64) -> HorizonWatch {
        HorizonWatch {
            seq: watch::channel(start).0,
            kick: Notify::new(),
            begun: AtomicU64::new(0),
            finished: watch::channel(0).0,
        }
    }

    pub(crate) fn get(&self) -> i64 {
        *self.seq.borrow()
    }

    /// After a local commit that appended up to `seq`: returns once the horizon
    /// has passed it, so that the writer's next read finds its own events (or
    /// after [`HORIZON_WAIT`]: the commit stands either way).
    pub(crate) async fn passed(&self, seq: i64) {
        if self.get() >= seq {
            return;
        }
        self.kick.notify_one();
        let mut rx = self.seq.subscribe();
        if tokio::time::timeout(HORIZON_WAIT, rx.wait_for(|h| *h >= seq))
            .await
            .is_err()
        {
            tracing::warn!(
                seq,
                "the event horizon has not reached a commit; is the listener connected?"
            );
        }
    }

    /// Runs a round that begins after this call and returns the horizon then:
    /// everything committed before the call is at or below it, unless a gap below
    /// is still being waited out.
    pub(crate) async fn fresh(&self) -> i64 {
        let target = self.begun.load(Ordering::SeqCst) + 1;
        self.kick.notify_one();
        let mut rx = self.finished.subscribe();
        let _ = tokio::time::timeout(HORIZON_WAIT, rx.wait_for(|r| *r >= target)).await;
        self.get()
    }
}

/// Follows the log until `shutdown` changes. `key` is this store's schema, the
/// NOTIFY payload's prefix; `floor` a seq known final (the pruned floor).
pub(crate) async fn listener(
    cfg: tokio_postgres::Config,
    key: String,
    shared: Arc<HorizonWatch>,
    floor: i64,
    mut shutdown: watch::Receiver<()>,
) {
    let mut horizon = Horizon::new(floor);
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&cfg, &key, &shared, &mut horizon, &mut shutdown).await {
            Ok(Stop::Shutdown) => return,
            Ok(Stop::Lost) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!("event listener cannot connect: {e}"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LISTENER_MAX_BACKOFF);
    }
}

enum Stop {
    Shutdown,
    Lost,
}

/// One connection's worth of rounds: returns when the connection is lost.
async fn session(
    cfg: &tokio_postgres::Config,
    key: &str,
    shared: &HorizonWatch,
    horizon: &mut Horizon,
    shutdown: &mut watch::Receiver<()>,
) -> Result<Stop> {
    let (client, mut connection) = tokio::select! {
        _ = shutdown.changed() => return Ok(Stop::Shutdown),
        c = cfg.connect(NoTls) => c.map_err(|e| pg_err(&e))?,
    };
    // The connection object must be polled for the client to work at all; its
    // notifications come out of the same poll, so one task drives it and
    // forwards the payloads.
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                if tx.send(n.payload().to_string()).is_err() {
                    break;
                }
            }
        }
    });
    let _abort = AbortOnDrop(driver);
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
        .map_err(|e| pg_err(&e))?;
    let round = client.prepare(ROUND_SQL).await.map_err(|e| pg_err(&e))?;
    let mut ticker = tokio::time::interval(LISTENER_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round = tokio::time::Instant::now();
    loop {
        tokio::time::sleep_until(last_round + ROUND_SPACING).await;
        last_round = tokio::time::Instant::now();
        // A round: whatever was committed while we were not listening, or
        // whatever woke us.
        let n = shared.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let row = tokio::time::timeout(
            POOL_WAIT,
            client.query_one(&round, &[&horizon.get(), &ROUND_LIMIT]),
        )
        .await;
        let full = match row {
            Ok(Ok(row)) => match read_round(&row) {
                Some((snap, mut visible, max)) => {
                    let full = visible.len() as i64 >= ROUND_LIMIT;
                    if let Some(max) = max.filter(|m| visible.last() < Some(m)) {
                        visible.push(max);
                    }
                    if horizon.advance(&snap, &visible) {
                        super::raise(&shared.seq, horizon.get());
                    }
                    full
                }
                None => {
                    tracing::warn!("event listener: a round's row could not be read");
                    false
                }
            },
            _ => return Ok(Stop::Lost),
        };
        shared.finished.send_replace(n);
        if full {
            continue;
        }
        // Wait for something worth a round.
        loop {
            let gap_poll = async {
                if horizon.waiting() {
                    tokio::time::sleep(GAP_POLL).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return Ok(Stop::Shutdown),
                _ = ticker.tick() => break,
                _ = shared.kick.notified() => break,
                _ = gap_poll => break,
                note = notes.recv() => {
                    let Some(first) = note else { return Ok(Stop::Lost) };
                    // Drain what else has arrived: one round per burst. Another
                    // schema's hub on the same database is no reason for one.
                    let mut ours = false;
                    let mut next = Some(first);
                    while let Some(payload) = next {
                        ours |= payload.rsplit_once(':').is_none_or(|(k, _)| k == key);
                        next = notes.try_recv().ok();
                    }
                    if ours {
                        break;
                    }
                }
            }
        }
    }
}

/// The snapshot, the seqs listed above the horizon, and the highest seq visible.
fn read_round(row: &tokio_postgres::Row) -> Option<(Snapshot, Vec<i64>, Option<i64>)> {
    let snap: String = row.try_get(0).ok()?;
    let visible: Vec<i64> = row.try_get(1).ok()?;
    let max: Option<i64> = row.try_get(2).ok()?;
    Some((Snapshot::parse(&snap)?, visible, max))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
