//! The PostgreSQL backend: several stateless hub replicas on one database
//! (DESIGN §2 Storage).
//!
//! Where SQLite gets atomicity for free from its single writer thread, here many
//! replicas, each with a pool of connections, write at once. What keeps the domain
//! invariants (one live primary per entity, fencing) is that every operation that
//! checks and then writes runs in one transaction that first locks the rows it
//! decides on, always in the same order, so that two replicas can never both pass
//! a check and both write:
//!
//! 1. `entities` rows (`SELECT … FOR UPDATE`; in name order when there are several),
//! 2. `instances` rows,
//! 3. `ghosts`, `tokens`, `entity_state` rows.
//!
//! Event seqs take no lock: they come from a sequence, and readers are served up
//! to the delivery horizon that the listener task keeps (`horizon.rs`,
//! `listener.rs`).
//!
//! A single lock order means a deadlock can only come from outside this module;
//! should PostgreSQL still report one (or a serialization failure), the whole
//! transaction is retried a few times ([`Inner::write`]).
//!
//! Time comes from the database clock (`clock_timestamp()`, read inside each
//! transaction), never from the hub's, so replicas on different hosts never
//! disagree about whether a lease has run out.

pub mod horizon;
mod listener;
mod ops;
mod schema;

use crate::model::*;
use crate::Store;
use async_trait::async_trait;
use concord_core::api::{
    EntityDetail, EntitySummary, Event, Ghost, Instance, PatchInstanceRequest, PrimaryGrant,
    Resigned, StateEntry, TokenInfo,
};
use concord_core::authz::Principal;
use concord_core::{Error, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use ops::{Fail, Tx, TxFuture};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::NoTls;

/// Connections per replica unless the caller asks otherwise.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// How long an operation waits for a pooled connection (or to open one) before
/// answering `unavailable`: long enough to ride out a burst, short enough that a
/// database that is down turns into a 503 instead of a hung request.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Attempts of a transaction that PostgreSQL rolled back for a serialization
/// failure or a deadlock before giving up with `unavailable`.
const MAX_ATTEMPTS: u32 = 5;
/// Longest an operation may take, waits included. PostgreSQL gives up on a dead
/// peer only after TCP timeouts of minutes; a request must fail sooner than that.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// The LISTEN/NOTIFY channel that wakes the other replicas' event readers.
pub const NOTIFY_CHANNEL: &str = "concord_events";
/// Least time between two NOTIFYs of one replica: under load they were sent
/// back to back, one statement per few commits (the queue suite ran about 5%
/// faster spaced out). The other replicas hear of a commit at most this much
/// later; an idle replica's first NOTIFY goes at once.
const NOTIFY_SPACING: Duration = Duration::from_millis(2);
/// Most durable heartbeats written by one statement.
const HEARTBEAT_BATCH: usize = 256;
/// Heartbeat batches in flight at once. While they are, new durable heartbeats
/// queue up and go out together in the next batch.
const HEARTBEAT_BATCHES_IN_FLIGHT: usize = 4;

/// Maps a tokio-postgres error to the project's error. Losing the database (refused
/// or broken connection, server shutting down, too many connections) is
/// `unavailable`: the request may succeed later and the hub must not look broken.
/// Anything else is a bug or a schema mismatch: `internal`.
pub(crate) fn pg_err(e: &tokio_postgres::Error) -> Error {
    if is_unavailable(e) {
        Error::unavailable(format!("database unavailable: {e}"))
    } else {
        Error::internal(format!("postgres: {}", describe(e)))
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exception, 53: insufficient resources (too many
        // connections, disk full), 57P: server shutting down or starting,
        // 58: I/O error, 25P03: our session idled out in a transaction.
        return c.starts_with("08")
            || c.starts_with("53")
            || c.starts_with("57P")
            || c.starts_with("58")
            || c == "25P03";
    }
    if e.is_closed() {
        return true;
    }
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let text = e.to_string();
    io || text.starts_with("error connecting")
        || text.starts_with("error communicating")
        || text.starts_with("timeout")
}

/// Whether PostgreSQL rolled the transaction back only because it raced another
/// one (serialization failure, deadlock): running it again is safe and will
/// usually succeed.
pub(crate) fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(e.code().map(|c| c.code()), Some("40001" | "40P01"))
}

pub(crate) fn pool_err(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => {
            if is_unavailable(&e) {
                Error::unavailable(format!("database unavailable: {e}"))
            } else {
                // Authentication failures, a missing database: still nothing the
                // caller can fix, and the hub should say the store is unusable.
                Error::unavailable(format!("database unavailable: {}", describe(&e)))
            }
        }
        PoolError::Timeout(t) => Error::unavailable(format!(
            "database unavailable: timed out ({t:?}) waiting for a connection"
        )),
        PoolError::Closed => {
            Error::unavailable("database unavailable: the connection pool is closed")
        }
        other => Error::unavailable(format!("database unavailable: {other}")),
    }
}

/// The schema name a store is confined to. Restricted to lowercase identifiers so
/// that it can travel unquoted in the connection's startup options (`-c
/// search_path=…`) and in the NOTIFY payload.
fn check_schema(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok_first || !ok_rest || schema.len() > 63 || schema.starts_with("pg_") {
        return Err(Error::bad_field(
            "schema",
            format!("{schema:?} must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 63 bytes, not pg_*)"),
        ));
    }
    Ok(())
}

/// What every task of one store shares: the pool and the two signals that follow
/// commits (the delivery horizon and the coalescing notifier).
pub(crate) struct Inner {
    pool: Pool,
    /// The event log's delivery horizon, kept by the listener task.
    horizon: Arc<listener::HorizonWatch>,
    /// Newest seq this process committed and has not yet announced by NOTIFY.
    to_notify: watch::Sender<i64>,
    /// Commits, operations and time, for `/metrics`.
    stats: crate::WriteStats,
}

impl Inner {
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool.get().await.map_err(pool_err)
    }

    /// After a local commit that appended events up to `seq`: queues the
    /// cross-replica hint and waits for this replica's horizon to pass `seq`, so
    /// that the writer's next read (and the log tail) finds what it wrote.
    async fn committed(&self, seq: i64) {
        raise(&self.to_notify, seq);
        self.horizon.passed(seq).await;
    }

    /// Runs `op` in one transaction on a pooled connection, retrying it when
    /// PostgreSQL aborts it for a serialization failure or a deadlock, and commits.
    ///
    /// The transaction runs in its own task: if the caller goes away (a client
    /// hangs up mid-request) the operation still finishes or rolls back as one
    /// unit, and a commit is always followed by the wake-ups it owes.
    pub(crate) async fn write<T, F>(self: &Arc<Self>, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a, 'c> FnMut(&'a mut Tx<'c>) -> TxFuture<'a, T> + Send + 'static,
    {
        let inner = self.clone();
        tokio::spawn(async move { timed(inner.write_here(op)).await })
            .await
            .map_err(|e| Error::internal(format!("a store transaction failed: {e}")))?
    }

    async fn write_here<T, F>(&self, mut op: F) -> Result<T>
    where
        F: for<'a, 'c> FnMut(&'a mut Tx<'c>) -> TxFuture<'a, T>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = TxConn {
                client: Some(self.client().await?),
                ended: false,
            };
            let began = std::time::Instant::now();
            let outcome: std::result::Result<(T, Option<i64>, Duration), Fail> = async {
                let client = conn.client.as_ref().ok_or_else(|| {
                    Fail::Done(Error::internal("a write transaction lost its connection"))
                })?;
                let mut tx = Tx::begin(client).await?;
                match op(&mut tx).await {
                    Ok(out) => {
                        let committing = std::time::Instant::now();
                        let last = tx.commit().await?;
                        conn.ended = true;
                        Ok((out, last, committing.elapsed()))
                    }
                    Err(e) => {
                        conn.ended = tx.rollback().await.is_ok();
                        Err(e)
                    }
                }
            }
            .await;
            // Back to the pool (or out of it, if left open) before waiting for
            // the horizon: the wait needs no connection, and other writers do.
            drop(conn);
            match outcome {
                Ok((out, last, commit)) => {
                    self.stats.committed(1, began.elapsed(), commit);
                    if let Some(seq) = last {
                        self.committed(seq).await;
                    }
                    return Ok(out);
                }
                Err(Fail::Retry(msg)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(
                        attempt,
                        "postgres transaction raced another, retrying: {msg}"
                    );
                    // Back off a little, more each time, so that the transactions
                    // that collided do not collide again in lockstep.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0);
                    let jitter = u64::from(nanos % 5_000) + 1_000 * u64::from(attempt);
                    tokio::time::sleep(Duration::from_micros(jitter * u64::from(attempt))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A pooled connection lent to one write transaction. [`Tx`] sends BEGIN and
/// COMMIT by hand, so nothing ends a transaction that is abandoned midway: unless
/// `ended` was set after a clean COMMIT or ROLLBACK, dropping this (an error at
/// BEGIN or COMMIT, the operation's timeout dropping the future, a panic) takes
/// the connection out of the pool instead of lending it out mid-transaction.
struct TxConn {
    client: Option<deadpool_postgres::Client>,
    ended: bool,
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if !self.ended {
            if let Some(client) = self.client.take() {
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

/// Bounds an operation by [`OP_TIMEOUT`].
pub(crate) async fn timed<T>(op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(OP_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(Error::unavailable(format!(
                "database unavailable: no answer within {OP_TIMEOUT:?}"
            )))
        })
}

/// Raises a watch to `seq` if it is higher: commits finish in seq order, but the
/// tasks that report them may not run in that order.
fn raise(w: &watch::Sender<i64>, seq: i64) {
    w.send_if_modified(|cur| {
        if seq > *cur {
            *cur = seq;
            true
        } else {
            false
        }
    });
}

/// The PostgreSQL store: a connection pool, a listener that keeps the event
/// horizon and hears about other replicas' commits, and a notifier that tells
/// them about ours.
pub struct PostgresStore {
    inner: Arc<Inner>,
    /// Durable heartbeats on their way to [`heartbeat_batcher`]; dropped with the
    /// store, which ends the batcher.
    beats: mpsc::Sender<BeatJob>,
    /// Dropped with the store: tells the listener task to stop.
    _shutdown: watch::Sender<()>,
}

/// One durable heartbeat waiting for its batch: instance, lease owner, and where
/// to send the outcome (`None`: not live and unlapsed, take the locked path).
type BeatJob = (
    String,
    String,
    oneshot::Sender<Result<Option<DurableHeartbeat>>>,
);

/// Writes durable heartbeats in batches (DESIGN §2: heartbeats are the hot path).
/// Each instance writes its lease ahead about twice per TTL, so a fleet of 10,000
/// with the default TTL sends well over a thousand a second; one statement and
/// one commit for all that arrive together, instead of one each, keeps them from
/// queuing for pooled connections and from costing the database a commit each.
async fn heartbeat_batcher(inner: Arc<Inner>, mut jobs: mpsc::Receiver<BeatJob>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HEARTBEAT_BATCHES_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = jobs.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < HEARTBEAT_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let ids: Vec<String> = batch.iter().map(|j| j.0.clone()).collect();
            let owners: Vec<String> = batch.iter().map(|j| j.1.clone()).collect();
            let mut attempt = 0;
            let written = loop {
                attempt += 1;
                let began = std::time::Instant::now();
                let outcome = timed(async {
                    let c = inner.client().await?;
                    Ok(ops::heartbeat_batch(&c, &ids, &owners).await)
                })
                .await;
                if let Ok(Ok(_)) = &outcome {
                    // One statement, its own transaction: all of it is the commit.
                    let took = began.elapsed();
                    inner.stats.committed(ids.len(), took, took);
                }
                match outcome {
                    Ok(Err(Fail::Retry(msg))) if attempt < MAX_ATTEMPTS => {
                        tracing::debug!(attempt, "heartbeat batch raced another, retrying: {msg}");
                    }
                    Ok(r) => break r.map_err(Error::from),
                    Err(e) => break Err(e),
                }
            };
            for (id, _, reply) in batch {
                // A caller that went away no longer wants its answer.
                let _ = reply.send(match &written {
                    Ok(map) => Ok(map.get(&id).cloned()),
                    Err(e) => Err(e.clone()),
                });
            }
        });
    }
}

/// Runs one write operation through [`Inner::write`], cloning its owned
/// arguments for each attempt (a retried transaction starts from scratch).
macro_rules! write_op {
    ($store:expr, [$($arg:ident),*], |$t:ident| $call:expr) => {
        $store
            .inner
            .write(move |$t| {
                $(let $arg = $arg.clone();)*
                Box::pin(async move { $call.await })
            })
            .await
    };
}

/// Runs one read on a pooled connection (no transaction: each read is one
/// statement, or, like SQLite's, a few that need no common snapshot).
macro_rules! read_op {
    ($store:expr, |$c:ident| $call:expr) => {
        timed(async {
            let $c = $store.inner.client().await?;
            $call.await.map_err(Error::from)
        })
        .await
    };
}

impl PostgresStore {
    /// Connects with [`DEFAULT_POOL_SIZE`] connections. See [`PostgresStore::connect_with`].
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<PostgresStore> {
        Self::connect_with(url, schema, DEFAULT_POOL_SIZE).await
    }

    /// Connects to `url` (`postgres://user:pass@host:port/db`), applies the
    /// migrations and starts the LISTEN task. With `schema`, every table lives in
    /// that schema (created if missing) and every connection's `search_path` is
    /// set to it, so several hubs (or test runs) can share one database without
    /// seeing each other. Fails with `unavailable` if the database cannot be reached.
    pub async fn connect_with(
        url: &str,
        schema: Option<&str>,
        pool_size: usize,
    ) -> Result<PostgresStore> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::bad_field("database_url", format!("{e}")))?;
        if let Some(s) = schema {
            check_schema(s)?;
        }
        // Startup options apply to every connection the pool (or the listener)
        // opens, including those opened after the database restarts: a
        // post-connect `SET` could be skipped by a reconnect path, these cannot.
        // The idle-in-transaction timeout frees the entity locks of a replica
        // that hangs mid-transaction, so it cannot stall the whole fleet.
        let mut options = cfg.get_options().unwrap_or("").to_string();
        if let Some(s) = schema {
            options.push_str(&format!(" -c search_path={s}"));
        }
        options.push_str(" -c idle_in_transaction_session_timeout=60000");
        cfg.options(options.trim());
        if cfg.get_application_name().is_none() {
            cfg.application_name("concord");
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(POOL_WAIT);
        }
        cfg.keepalives_idle(Duration::from_secs(30));

        // Fast recycling checks only that the connection is not closed. The
        // verified kind sent a query on every checkout, a third of the database's
        // statements under load, for little: a connection the server dropped is
        // seen closed by its driver task, a write that finds one broken anyway
        // fails `unavailable` like any lost connection, and a write transaction
        // that did not end cleanly never returns its connection to the pool
        // (`Inner::write_here`).
        let manager = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| Error::internal(format!("cannot build the connection pool: {e}")))?;

        let key = {
            let mut client = pool.get().await.map_err(pool_err)?;
            schema::migrate(&mut client, schema).await?
        };
        // Seqs at or below the floor were pruned: final. The listener's first
        // round moves the horizon up to the log's head.
        let floor = {
            let client = pool.get().await.map_err(pool_err)?;
            ops::event_floor(&client).await.map_err(Error::from)?
        };
        let horizon = Arc::new(listener::HorizonWatch::new(floor));
        let (to_notify, notify_rx) = watch::channel(floor);
        let (shutdown, shutdown_rx) = watch::channel(());
        tokio::spawn(notifier(pool.clone(), key.clone(), notify_rx));
        tokio::spawn(listener::listener(
            cfg,
            key,
            horizon.clone(),
            floor,
            shutdown_rx,
        ));
        let inner = Arc::new(Inner {
            pool,
            horizon,
            to_notify,
            stats: crate::WriteStats::default(),
        });
        let (beats, beat_jobs) = mpsc::channel(HEARTBEAT_BATCH * HEARTBEAT_BATCHES_IN_FLIGHT * 4);
        tokio::spawn(heartbeat_batcher(inner.clone(), beat_jobs));
        Ok(PostgresStore {
            inner,
            beats,
            _shutdown: shutdown,
        })
    }
}

/// Sends `NOTIFY concord_events, '<schema>:<seq>'` after local commits, on a pooled
/// connection and outside the write transaction: a NOTIFY inside the write
/// transaction would take PostgreSQL's global notify-queue lock at every commit,
/// serializing them. Commits that land while a NOTIFY is in flight are folded
/// into the next one (the watch keeps only the newest seq), so a burst of writes
/// costs a few notifications, not one each. Ends when the store is dropped.
async fn notifier(pool: Pool, key: String, mut rx: watch::Receiver<i64>) {
    let mut last = tokio::time::Instant::now();
    while rx.changed().await.is_ok() {
        tokio::time::sleep_until(last + NOTIFY_SPACING).await;
        last = tokio::time::Instant::now();
        let seq = *rx.borrow_and_update();
        let payload = format!("{key}:{seq}");
        let sent = async {
            let client = pool.get().await.map_err(pool_err)?;
            let st = client
                .prepare_cached("SELECT pg_notify($1, $2)")
                .await
                .map_err(|e| pg_err(&e))?;
            client
                .execute(&st, &[&NOTIFY_CHANNEL, &payload])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = sent {
            // Only a hint: the other replicas' listeners also run a round
            // periodically and after reconnecting.
            tracing::debug!("could not send the event notification: {e}");
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn write_stats(&self) -> &crate::WriteStats {
        &self.inner.stats
    }

    async fn now_ms(&self) -> Result<i64> {
        read_op!(self, |c| ops::now_ms(&c))
    }

    async fn bootstrap_admin(&self, secret_hash: &str, only_if_none: bool) -> Result<bool> {
        let hash = secret_hash.to_string();
        write_op!(self, [hash], |t| ops::bootstrap_admin(
            t,
            &hash,
            only_if_none
        ))
    }

    async fn create_token(&self, token: NewToken) -> Result<TokenInfo> {
        write_op!(self, [token], |t| ops::create_token(t, &token))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        read_op!(self, |c| ops::list_tokens(&c))
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        write_op!(self, [id], |t| ops::revoke_token(t, &id))
    }

    async fn authenticate(&self, secret_hash: &str) -> Result<Option<Principal>> {
        read_op!(self, |c| ops::authenticate(&c, secret_hash))
    }

    async fn register_instance(&self, new: NewInstance) -> Result<Registration> {
        write_op!(self, [new], |t| ops::register_instance(t, &new))
    }

    async fn heartbeat(&self, instance: &str, owner: &str) -> Result<DurableHeartbeat> {
        // The common case: one statement for this and the durable heartbeats
        // that arrive with it, outside any explicit transaction.
        // The wait for room in the queue is bounded too: with the database gone,
        // batches wait out their own bound and the queue fills up.
        let fast = timed(async {
            let (reply, answer) = oneshot::channel();
            self.beats
                .send((instance.to_string(), owner.to_string(), reply))
                .await
                .map_err(|_| Error::unavailable("the store is shutting down"))?;
            answer
                .await
                .map_err(|_| Error::unavailable("the heartbeat batch was abandoned"))?
        })
        .await?;
        if let Some(hb) = fast {
            return Ok(hb);
        }
        let (id, owner) = (instance.to_string(), owner.to_string());
        write_op!(self, [id, owner], |t| ops::heartbeat(t, &id, &owner))?
    }

    async fn expire_owned(&self, instance: &str, owner: &str) -> Result<Option<Instance>> {
        let (id, owner) = (instance.to_string(), owner.to_string());
        write_op!(self, [id, owner], |t| ops::expire_owned(t, &id, &owner))
    }

    async fn expire_due(&self, limit: usize) -> Result<Vec<Instance>> {
        write_op!(self, [], |t| ops::expire_due(t, limit))
    }

    async fn close_instance(&self, instance: &str, actor: &Principal) -> Result<Instance> {
        let (id, actor) = (instance.to_string(), actor.clone());
        write_op!(self, [id, actor], |t| ops::close_instance(t, &id, &actor))
    }

    async fn update_instance(
        &self,
        instance: &str,
        patch: PatchInstanceRequest,
    ) -> Result<Instance> {
        let id = instance.to_string();
        write_op!(self, [id, patch], |t| ops::update_instance(t, &id, &patch))
    }

    async fn get_instance(&self, instance: &str) -> Result<Option<Instance>> {
        read_op!(self, |c| ops::get_instance(&c, instance))
    }

    async fn list_instances(&self, filter: InstanceFilter) -> Result<Vec<Instance>> {
        read_op!(self, |c| ops::list_instances(&c, &filter))
    }

    async fn record_ghost(&self, ghost: NewGhost) -> Result<()> {
        write_op!(self, [ghost], |t| ops::record_ghost(t, &ghost))
    }

    async fn list_ghosts(&self) -> Result<Vec<Ghost>> {
        read_op!(self, |c| ops::list_ghosts(&c))
    }

    async fn list_entities(&self) -> Result<Vec<EntitySummary>> {
        read_op!(self, |c| ops::list_entities(&c))
    }

    async fn get_entity(&self, entity: &str) -> Result<Option<EntityDetail>> {
        read_op!(self, |c| ops::get_entity(&c, entity))
    }

    async fn campaign(&self, entity: &str, instance: &str) -> Result<PrimaryGrant> {
        let (e, i) = (entity.to_string(), instance.to_string());
        write_op!(self, [e, i], |t| ops::campaign(t, &e, &i))
    }

    async fn resign(&self, entity: &str, instance: Option<&str>) -> Result<Resigned> {
        let (e, i) = (entity.to_string(), instance.map(str::to_string));
        write_op!(self, [e, i], |t| ops::resign(t, &e, i.as_deref()))
    }

    async fn transfer(&self, entity: &str, from: Option<&str>, to: &str) -> Result<PrimaryGrant> {
        let (e, f, to) = (entity.to_string(), from.map(str::to_string), to.to_string());
        write_op!(self, [e, f, to], |t| ops::transfer(
            t,
            &e,
            f.as_deref(),
            &to
        ))
    }

    async fn route(&self, entity: &str, version: Option<&str>) -> Result<Option<Instance>> {
        read_op!(self, |c| ops::route(&c, entity, version))
    }

    async fn entity_epoch(&self, entity: &str) -> Result<(u64, Option<String>)> {
        read_op!(self, |c| ops::entity_epoch(&c, entity))
    }

    async fn put_state(&self, write: StateWrite) -> Result<StateEntry> {
        write_op!(self, [write], |t| ops::put_state(t, &write))
    }

    async fn delete_state(&self, write: StateDelete) -> Result<bool> {
        write_op!(self, [write], |t| ops::delete_state(t, &write))
    }

    async fn get_state(&self, entity: &str, key: &str) -> Result<Option<StateEntry>> {
        read_op!(self, |c| ops::get_state(&c, entity, key))
    }

    async fn list_state(&self, entity: &str) -> Result<Vec<StateEntry>> {
        read_op!(self, |c| ops::list_state(&c, entity))
    }

    /// Events above `after` up to the horizon, never beyond it: a seq above the
    /// horizon may still have a lower one appear below it. A reader that has
    /// caught up asks for a fresh round first, so it finds everything committed
    /// before its call, on any replica.
    async fn read_events(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        let mut upto = self.inner.horizon.get();
        if after >= upto {
            upto = self.inner.horizon.fresh().await;
            if after >= upto {
                return Ok(Vec::new());
            }
        }
        read_op!(self, |c| ops::read_events(&c, after, upto, limit))
    }

    async fn last_event_seq(&self) -> Result<i64> {
        Ok(self.inner.horizon.fresh().await)
    }

    fn watch_events(&self) -> watch::Receiver<i64> {
        self.inner.horizon.seq.subscribe()
    }
}

/// Drops `schema` and everything in it: for benchmarks and tests that made a
/// schema of their own with [`PostgresStore::connect`].
pub async fn drop_schema(url: &str, schema: &str) -> Result<()> {
    check_schema(schema)?;
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::bad_field("database_url", format!("{e}")))?;
    let (client, connection) = cfg.connect(NoTls).await.map_err(|e| pg_err(&e))?;
    let driver = tokio::spawn(connection);
    let out = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .map_err(|e| pg_err(&e));
    drop(client);
    let _ = driver.await;
    out
}
