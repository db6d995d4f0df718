//! The embedded backend: one SQLite file in WAL mode, a group-commit writer thread
//! ([`writer`]) and a small pool of read connections.

mod breaker;
mod checkpoint;
mod counts;
mod dispatch;
mod events;
mod lease;
mod memory;
mod ops;
mod queue;
mod recent;
mod schema;
mod writer;

use crate::model::*;
use crate::Store;
use async_trait::async_trait;
use concord_core::api::{
    EntityDetail, EntitySummary, Event, Ghost, Instance, PatchInstanceRequest, PrimaryGrant,
    Resigned, StateEntry, TokenInfo,
};
use concord_core::authz::Principal;
use concord_core::{Error, Result};
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use writer::Writer;

/// How hard a commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync at every group commit: survives power loss.
    Full,
    /// fsync at checkpoints only: survives a crash of the process, not of the machine.
    Normal,
}

pub(crate) fn db_err(e: rusqlite::Error) -> Error {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::CannotOpen
            ) =>
        {
            Error::unavailable(format!("sqlite: {e}"))
        }
        _ => Error::internal(format!("sqlite: {e}")),
    }
}

/// Settings for every connection: enough cached statements for every query the
/// store runs (the default of 16 made hot statements re-parse), a 32 MiB page
/// cache and memory-mapped reads, so hot pages are not copied in by `pread`.
fn tune(conn: &Connection) -> Result<()> {
    conn.set_prepared_statement_cache_capacity(256);
    // The query planner stability guarantee: a cached statement keeps its plan.
    // Without it, SQLite re-plans a statement whenever a parameter it looked at
    // while planning (`LIMIT ?`, a range bound, a partial index's condition)
    // is bound to a new value, which made the claim query re-parse on every
    // call: 7% of the writer thread under the queue benchmark.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(db_err)?;
    conn.execute_batch("PRAGMA cache_size = -32000; PRAGMA mmap_size = 268435456;")
        .map_err(db_err)
}

/// Read connections, reused. Why a std Mutex: it is held only to push or pop a
/// connection, never across an await or a query.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

const READERS: usize = 4;

/// The write connection's page cache, in KiB (see `SqliteStore::open_with`).
const WRITER_CACHE_KIB: i64 = 8000;

impl ReadPool {
    fn open(path: &Path) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        tune(&conn)?;
        Ok(conn)
    }

    async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::unavailable("store is shutting down"))?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match pool.idle.lock().ok().and_then(|mut v| v.pop()) {
                Some(c) => c,
                None => ReadPool::open(&pool.path)?,
            };
            let out = f(&conn);
            if let Ok(mut idle) = pool.idle.lock() {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| Error::internal(format!("read task failed: {e}")))?
    }
}

/// The SQLite store. Cheap to clone handles are not needed: the hub holds it in an `Arc`.
pub struct SqliteStore {
    writer: Writer,
    stats: Arc<crate::WriteStats>,
    recent: Arc<recent::RecentEvents>,
    memory_moved: tokio::sync::watch::Receiver<i64>,
    events: tokio::sync::watch::Receiver<i64>,
    readers: Arc<ReadPool>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations.
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteStore> {
        Self::open_with(path, durability, checkpoint::PACING)
    }

    /// `open` with other checkpoint pacing (tests make it brisk).
    pub(crate) fn open_with(
        path: &Path,
        durability: Durability,
        pacing: checkpoint::Pacing,
    ) -> Result<SqliteStore> {
        let mut conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        // temp_store = FILE, not MEMORY, on the write connection: every job runs
        // under a savepoint, whose statement journal (the pages it changes that
        // the batch had already changed) is then held in one 64 KiB buffer before
        // it would spill to a file. With MEMORY it is kept in 1 KiB chunks, a
        // malloc and free each: 9% of the writer under the queue benchmark.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; PRAGMA temp_store = FILE;"
        ))
        .map_err(db_err)?;
        tune(&conn)?;
        // The writer's page cache is smaller than the readers': every COMMIT
        // that followed a B-tree rebalance walks all of it. Rebalancing renumbers
        // a page through SQLite's reserved lock-byte page number (262,145), and
        // while a database is under 1 GiB that sends the end-of-transaction
        // truncate to its "scan the whole cache" branch: at 7,800 cached pages,
        // about 0.2 ms per batch commit, 5% of the writer under the batch queue
        // benchmark. 2,000 pages still hold the hot trees' inner pages and right
        // edges; a page it misses is read from the mapped file or the log.
        conn.execute_batch(&format!("PRAGMA cache_size = -{WRITER_CACHE_KIB};"))
            .map_err(db_err)?;
        schema::migrate(&mut conn)?;
        let last = ops::last_event_seq(&conn)?;
        let (events_tx, events) = tokio::sync::watch::channel(last);
        let recent = Arc::new(recent::RecentEvents::default());
        let checkpoint = match checkpoint::start(path, pacing) {
            Ok(nudge) => {
                conn.execute_batch(&format!(
                    "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {};",
                    checkpoint::LOG_SIZE_LIMIT
                ))
                .map_err(db_err)?;
                checkpoint::watch_log(&conn);
                Some(nudge)
            }
            Err(e) => {
                tracing::warn!("no checkpointer thread ({e}); SQLite checkpoints in COMMIT");
                None
            }
        };
        let (memory_tx, memory_moved) = tokio::sync::watch::channel(0);
        let stats = Arc::new(crate::WriteStats::default());
        let writer = Writer::start(
            conn,
            writer::Watches {
                last_seq: events_tx,
                memory: memory_tx,
                recent: recent.clone(),
                checkpoint,
                stats: stats.clone(),
            },
        )?;
        Ok(SqliteStore {
            writer,
            stats,
            recent,
            memory_moved,
            events,
            readers: Arc::new(ReadPool {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(READERS),
            }),
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn write_stats(&self) -> &crate::WriteStats {
        &self.stats
    }

    async fn now_ms(&self) -> Result<i64> {
        Ok(concord_core::Timestamp::now().millis())
    }

    async fn bootstrap_admin(&self, secret_hash: &str, only_if_none: bool) -> Result<bool> {
        let hash = secret_hash.to_string();
        self.writer
            .write(move |c, now| ops::bootstrap_admin(c, now, &hash, only_if_none))
            .await
    }

    async fn create_token(&self, token: NewToken) -> Result<TokenInfo> {
        self.writer
            .write(move |c, now| ops::create_token(c, now, &token))
            .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.readers.read(ops::list_tokens).await
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.writer
            .write(move |c, now| ops::revoke_token(c, now, &id))
            .await
    }

    async fn authenticate(&self, secret_hash: &str) -> Result<Option<Principal>> {
        let hash = secret_hash.to_string();
        self.readers
            .read(move |c| ops::authenticate(c, &hash))
            .await
    }

    async fn register_instance(&self, new: NewInstance) -> Result<Registration> {
        self.writer
            .write(move |c, now| ops::register_instance(c, now, &new))
            .await
    }

    async fn heartbeat(&self, instance: &str, owner: &str) -> Result<DurableHeartbeat> {
        let (id, owner) = (instance.to_string(), owner.to_string());
        self.writer
            .write(move |c, now| ops::heartbeat(c, now, &id, &owner))
            .await?
    }

    async fn expire_owned(&self, instance: &str, owner: &str) -> Result<Option<Instance>> {
        let (id, owner) = (instance.to_string(), owner.to_string());
        self.writer
            .write(move |c, now| ops::expire_owned(c, now, &id, &owner))
            .await
    }

    async fn expire_due(&self, limit: usize) -> Result<Vec<Instance>> {
        self.writer
            .write(move |c, now| ops::expire_due(c, now, limit))
            .await
    }

    async fn close_instance(&self, instance: &str, actor: &Principal) -> Result<Instance> {
        let (id, actor) = (instance.to_string(), actor.clone());
        self.writer
            .write(move |c, now| ops::close_instance(c, now, &id, &actor))
            .await
    }

    async fn update_instance(
        &self,
        instance: &str,
        patch: PatchInstanceRequest,
    ) -> Result<Instance> {
        let id = instance.to_string();
        self.writer
            .write(move |c, now| ops::update_instance(c, now, &id, &patch))
            .await
    }

    async fn get_instance(&self, instance: &str) -> Result<Option<Instance>> {
        let id = instance.to_string();
        self.readers.read(move |c| ops::get_instance(c, &id)).await
    }

    async fn list_instances(&self, filter: InstanceFilter) -> Result<Vec<Instance>> {
        self.readers
            .read(move |c| ops::list_instances(c, &filter))
            .await
    }

    async fn record_ghost(&self, ghost: NewGhost) -> Result<()> {
        self.writer
            .write(move |c, now| ops::record_ghost(c, now, &ghost))
            .await
    }

    async fn list_ghosts(&self) -> Result<Vec<Ghost>> {
        let now = concord_core::Timestamp::now().millis();
        self.readers.read(move |c| ops::list_ghosts(c, now)).await
    }

    async fn list_entities(&self) -> Result<Vec<EntitySummary>> {
        self.readers.read(ops::list_entities).await
    }

    async fn get_entity(&self, entity: &str) -> Result<Option<EntityDetail>> {
        let e = entity.to_string();
        self.readers.read(move |c| ops::get_entity(c, &e)).await
    }

    async fn campaign(&self, entity: &str, instance: &str) -> Result<PrimaryGrant> {
        let (e, i) = (entity.to_string(), instance.to_string());
        self.writer
            .write(move |c, now| ops::campaign(c, now, &e, &i))
            .await
    }

    async fn resign(&self, entity: &str, instance: Option<&str>) -> Result<Resigned> {
        let (e, i) = (entity.to_string(), instance.map(str::to_string));
        self.writer
            .write(move |c, now| ops::resign(c, now, &e, i.as_deref()))
            .await
    }

    async fn transfer(&self, entity: &str, from: Option<&str>, to: &str) -> Result<PrimaryGrant> {
        let (e, f, t) = (entity.to_string(), from.map(str::to_string), to.to_string());
        self.writer
            .write(move |c, now| ops::transfer(c, now, &e, f.as_deref(), &t))
            .await
    }

    async fn route(&self, entity: &str, version: Option<&str>) -> Result<Option<Instance>> {
        let (e, v) = (entity.to_string(), version.map(str::to_string));
        let now = concord_core::Timestamp::now().millis();
        self.readers
            .read(move |c| ops::route(c, now, &e, v.as_deref()))
            .await
    }

    async fn entity_epoch(&self, entity: &str) -> Result<(u64, Option<String>)> {
        let e = entity.to_string();
        self.readers.read(move |c| ops::entity_epoch(c, &e)).await
    }

    async fn put_state(&self, write: StateWrite) -> Result<StateEntry> {
        self.writer
            .write(move |c, now| ops::put_state(c, now, &write))
            .await
    }

    async fn delete_state(&self, write: StateDelete) -> Result<bool> {
        self.writer
            .write(move |c, now| ops::delete_state(c, now, &write))
            .await
    }

    async fn get_state(&self, entity: &str, key: &str) -> Result<Option<StateEntry>> {
        let (e, k) = (entity.to_string(), key.to_string());
        self.readers.read(move |c| ops::get_state(c, &e, &k)).await
    }

    async fn list_state(&self, entity: &str) -> Result<Vec<StateEntry>> {
        let e = entity.to_string();
        self.readers.read(move |c| ops::list_state(c, &e)).await
    }

    async fn read_events(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        if let Some(events) = self.recent.read(after, limit) {
            return Ok(events);
        }
        self.readers
            .read(move |c| ops::read_events(c, after, limit))
            .await
    }

    async fn last_event_seq(&self) -> Result<i64> {
        self.readers.read(ops::last_event_seq).await
    }

    fn watch_events(&self) -> tokio::sync::watch::Receiver<i64> {
        self.events.clone()
    }

    fn watch_memory(&self) -> tokio::sync::watch::Receiver<i64> {
        self.memory_moved.clone()
    }
}
