//! The PostgreSQL operations, one for one with `sqlite/ops.rs` (same checks in the
//! same order, same errors, same events). Where SQLite relies on its single writer
//! for atomicity, these lock rows first, in the order given in the module docs of
//! [`super`]; each write function's doc says which locks it takes.

use super::{is_retryable, pg_err, pool_err, timed};
use crate::model::{topics, *};
use concord_core::api::{
    EntityDetail, EntitySummary, Event, EventSource, Ghost, Instance, InstanceState,
    PatchInstanceRequest, PrimaryGrant, Resigned, Role, StateEntry, TokenInfo,
};
use concord_core::authz::Principal;
use concord_core::fencing::{check_fence, FenceView};
use concord_core::token::TokenKind;
use concord_core::{ids, presence, Error, ErrorCode, Timestamp};
use deadpool_postgres::GenericClient;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use tokio_postgres::types::{FromSql, Json, ToSql};
use tokio_postgres::Row;

/// Ghost records re-announce on `sys.ghost` at most this often (as SQLite).
const GHOST_REANNOUNCE_MS: i64 = 60_000;
/// Ghost records are listed for this long after they were last seen (as SQLite).
const GHOST_LISTED_MS: i64 = 86_400_000;

/// The database clock in ms since the epoch, truncated like `Timestamp::now()`.
/// `clock_timestamp()`, not `now()`: `now()` is frozen at the start of the
/// transaction, and a transaction may have waited for a lock since.
macro_rules! now_expr {
    () => {
        "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
    };
}

macro_rules! instance_cols {
    () => {
        "id, entity, role, label, state, persistent, capabilities, endpoint, host, version, forked_from, fork_point, meta, ttl_ms, registered_at, last_seen_at, lease_until"
    };
}
/// Number of columns of `instance_cols!()`.
const INSTANCE_NCOLS: usize = 17;

// ---------- failures and retries ----------

/// How an operation failed: with a domain answer or a database error that ends
/// the request ([`Fail::Done`]), or because PostgreSQL rolled the transaction back
/// after it raced another one ([`Fail::Retry`]), in which case the runner starts
/// it again from scratch. Keeping the distinction in the type, rather than in an
/// error code, means no domain error can ever be retried by mistake.
#[derive(Debug)]
pub(crate) enum Fail {
    Retry(String),
    Done(Error),
}

pub(crate) type R<T> = std::result::Result<T, Fail>;

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Done(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_retryable(&e) {
            Fail::Retry(e.to_string())
        } else {
            Fail::Done(pg_err(&e))
        }
    }
}

impl From<deadpool_postgres::PoolError> for Fail {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Fail::Done(pool_err(e))
    }
}

impl From<Fail> for Error {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Done(e) => e,
            Fail::Retry(m) => Error::unavailable(format!("database busy, gave up retrying: {m}")),
        }
    }
}

pub(crate) type TxFuture<'a, T> = Pin<Box<dyn Future<Output = R<T>> + Send + 'a>>;

// ---------- the transaction ----------

/// One write transaction: the database's clock read at its start, and the events
/// it appends.
///
/// Events are buffered and written at the end, in the statement sent together
/// with COMMIT, with seqs from the `event_seq` sequence. Taken that late, a seq
/// that is still invisible (its transaction not yet committed) stays invisible
/// for about one round trip, which keeps the delivery horizon (`horizon.rs`)
/// close behind the commits; and no lock is taken, so appending transactions
/// commit in parallel, each riding PostgreSQL's group commit.
///
/// BEGIN and COMMIT are sent by hand, each pipelined with the statement next to
/// it (BEGIN with the clock read, COMMIT with the events), which saves two of
/// the five to seven round trips of a typical write. The price is that nothing
/// rolls back a `Tx` that is dropped open: its runner must end it with
/// [`Tx::commit`] or [`Tx::rollback`], and discard the connection if it cannot
/// (`Inner::write_here`).
pub(crate) struct Tx<'c> {
    pub(crate) c: &'c deadpool_postgres::Client,
    pub(crate) now: i64,
    pending: Vec<(std::borrow::Cow<'static, str>, String, String)>,
    /// Seqs assigned to the events flushed so far, in append order.
    seqs: Vec<i64>,
}

/// Inserts the pending events with their seqs and answers the seqs in append
/// order. The horizon's argument needs every transaction that holds a seq to have
/// had its xid before it took the seq; a transaction whose only write is this
/// INSERT would get its xid in the middle of it, after `nextval`. So `x` forces
/// it first: every row of `u` is a join with `x`'s one row, so
/// `pg_current_xact_id()` has run before the first `nextval` is evaluated. `u` is
/// materialized once (it is read twice and calls a volatile function); the
/// function scan yields its rows in array order, so seqs rise with `ord`.
const FLUSH_SQL: &str = "WITH x AS MATERIALIZED (SELECT pg_current_xact_id() AS xid), \
     u AS MATERIALIZED (\
       SELECT nextval('event_seq') AS seq, t.ord, t.topic, t.source, t.data \
       FROM x CROSS JOIN unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(topic, source, data, ord)), \
     ins AS (\
       INSERT INTO events (seq, topic, time, source, data) \
       SELECT seq, topic, $4, source::json, data::json FROM u) \
     SELECT seq FROM u ORDER BY ord";

impl<'c> Tx<'c> {
    /// Sends BEGIN and reads the database clock in one round trip.
    pub(crate) async fn begin(client: &'c deadpool_postgres::Client) -> R<Tx<'c>> {
        let clock = client
            .prepare_cached(concat!("SELECT ", now_expr!()))
            .await?;
        // `join` polls in order and each call sends its request when first
        // polled: BEGIN reaches the server first.
        let (began, now) =
            futures::future::join(client.batch_execute("BEGIN"), client.query_one(&clock, &[]))
                .await;
        began?;
        let now = get(&now?, 0)?;
        Ok(Tx {
            c: client,
            now,
            pending: Vec::new(),
            seqs: Vec::new(),
        })
    }

    /// Queues an event; returns its index for [`Tx::seq_of`].
    fn event(&mut self, topic: &'static str, source: &EventSource, data: Value) -> usize {
        let idx = self.seqs.len() + self.pending.len();
        self.pending
            .push((topic.into(), to_json(source), to_json(&data)));
        idx
    }

    /// Queues an event whose topic is not a hub constant (published by a client).
    fn event_owned(&mut self, topic: String, source: &EventSource, data: Value) -> usize {
        let idx = self.seqs.len() + self.pending.len();
        self.pending
            .push((topic.into(), to_json(source), to_json(&data)));
        idx
    }

    /// Writes the queued events now, mid-transaction: for an operation that must
    /// answer an event's seq ([`Tx::seq_of`]).
    async fn flush(&mut self) -> R<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let st = self.c.prepare_cached(FLUSH_SQL).await?;
        let (topics, sources, datas) = self.columns();
        let inserted = self
            .c
            .query(&st, &[&topics, &sources, &datas, &self.now])
            .await;
        self.took(inserted?)
    }

    /// The pending events as the three text arrays of [`FLUSH_SQL`].
    fn columns(&self) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
        (
            self.pending.iter().map(|e| e.0.as_ref()).collect(),
            self.pending.iter().map(|e| e.1.as_str()).collect(),
            self.pending.iter().map(|e| e.2.as_str()).collect(),
        )
    }

    /// Records the seqs [`FLUSH_SQL`] answered for the pending events.
    fn took(&mut self, rows: Vec<Row>) -> R<()> {
        let seqs = rows
            .iter()
            .map(|r| get::<i64>(r, 0))
            .collect::<R<Vec<i64>>>()?;
        if seqs.len() != self.pending.len() || seqs.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Fail::Done(Error::internal(format!(
                "postgres: {} events took seqs {seqs:?}, not one rising seq each",
                self.pending.len()
            ))));
        }
        self.pending.clear();
        self.seqs.extend(seqs);
        Ok(())
    }

    /// The seq of a flushed event.
    fn seq_of(&self, idx: usize) -> R<i64> {
        self.seqs.get(idx).copied().ok_or_else(|| {
            Fail::Done(Error::internal(
                "event seq read before the events were flushed",
            ))
        })
    }

    /// Writes the pending events and commits, in one round trip; returns the last
    /// seq appended, if any. Should the INSERT fail, PostgreSQL ends the
    /// transaction at the COMMIT behind it with a rollback, and the INSERT's
    /// error is the answer.
    pub(crate) async fn commit(mut self) -> R<Option<i64>> {
        if self.pending.is_empty() {
            self.c.batch_execute("COMMIT").await?;
        } else {
            // Prepared first, so that the INSERT's Bind/Execute, not a Parse
            // that must be answered before it is sent, goes out ahead of COMMIT.
            let st = self.c.prepare_cached(FLUSH_SQL).await?;
            let (inserted, committed) = {
                let (topics, sources, datas) = self.columns();
                futures::future::join(
                    self.c.query(&st, &[&topics, &sources, &datas, &self.now]),
                    self.c.batch_execute("COMMIT"),
                )
                .await
            };
            let rows = inserted?;
            committed?;
            self.took(rows)?;
        }
        Ok(self.seqs.last().copied())
    }

    /// Ends the transaction without writing anything.
    pub(crate) async fn rollback(self) -> R<()> {
        self.c.batch_execute("ROLLBACK").await?;
        Ok(())
    }
}

// ---------- helpers ----------

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

async fn rows<C: GenericClient>(c: &C, sql: &str, params: Params<'_>) -> R<Vec<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, params).await?)
}

async fn row_opt<C: GenericClient>(c: &C, sql: &str, params: Params<'_>) -> R<Option<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, params).await?)
}

async fn row_one<C: GenericClient>(c: &C, sql: &str, params: Params<'_>) -> R<Row> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_one(&st, params).await?)
}

async fn exec<C: GenericClient>(c: &C, sql: &str, params: Params<'_>) -> R<u64> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, params).await?)
}

fn get<'a, T: FromSql<'a>>(r: &'a Row, idx: usize) -> R<T> {
    r.try_get(idx).map_err(|e| {
        Fail::Done(Error::internal(format!(
            "postgres: reading column {idx}: {e}"
        )))
    })
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_value<T: serde::de::DeserializeOwned + Default>(v: Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}

fn hub_source() -> EventSource {
    EventSource::default()
}

fn source_of(p: &Principal) -> EventSource {
    EventSource {
        instance: p.instance.clone(),
        entity: p.entity.clone(),
        token: Some(p.token_id.clone()),
    }
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(crate) async fn now_ms<C: GenericClient>(c: &C) -> R<i64> {
    get(&row_one(c, concat!("SELECT ", now_expr!()), &[]).await?, 0)
}

/// Reads `instance_cols!()` starting at column `o`.
fn instance_at(r: &Row, o: usize) -> R<Instance> {
    let role: String = get(r, o + 2)?;
    let state: String = get(r, o + 4)?;
    let meta: Option<Value> = get(r, o + 12)?;
    Ok(Instance {
        id: get(r, o)?,
        entity: get(r, o + 1)?,
        role: Role::parse(&role).unwrap_or_default(),
        label: get(r, o + 3)?,
        state: InstanceState::parse(&state).unwrap_or(InstanceState::Closed),
        persistent: get(r, o + 5)?,
        capabilities: from_value(get::<Option<Value>>(r, o + 6)?.unwrap_or(Value::Null)),
        endpoint: get(r, o + 7)?,
        host: get(r, o + 8)?,
        version: get(r, o + 9)?,
        forked_from: get(r, o + 10)?,
        fork_point: get(r, o + 11)?,
        meta: meta.unwrap_or_else(|| json!({})),
        ttl_ms: get(r, o + 13)?,
        registered_at: Timestamp(get(r, o + 14)?),
        last_seen_at: Timestamp(get(r, o + 15)?),
        lease_until: Timestamp(get(r, o + 16)?),
    })
}

fn instance_from_row(r: &Row) -> R<Instance> {
    instance_at(r, 0)
}

pub(crate) async fn get_instance<C: GenericClient>(c: &C, id: &str) -> R<Option<Instance>> {
    row_opt(
        c,
        concat!("SELECT ", instance_cols!(), " FROM instances WHERE id = $1"),
        &[&id],
    )
    .await?
    .map(|r| instance_from_row(&r))
    .transpose()
}

/// The instance with its row locked (the caller holds its entity's lock already).
async fn lock_instance(t: &Tx<'_>, id: &str) -> R<Option<Instance>> {
    row_opt(
        t.c,
        concat!(
            "SELECT ",
            instance_cols!(),
            " FROM instances WHERE id = $1 FOR UPDATE"
        ),
        &[&id],
    )
    .await?
    .map(|r| instance_from_row(&r))
    .transpose()
}

/// The instance with its row locked `FOR KEY SHARE`: it cannot end (expiry and
/// close lock it `FOR UPDATE`) before this transaction commits, yet heartbeats
/// (plain updates of non-key columns) and other claims by it go on in parallel.
async fn share_instance(t: &Tx<'_>, id: &str) -> R<Option<Instance>> {
    row_opt(
        t.c,
        concat!(
            "SELECT ",
            instance_cols!(),
            " FROM instances WHERE id = $1 FOR KEY SHARE"
        ),
        &[&id],
    )
    .await?
    .map(|r| instance_from_row(&r))
    .transpose()
}

async fn require_instance<C: GenericClient>(c: &C, id: &str) -> R<Instance> {
    get_instance(c, id)
        .await?
        .ok_or_else(|| Fail::Done(Error::not_found(format!("no instance {id}"))))
}

/// The entity an instance belongs to (it never changes, so no lock is needed to
/// learn which entity row to lock).
async fn entity_of(t: &Tx<'_>, id: &str) -> R<Option<String>> {
    row_opt(t.c, "SELECT entity FROM instances WHERE id = $1", &[&id])
        .await?
        .map(|r| get(&r, 0))
        .transpose()
}

fn epoch_row(r: &Row) -> R<(u64, Option<String>)> {
    Ok((get::<i64>(r, 0)? as u64, get(r, 1)?))
}

/// (epoch, primary) of an entity; None if it does not exist yet.
async fn entity_row<C: GenericClient>(c: &C, entity: &str) -> R<Option<(u64, Option<String>)>> {
    row_opt(
        c,
        "SELECT epoch, primary_instance FROM entities WHERE name = $1",
        &[&entity],
    )
    .await?
    .map(|r| epoch_row(&r))
    .transpose()
}

/// Locks the entity row: every decision about the entity's primary, epoch and
/// state is taken under this lock, so replicas take them one at a time.
async fn lock_entity(t: &Tx<'_>, entity: &str) -> R<Option<(u64, Option<String>)>> {
    row_opt(
        t.c,
        "SELECT epoch, primary_instance FROM entities WHERE name = $1 FOR UPDATE",
        &[&entity],
    )
    .await?
    .map(|r| epoch_row(&r))
    .transpose()
}

async fn ensure_entity(t: &Tx<'_>, entity: &str) -> R<()> {
    exec(
        t.c,
        "INSERT INTO entities (name, epoch, primary_instance, created_at) VALUES ($1, 0, NULL, $2) ON CONFLICT (name) DO NOTHING",
        &[&entity, &t.now],
    )
    .await?;
    Ok(())
}

/// Ends an instance (expired or closed): releases its primary role and says so.
/// Caller holds the entity's lock.
async fn end_instance(
    t: &mut Tx<'_>,
    inst: &Instance,
    state: InstanceState,
    reason: &str,
) -> R<Instance> {
    exec(
        t.c,
        "UPDATE instances SET state = $2, ended_at = $3 WHERE id = $1 AND state = 'live'",
        &[&inst.id, &state.as_str(), &t.now],
    )
    .await?;
    if let Some((epoch, Some(primary))) = entity_row(t.c, &inst.entity).await? {
        if primary == inst.id {
            exec(
                t.c,
                "UPDATE entities SET primary_instance = NULL WHERE name = $1",
                &[&inst.entity],
            )
            .await?;
            t.event(
                topics::PRIMARY_RELEASED,
                &hub_source(),
                json!({"entity": inst.entity, "instance": inst.id, "epoch": epoch, "reason": reason}),
            );
        }
    }
    queue::release_claims(t, &inst.id).await?;
    lease::release_holder(t, &inst.id, reason).await?;
    let topic = match state {
        InstanceState::Closed => topics::INSTANCE_CLOSED,
        _ => topics::INSTANCE_EXPIRED,
    };
    t.event(
        topic,
        &hub_source(),
        json!({"instance": inst.id, "entity": inst.entity, "role": inst.role, "label": inst.label, "reason": reason}),
    );
    let mut ended = inst.clone();
    ended.state = state;
    Ok(ended)
}

fn is_live(inst: &Instance, now: i64) -> bool {
    inst.state == InstanceState::Live && inst.lease_until.millis() >= now
}

/// The live primary of an entity, expiring a holder whose durable lease lapsed.
/// Caller holds the entity's lock. The holder's row is read locked: heartbeats
/// extend leases without the entity lock, so an unlocked read could judge a lease
/// lapsed from a version that a heartbeat committing at that moment replaces.
async fn live_primary(t: &mut Tx<'_>, entity: &str) -> R<(u64, Option<Instance>)> {
    let Some((epoch, primary)) = entity_row(t.c, entity).await? else {
        return Ok((0, None));
    };
    let Some(pid) = primary else {
        return Ok((epoch, None));
    };
    match lock_instance(t, &pid).await? {
        Some(p) if is_live(&p, t.now) => Ok((epoch, Some(p))),
        Some(p) => {
            if p.state == InstanceState::Live {
                end_instance(t, &p, InstanceState::Expired, "lease lapsed").await?;
            } else {
                exec(
                    t.c,
                    "UPDATE entities SET primary_instance = NULL WHERE name = $1",
                    &[&entity],
                )
                .await?;
            }
            Ok((epoch, None))
        }
        None => Ok((epoch, None)),
    }
}

/// Grants the primary role. Caller holds the entity's lock.
async fn grant_primary(
    t: &mut Tx<'_>,
    entity: &str,
    inst: &Instance,
    topic: &'static str,
    from: Option<&str>,
) -> R<PrimaryGrant> {
    let (epoch, _) = entity_row(t.c, entity).await?.unwrap_or((0, None));
    let epoch = epoch + 1;
    exec(
        t.c,
        "UPDATE entities SET epoch = $2, primary_instance = $3 WHERE name = $1",
        &[&entity, &(epoch as i64), &inst.id],
    )
    .await?;
    exec(
        t.c,
        "UPDATE instances SET role = 'primary' WHERE id = $1",
        &[&inst.id],
    )
    .await?;
    t.event(
        topic,
        &hub_source(),
        json!({"entity": entity, "instance": inst.id, "epoch": epoch, "from": from, "label": inst.label}),
    );
    Ok(PrimaryGrant {
        instance: inst.id.clone(),
        epoch,
        fence: epoch,
    })
}

fn primary_held(entity: &str, epoch: u64, holder: &Instance) -> Error {
    Error::new(ErrorCode::PrimaryHeld, format!("entity {entity} already has a live primary: {}", holder.id))
        .with_details(json!({"holder": holder.id, "label": holder.label, "epoch": epoch, "lease_until": holder.lease_until}))
}

// ---------- tokens ----------

fn token_from_row(r: &Row) -> R<TokenInfo> {
    let kind: String = get(r, 1)?;
    Ok(TokenInfo {
        id: get(r, 0)?,
        kind: TokenKind::parse(&kind).unwrap_or(TokenKind::Reader),
        entity: get(r, 2)?,
        name: get(r, 3)?,
        instance: get(r, 4)?,
        created_at: Timestamp(get(r, 5)?),
    })
}

/// Takes a table lock on `tokens` (self-conflicting, so two replicas starting at
/// once cannot both see "no admin yet"); bootstrap runs once per start, so the
/// brief stall of concurrent token inserts costs nothing.
pub(crate) async fn bootstrap_admin(t: &mut Tx<'_>, hash: &str, only_if_none: bool) -> R<bool> {
    t.c.batch_execute("LOCK TABLE tokens IN SHARE ROW EXCLUSIVE MODE")
        .await?;
    let exists: bool = get(
        &row_one(
            t.c,
            "SELECT EXISTS(SELECT 1 FROM tokens WHERE secret_hash = $1 AND revoked_at IS NULL)",
            &[&hash],
        )
        .await?,
        0,
    )?;
    if exists {
        return Ok(false);
    }
    if only_if_none {
        let any: bool = get(
            &row_one(
                t.c,
                "SELECT EXISTS(SELECT 1 FROM tokens WHERE kind = 'admin' AND revoked_at IS NULL)",
                &[],
            )
            .await?,
            0,
        )?;
        if any {
            return Ok(false);
        }
    }
    insert_token(
        t,
        &NewToken {
            id: ids::new_id(ids::TOKEN),
            kind: TokenKind::Admin,
            entity: None,
            name: Some("bootstrap".into()),
            instance: None,
            secret_hash: hash.into(),
        },
    )
    .await?;
    Ok(true)
}

async fn insert_token(t: &Tx<'_>, n: &NewToken) -> R<()> {
    exec(
        t.c,
        "INSERT INTO tokens (id, kind, entity, name, instance, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&n.id, &n.kind.as_str(), &n.entity, &n.name, &n.instance, &n.secret_hash, &t.now],
    )
    .await?;
    Ok(())
}

pub(crate) async fn create_token(t: &mut Tx<'_>, n: &NewToken) -> R<TokenInfo> {
    insert_token(t, n).await?;
    t.event(
        topics::TOKEN_CREATED,
        &hub_source(),
        json!({"id": n.id, "kind": n.kind, "entity": n.entity, "name": n.name}),
    );
    Ok(TokenInfo {
        id: n.id.clone(),
        kind: n.kind,
        entity: n.entity.clone(),
        name: n.name.clone(),
        instance: n.instance.clone(),
        created_at: Timestamp(t.now),
    })
}

pub(crate) async fn list_tokens<C: GenericClient>(c: &C) -> R<Vec<TokenInfo>> {
    rows(
        c,
        "SELECT id, kind, entity, name, instance, created_at FROM tokens \
         WHERE revoked_at IS NULL AND kind <> 'session' ORDER BY id",
        &[],
    )
    .await?
    .iter()
    .map(token_from_row)
    .collect()
}

pub(crate) async fn revoke_token(t: &mut Tx<'_>, id: &str) -> R<bool> {
    let n = exec(
        t.c,
        "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        &[&id, &t.now],
    )
    .await?;
    if n > 0 {
        t.event(topics::TOKEN_REVOKED, &hub_source(), json!({"id": id}));
    }
    Ok(n > 0)
}

pub(crate) async fn authenticate<C: GenericClient>(c: &C, hash: &str) -> R<Option<Principal>> {
    let Some(r) = row_opt(
        c,
        "SELECT t.id, t.kind, COALESCE(t.entity, i.entity), t.instance FROM tokens t \
         LEFT JOIN instances i ON i.id = t.instance WHERE t.secret_hash = $1 AND t.revoked_at IS NULL",
        &[&hash],
    )
    .await?
    else {
        return Ok(None);
    };
    let kind: String = get(&r, 1)?;
    Ok(Some(Principal {
        token_id: get(&r, 0)?,
        kind: TokenKind::parse(&kind).unwrap_or(TokenKind::Reader),
        entity: get(&r, 2)?,
        instance: get(&r, 3)?,
    }))
}

// ---------- instances ----------

/// Locks the entity row when registering as primary (the check for a live holder
/// and the grant must not interleave with another replica's); a secondary or fork
/// changes nothing the entity lock protects.
pub(crate) async fn register_instance(t: &mut Tx<'_>, n: &NewInstance) -> R<Registration> {
    let req = &n.request;
    ensure_entity(t, &req.entity).await?;
    if let Some(limit) = n.max_live_per_entity {
        // The entity lock serializes registrations of one entity, so the count holds.
        lock_entity(t, &req.entity).await?;
        let live: i64 = get(
            &row_one(
                t.c,
                "SELECT count(*) FROM instances WHERE entity = $1 AND state = 'live'",
                &[&req.entity],
            )
            .await?,
            0,
        )?;
        if live >= i64::from(limit) {
            return Err(too_many_instances(&req.entity, limit).into());
        }
    }
    if req.role == Role::Primary {
        lock_entity(t, &req.entity).await?;
        let (epoch, holder) = live_primary(t, &req.entity).await?;
        if let Some(h) = holder {
            return Err(primary_held(&req.entity, epoch, &h).into());
        }
    }
    if let Some(parent) = &req.forked_from {
        let Some(p) = get_instance(t.c, parent).await? else {
            return Err(Error::bad_field("forked_from", format!("no instance {parent}")).into());
        };
        if p.entity != req.entity {
            return Err(
                Error::bad_field("forked_from", "must be an instance of the same entity").into(),
            );
        }
    }
    let now = t.now;
    let lease_until = presence::write_ahead(now, n.ttl_ms);
    // As in SQLite: the memory-log position at registration. Read without the
    // counter's lock: positions commit in order, so every memory at or below it
    // is committed and every later one is after the fork.
    let fork_point: Option<i64> = if req.role == Role::Fork {
        Some(memory::last_memory_seq(t.c).await?)
    } else {
        None
    };
    let stored_role = if req.role == Role::Primary {
        Role::Secondary
    } else {
        req.role
    };
    exec(
        t.c,
        concat!(
            "INSERT INTO instances (",
            instance_cols!(),
            ", lease_owner) VALUES ($1, $2, $3, $4, 'live', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15, $16)"
        ),
        &[
            &n.id,
            &req.entity,
            &stored_role.as_str(),
            &req.label,
            &req.persistent,
            &Json(&req.capabilities),
            &req.endpoint,
            &req.host,
            &req.version,
            &req.forked_from,
            &fork_point,
            &req.meta,
            &n.ttl_ms,
            &now,
            &lease_until,
            &n.owner,
        ],
    )
    .await?;
    insert_token(
        t,
        &NewToken {
            id: n.session_token_id.clone(),
            kind: TokenKind::Session,
            entity: Some(req.entity.clone()),
            name: req.label.clone(),
            instance: Some(n.id.clone()),
            secret_hash: n.session_secret_hash.clone(),
        },
    )
    .await?;
    let mut inst = require_instance(t.c, &n.id).await?;
    t.event(
        topics::INSTANCE_REGISTERED,
        &EventSource { instance: Some(n.id.clone()), entity: Some(req.entity.clone()), token: Some(n.registered_by.clone()) },
        json!({"instance": n.id, "entity": req.entity, "role": req.role, "label": req.label, "host": req.host, "version": req.version, "capabilities": req.capabilities}),
    );
    if inst.is_unlabeled() && inst.role != Role::Primary && req.role != Role::Primary {
        record_ghost(
            t,
            &NewGhost {
                instance: Some(n.id.clone()),
                entity: Some(req.entity.clone()),
                reason: "unlabeled".into(),
                host: req.host.clone(),
            },
        )
        .await?;
    }
    let mut fence = None;
    if req.role == Role::Primary {
        let g = grant_primary(t, &req.entity, &inst, topics::PRIMARY_GRANTED, None).await?;
        inst.role = Role::Primary;
        fence = Some(g.fence);
    }
    let (epoch, _) = entity_row(t.c, &req.entity).await?.unwrap_or((0, None));
    Ok(Registration {
        instance: inst,
        epoch,
        fence,
    })
}

/// The common heartbeat, for every durable heartbeat that arrived together:
/// one statement, no explicit transaction, no entity lock (all of an entity's
/// instances heartbeat; they must not queue on its row), so they share one
/// round trip and one commit (the group commit the SQLite writer gets from its
/// single thread). Extends the lease of each live instance whose lease has not
/// lapsed, by the same rule as `presence::write_ahead` (now + 1.5 × TTL, with
/// the database's now), and reads its entity's epoch in the same statement. The
/// rows are locked in id order, so two batches never deadlock on each other.
/// Returns the heartbeats written, by instance id; an id missing from the
/// answer is not live and unlapsed, and takes the locked path ([`heartbeat`]),
/// which records the ghost.
pub(crate) async fn heartbeat_batch<C: GenericClient>(
    c: &C,
    ids: &[String],
    owners: &[String],
) -> R<std::collections::HashMap<String, DurableHeartbeat>> {
    let rs = rows(
        c,
        concat!(
            "WITH clock AS (SELECT ",
            now_expr!(),
            " AS now), input AS (SELECT DISTINCT ON (x.iid) x.iid, x.owner FROM unnest($1::text[], $2::text[]) AS x(iid, owner) ORDER BY x.iid), \
             locked AS (SELECT i.id AS lid FROM instances i JOIN input ON input.iid = i.id ORDER BY i.id FOR NO KEY UPDATE OF i), \
             u AS (UPDATE instances i SET last_seen_at = clock.now, lease_until = clock.now + (i.ttl_ms * 3) / 2, lease_owner = input.owner \
             FROM clock, input, locked WHERE i.id = input.iid AND locked.lid = i.id AND i.state = 'live' AND i.lease_until >= clock.now RETURNING ",
            instance_cols!(),
            ") SELECT u.*, e.epoch, e.primary_instance FROM u LEFT JOIN entities e ON e.name = u.entity"
        ),
        &[&ids, &owners],
    )
    .await?;
    let mut out = std::collections::HashMap::with_capacity(rs.len());
    for r in rs {
        let inst = instance_at(&r, 0)?;
        let epoch = get::<Option<i64>>(&r, INSTANCE_NCOLS)?.unwrap_or(0) as u64;
        let primary: Option<String> = get(&r, INSTANCE_NCOLS + 1)?;
        let fence = (primary.as_deref() == Some(inst.id.as_str())).then_some(epoch);
        out.insert(
            inst.id.clone(),
            DurableHeartbeat {
                instance: inst,
                epoch,
                fence,
            },
        );
    }
    Ok(out)
}

/// The heartbeat of an instance that is not (or no longer) live: locks its entity
/// then its row, expires it if its lease lapsed, records the ghost. The outer
/// result is the transaction's, the inner the caller's answer: the ghost is
/// committed even though the caller gets `unknown_instance`.
pub(crate) async fn heartbeat(
    t: &mut Tx<'_>,
    id: &str,
    owner: &str,
) -> R<concord_core::Result<DurableHeartbeat>> {
    let inst = match entity_of(t, id).await? {
        Some(entity) => {
            lock_entity(t, &entity).await?;
            lock_instance(t, id).await?
        }
        None => None,
    };
    let now = t.now;
    let reason = match &inst {
        None => Some("unknown_instance"),
        Some(i) if i.state == InstanceState::Closed => Some("closed"),
        Some(i) if i.state == InstanceState::Expired => Some("expired"),
        Some(i) if i.lease_until.millis() < now => {
            end_instance(t, i, InstanceState::Expired, "lease lapsed").await?;
            Some("expired")
        }
        Some(_) => None,
    };
    if let Some(reason) = reason {
        record_ghost(
            t,
            &NewGhost {
                instance: Some(id.to_string()),
                entity: inst.as_ref().map(|i| i.entity.clone()),
                reason: reason.into(),
                host: inst.as_ref().and_then(|i| i.host.clone()),
            },
        )
        .await?;
        return Ok(Err(Error::unknown_instance(id)));
    }
    let Some(mut inst) = inst else {
        return Ok(Err(Error::unknown_instance(id)));
    };
    // Live after all (a heartbeat that raced the fast path's check).
    let lease_until = presence::write_ahead(now, inst.ttl_ms);
    exec(
        t.c,
        "UPDATE instances SET last_seen_at = $2, lease_until = $3, lease_owner = $4 WHERE id = $1",
        &[&id, &now, &lease_until, &owner],
    )
    .await?;
    inst.last_seen_at = Timestamp(now);
    inst.lease_until = Timestamp(lease_until);
    let (epoch, primary) = entity_row(t.c, &inst.entity).await?.unwrap_or((0, None));
    let fence = (primary.as_deref() == Some(id)).then_some(epoch);
    Ok(Ok(DurableHeartbeat {
        instance: inst,
        epoch,
        fence,
    }))
}

/// Locks the entity, then the instance; expires it only if it is still live and
/// `owner` still owns its lease (another replica may have taken it meanwhile).
pub(crate) async fn expire_owned(t: &mut Tx<'_>, id: &str, owner: &str) -> R<Option<Instance>> {
    let Some(entity) = entity_of(t, id).await? else {
        return Ok(None);
    };
    lock_entity(t, &entity).await?;
    let Some(r) = row_opt(
        t.c,
        concat!(
            "SELECT ",
            instance_cols!(),
            ", lease_owner FROM instances WHERE id = $1 AND state = 'live' FOR UPDATE"
        ),
        &[&id],
    )
    .await?
    else {
        return Ok(None);
    };
    let lease_owner: Option<String> = get(&r, INSTANCE_NCOLS)?;
    if lease_owner.as_deref() != Some(owner) {
        return Ok(None);
    }
    let inst = instance_from_row(&r)?;
    end_instance(t, &inst, InstanceState::Expired, "no heartbeat within ttl")
        .await
        .map(Some)
}

/// Safe on every replica at once. Locks, in name order, the entities of the due
/// instances (the lock order of every other operation: entity, then instance),
/// then the due instance rows themselves with `FOR UPDATE SKIP LOCKED`, re-checking
/// that each is still live and due: an instance another replica is expiring (or
/// just heartbeating) is skipped, one already expired no longer matches, so each
/// is expired, and announced, exactly once.
pub(crate) async fn expire_due(t: &mut Tx<'_>, limit: usize) -> R<Vec<Instance>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let now = t.now;
    let lim = limit_param(limit);
    let entities: Vec<String> = rows(
        t.c,
        "SELECT DISTINCT entity FROM (SELECT entity FROM instances WHERE state = 'live' AND lease_until < $1 \
         ORDER BY lease_until LIMIT $2) due",
        &[&now, &lim],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<R<_>>()?;
    if entities.is_empty() {
        return Ok(Vec::new());
    }
    rows(
        t.c,
        "SELECT name FROM entities WHERE name = ANY($1) ORDER BY name FOR UPDATE",
        &[&entities],
    )
    .await?;
    let due: Vec<Instance> = rows(
        t.c,
        concat!(
            "SELECT ",
            instance_cols!(),
            " FROM instances WHERE state = 'live' AND lease_until < $1 AND entity = ANY($2) \
             ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED"
        ),
        &[&now, &entities, &lim],
    )
    .await?
    .iter()
    .map(instance_from_row)
    .collect::<R<_>>()?;
    let mut ended = Vec::with_capacity(due.len());
    for i in &due {
        ended.push(end_instance(t, i, InstanceState::Expired, "lease lapsed").await?);
    }
    Ok(ended)
}

/// Locks the entity, then the instance.
pub(crate) async fn close_instance(t: &mut Tx<'_>, id: &str, actor: &Principal) -> R<Instance> {
    let found = require_instance(t.c, id).await?;
    lock_entity(t, &found.entity).await?;
    let inst = lock_instance(t, id).await?.unwrap_or(found);
    if inst.state != InstanceState::Live {
        return Ok(inst);
    }
    let reason = if actor.instance.as_deref() == Some(id) {
        "closed by itself"
    } else {
        "closed by operator"
    };
    end_instance(t, &inst, InstanceState::Closed, reason).await
}

/// Locks the instance row only: a label or endpoint is not something the entity
/// lock protects.
pub(crate) async fn update_instance(
    t: &mut Tx<'_>,
    id: &str,
    p: &PatchInstanceRequest,
) -> R<Instance> {
    let inst = lock_instance(t, id)
        .await?
        .ok_or_else(|| Fail::Done(Error::not_found(format!("no instance {id}"))))?;
    if inst.state != InstanceState::Live {
        return Err(Error::unknown_instance(id).into());
    }
    let label = p.label.clone().or(inst.label.clone());
    let caps = p.capabilities.clone().unwrap_or(inst.capabilities.clone());
    let endpoint = p.endpoint.clone().or(inst.endpoint.clone());
    let meta = p.meta.clone().unwrap_or(inst.meta.clone());
    exec(
        t.c,
        "UPDATE instances SET label = $2, capabilities = $3, endpoint = $4, meta = $5 WHERE id = $1",
        &[&id, &label, &Json(&caps), &endpoint, &meta],
    )
    .await?;
    if p.label.is_some() {
        exec(
            t.c,
            "DELETE FROM ghosts WHERE instance = $1 AND reason = 'unlabeled'",
            &[&id],
        )
        .await?;
    }
    t.event(
        topics::INSTANCE_UPDATED,
        &hub_source(),
        json!({"instance": id, "entity": inst.entity, "label": label, "capabilities": caps, "endpoint": endpoint}),
    );
    require_instance(t.c, id).await
}

pub(crate) async fn list_instances<C: GenericClient>(
    c: &C,
    f: &InstanceFilter,
) -> R<Vec<Instance>> {
    rows(
        c,
        concat!(
            "SELECT ",
            instance_cols!(),
            " FROM instances WHERE ($1::text IS NULL OR entity = $1) AND ($2::text IS NULL OR role = $2) \
             AND ($3::text IS NULL OR state = $3) ORDER BY entity, registered_at, id"
        ),
        &[&f.entity, &f.role.map(Role::as_str), &f.state.map(InstanceState::as_str)],
    )
    .await?
    .iter()
    .map(instance_from_row)
    .collect()
}

/// Locks the ghost's row, so that of two replicas recording the same ghost at
/// once only one announces it.
pub(crate) async fn record_ghost(t: &mut Tx<'_>, g: &NewGhost) -> R<()> {
    let key = format!(
        "{}:{}",
        g.reason,
        g.instance.as_deref().or(g.entity.as_deref()).unwrap_or("?")
    );
    let prev: Option<i64> = row_opt(
        t.c,
        "SELECT seen_at FROM ghosts WHERE key = $1 FOR UPDATE",
        &[&key],
    )
    .await?
    .map(|r| get(&r, 0))
    .transpose()?;
    exec(
        t.c,
        "INSERT INTO ghosts (key, instance, entity, reason, host, first_seen, seen_at, count) VALUES ($1, $2, $3, $4, $5, $6, $6, 1) \
         ON CONFLICT (key) DO UPDATE SET seen_at = excluded.seen_at, count = ghosts.count + 1, host = COALESCE(excluded.host, ghosts.host)",
        &[&key, &g.instance, &g.entity, &g.reason, &g.host, &t.now],
    )
    .await?;
    if prev.is_none_or(|p| t.now - p > GHOST_REANNOUNCE_MS) {
        t.event(
            topics::GHOST,
            &hub_source(),
            json!({"instance": g.instance, "entity": g.entity, "reason": g.reason, "host": g.host}),
        );
    }
    Ok(())
}

pub(crate) async fn list_ghosts<C: GenericClient>(c: &C) -> R<Vec<Ghost>> {
    rows(
        c,
        concat!(
            "WITH clock AS (SELECT ",
            now_expr!(),
            " AS now) \
             SELECT g.instance, g.entity, g.reason, g.seen_at, g.host FROM ghosts g, clock \
             WHERE g.reason <> 'unlabeled' AND g.seen_at > clock.now - $1 \
             UNION ALL \
             SELECT i.id, i.entity, 'unlabeled', i.last_seen_at, i.host FROM instances i \
             WHERE i.state = 'live' AND i.role <> 'primary' AND (i.label IS NULL OR trim(i.label) = '') \
             ORDER BY 4 DESC"
        ),
        &[&GHOST_LISTED_MS],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Ghost {
            instance: get(r, 0)?,
            entity: get(r, 1)?,
            reason: get(r, 2)?,
            seen_at: Timestamp(get(r, 3)?),
            host: get(r, 4)?,
        })
    })
    .collect()
}

// ---------- entities and primaries ----------

pub(crate) async fn list_entities<C: GenericClient>(c: &C) -> R<Vec<EntitySummary>> {
    rows(
        c,
        "SELECT e.name, e.epoch, e.primary_instance, \
         (SELECT count(*) FROM instances i WHERE i.entity = e.name AND i.state = 'live') \
         FROM entities e ORDER BY e.name",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(EntitySummary {
            name: get(r, 0)?,
            epoch: get::<i64>(r, 1)? as u64,
            primary: get(r, 2)?,
            live_instances: get::<i64>(r, 3)? as u64,
        })
    })
    .collect()
}

pub(crate) async fn get_entity<C: GenericClient>(c: &C, entity: &str) -> R<Option<EntityDetail>> {
    let Some((epoch, primary)) = entity_row(c, entity).await? else {
        return Ok(None);
    };
    let instances = list_instances(
        c,
        &InstanceFilter {
            entity: Some(entity.into()),
            role: None,
            state: Some(InstanceState::Live),
        },
    )
    .await?;
    let primary = primary.and_then(|p| instances.iter().find(|i| i.id == p).cloned());
    Ok(Some(EntityDetail {
        name: entity.into(),
        epoch,
        primary,
        instances,
    }))
}

pub(crate) async fn entity_epoch<C: GenericClient>(
    c: &C,
    entity: &str,
) -> R<(u64, Option<String>)> {
    Ok(entity_row(c, entity).await?.unwrap_or((0, None)))
}

async fn live_member(t: &Tx<'_>, entity: &str, id: &str, field: &str) -> R<Instance> {
    let inst = get_instance(t.c, id)
        .await?
        .ok_or_else(|| Fail::Done(Error::unknown_instance(id)))?;
    if inst.entity != entity {
        return Err(Error::bad_field(
            field,
            format!(
                "instance {id} belongs to entity {}, not {entity}",
                inst.entity
            ),
        )
        .into());
    }
    if !is_live(&inst, t.now) {
        return Err(Error::unknown_instance(id).into());
    }
    Ok(inst)
}

/// Locks the entity: of many campaigners only the first to get the lock finds
/// the role free.
pub(crate) async fn campaign(t: &mut Tx<'_>, entity: &str, id: &str) -> R<PrimaryGrant> {
    lock_entity(t, entity).await?;
    let inst = live_member(t, entity, id, "instance").await?;
    let (epoch, holder) = live_primary(t, entity).await?;
    match holder {
        Some(h) if h.id == id => Ok(PrimaryGrant {
            instance: h.id,
            epoch,
            fence: epoch,
        }),
        Some(h) => Err(primary_held(entity, epoch, &h).into()),
        None => grant_primary(t, entity, &inst, topics::PRIMARY_GRANTED, None).await,
    }
}

/// Locks the entity.
pub(crate) async fn resign(t: &mut Tx<'_>, entity: &str, id: Option<&str>) -> R<Resigned> {
    lock_entity(t, entity).await?;
    let (epoch, holder) = live_primary(t, entity).await?;
    let Some(h) = holder else {
        return Err(Error::conflict(format!("entity {entity} has no live primary")).into());
    };
    if let Some(id) = id {
        if h.id != id {
            return Err(Error::fenced(
                epoch,
                format!("instance {id} is not the primary of {entity}"),
            )
            .into());
        }
    }
    exec(
        t.c,
        "UPDATE entities SET primary_instance = NULL WHERE name = $1",
        &[&entity],
    )
    .await?;
    exec(
        t.c,
        "UPDATE instances SET role = 'secondary' WHERE id = $1",
        &[&h.id],
    )
    .await?;
    t.event(
        topics::PRIMARY_RELEASED,
        &hub_source(),
        json!({"entity": entity, "instance": h.id, "epoch": epoch, "reason": "resigned"}),
    );
    Ok(Resigned {
        instance: h.id,
        epoch,
    })
}

/// Locks the entity.
pub(crate) async fn transfer(
    t: &mut Tx<'_>,
    entity: &str,
    from: Option<&str>,
    to: &str,
) -> R<PrimaryGrant> {
    lock_entity(t, entity).await?;
    let target = live_member(t, entity, to, "to").await?;
    let (epoch, holder) = live_primary(t, entity).await?;
    if let Some(from) = from {
        if holder.as_ref().map(|h| h.id.as_str()) != Some(from) {
            return Err(Error::fenced(
                epoch,
                format!("instance {from} is not the primary of {entity}"),
            )
            .into());
        }
    }
    if holder.as_ref().is_some_and(|h| h.id == to) {
        return Ok(PrimaryGrant {
            instance: to.into(),
            epoch,
            fence: epoch,
        });
    }
    if let Some(h) = &holder {
        exec(
            t.c,
            "UPDATE instances SET role = 'secondary' WHERE id = $1",
            &[&h.id],
        )
        .await?;
    }
    grant_primary(
        t,
        entity,
        &target,
        topics::PRIMARY_TRANSFERRED,
        holder.as_ref().map(|h| h.id.as_str()),
    )
    .await
}

pub(crate) async fn route<C: GenericClient>(
    c: &C,
    entity: &str,
    version: Option<&str>,
) -> R<Option<Instance>> {
    let now = now_ms(c).await?;
    let (_, primary) = entity_row(c, entity).await?.unwrap_or((0, None));
    let live = list_instances(
        c,
        &InstanceFilter {
            entity: Some(entity.into()),
            role: None,
            state: Some(InstanceState::Live),
        },
    )
    .await?;
    let live: Vec<Instance> = live
        .into_iter()
        .filter(|i| i.lease_until.millis() >= now)
        .collect();
    let is_primary = |i: &Instance| primary.as_deref() == Some(i.id.as_str());
    let candidates: Vec<&Instance> = match version {
        None => live.iter().filter(|i| is_primary(i)).collect(),
        Some(v) => live
            .iter()
            .filter(|i| i.version.as_deref() == Some(v))
            .collect(),
    };
    Ok(candidates
        .iter()
        .find(|i| is_primary(i))
        .or(candidates.first())
        .map(|i| (*i).clone()))
}

// ---------- entity state ----------

fn state_from_row(r: &Row) -> R<StateEntry> {
    Ok(StateEntry {
        key: get(r, 0)?,
        value: get::<Option<Value>>(r, 1)?.unwrap_or(Value::Null),
        revision: get(r, 2)?,
        updated_by: get(r, 3)?,
        updated_at: Timestamp(get(r, 4)?),
    })
}

pub(crate) async fn get_state<C: GenericClient>(
    c: &C,
    entity: &str,
    key: &str,
) -> R<Option<StateEntry>> {
    row_opt(
        c,
        "SELECT key, value, revision, updated_by, updated_at FROM entity_state WHERE entity = $1 AND key = $2",
        &[&entity, &key],
    )
    .await?
    .map(|r| state_from_row(&r))
    .transpose()
}

pub(crate) async fn list_state<C: GenericClient>(c: &C, entity: &str) -> R<Vec<StateEntry>> {
    rows(
        c,
        "SELECT key, value, revision, updated_by, updated_at FROM entity_state WHERE entity = $1 ORDER BY key",
        &[&entity],
    )
    .await?
    .iter()
    .map(state_from_row)
    .collect()
}

/// The fencing and compare-and-set checks shared by put and delete, under the
/// entity's lock: a transfer either committed before (and this write sees the new
/// epoch) or waits until this write committed.
async fn check_state_write(
    t: &mut Tx<'_>,
    entity: &str,
    key: &str,
    fence: Option<u64>,
    if_revision: Option<i64>,
    actor: &Principal,
) -> R<Option<StateEntry>> {
    if actor.is_admin() {
        ensure_entity(t, entity).await?;
        lock_entity(t, entity).await?;
    } else {
        lock_entity(t, entity).await?;
        let writer = actor.instance.as_deref().unwrap_or("");
        let (epoch, primary) = live_primary(t, entity).await?;
        check_fence(
            FenceView {
                epoch,
                primary: primary.as_ref().map(|p| p.id.as_str()),
            },
            writer,
            fence,
        )?;
    }
    let current = get_state(t.c, entity, key).await?;
    if let Some(want) = if_revision {
        let have = current.as_ref().map(|s| s.revision).unwrap_or(0);
        if have != want {
            return Err(
                Error::conflict(format!("{key} is at revision {have}, not {want}"))
                    .with_details(json!({"key": key, "revision": have}))
                    .into(),
            );
        }
    }
    Ok(current)
}

/// Locks the entity. The revision is the seq of the write's `sys.state.changed`
/// event, so the events are flushed before the row is written.
pub(crate) async fn put_state(t: &mut Tx<'_>, w: &StateWrite) -> R<StateEntry> {
    check_state_write(t, &w.entity, &w.key, w.fence, w.if_revision, &w.actor).await?;
    let by = w.actor.actor();
    let idx = t.event(
        topics::STATE_CHANGED,
        &source_of(&w.actor),
        json!({"entity": w.entity, "key": w.key, "updated_by": by, "fence": w.fence, "deleted": false}),
    );
    t.flush().await?;
    let revision = t.seq_of(idx)?;
    exec(
        t.c,
        "INSERT INTO entity_state (entity, key, value, revision, updated_by, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (entity, key) DO UPDATE SET value = excluded.value, revision = excluded.revision, \
         updated_by = excluded.updated_by, updated_at = excluded.updated_at",
        &[&w.entity, &w.key, &w.value, &revision, &by, &t.now],
    )
    .await?;
    Ok(StateEntry {
        key: w.key.clone(),
        value: w.value.clone(),
        revision,
        updated_by: by,
        updated_at: Timestamp(t.now),
    })
}

/// Locks the entity.
pub(crate) async fn delete_state(t: &mut Tx<'_>, w: &StateDelete) -> R<bool> {
    let current = check_state_write(t, &w.entity, &w.key, w.fence, w.if_revision, &w.actor).await?;
    if current.is_none() {
        return Ok(false);
    }
    exec(
        t.c,
        "DELETE FROM entity_state WHERE entity = $1 AND key = $2",
        &[&w.entity, &w.key],
    )
    .await?;
    t.event(
        topics::STATE_CHANGED,
        &source_of(&w.actor),
        json!({"entity": w.entity, "key": w.key, "updated_by": w.actor.actor(), "fence": w.fence, "deleted": true}),
    );
    Ok(true)
}

// ---------- events ----------

pub(crate) async fn read_events<C: GenericClient>(
    c: &C,
    after: i64,
    upto: i64,
    limit: usize,
) -> R<Vec<Event>> {
    rows(
        c,
        "SELECT seq, topic, time, source, data FROM events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        &[&after, &upto, &limit_param(limit)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Event {
            seq: get(r, 0)?,
            topic: get(r, 1)?,
            time: Timestamp(get(r, 2)?),
            source: from_value(get::<Option<Value>>(r, 3)?.unwrap_or(Value::Null)),
            data: get::<Option<Value>>(r, 4)?.unwrap_or(Value::Null),
        })
    })
    .collect()
}

mod breaker;
mod dispatch;
mod events;
pub(crate) use events::event_floor;
mod lease;
mod memory;
mod queue;
