//! The Concord hub: an axum application over a [`Store`](concord_store::Store).
//!
//! Request path: `Caller` (bearer token → principal, cached; rate limit) →
//! handler (parse strictly, `authz::authorize`, one store call) → JSON. Background
//! tasks: the reaper (expires instances, `reaper.rs`) and the log tail (keeps this
//! replica's caches in step with changes made on other replicas, `tail.rs`).
//! The dashboard (`ui/`) serves pages at `/ui` that call the same `/v1` routes.

mod auth;
mod bus;
mod dispatch;
mod error;
mod extract;
mod limits;
mod mcp;
mod metrics;
mod openapi;
mod presence;
mod reaper;
pub mod recall;
pub mod routes;
mod tail;
mod ui;

pub use error::{ApiError, ApiResult};
pub use mcp::{
    DEFAULT_ALLOWED_HOSTS as MCP_DEFAULT_ALLOWED_HOSTS,
    DEFAULT_ALLOWED_ORIGINS as MCP_DEFAULT_ALLOWED_ORIGINS,
};
pub use routes::table::{RouteRule, Subject, ROUTES};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Router;
use concord_core::Error;
use concord_store::DynStore;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Settings of one hub process.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Identifies this replica as a lease owner. Unique per process start.
    pub hub_id: String,
    /// Per-token requests per second (0 = unlimited) and burst.
    pub rate_limit_per_s: u32,
    pub rate_limit_burst: u32,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// How often the reaper looks for overdue instances.
    pub reap_interval: Duration,
    /// Event retention: by age and by count (DESIGN §6).
    pub events_max_age_ms: i64,
    pub events_max_count: i64,
    /// How often retention pruning runs.
    pub retention_interval: Duration,
    /// How long finished tasks are kept.
    pub tasks_retention_ms: i64,
    /// How long an ended instance's inbox is kept.
    pub inbox_retention_ms: i64,
    /// Open SSE streams and long-polls allowed per token.
    pub max_streams_per_token: usize,
    pub max_long_polls_per_token: usize,
    /// Circuit-breaker policies per subject pattern (`--breaker`), DESIGN §8.
    pub breakers: concord_core::breaker::Policies,
    /// Observations per second one instance may report (0 = unlimited): one
    /// writer must not be able to flood a window or flip a breaker alone.
    pub observe_rate_per_s: u32,
    /// `Host` values `/mcp` answers (DNS-rebinding guard); `*` admits any.
    pub mcp_allowed_hosts: Vec<String>,
    /// Browser `Origin`s `/mcp` answers (requests without one always pass); `*` admits any.
    pub mcp_allowed_origins: Vec<String>,
    /// Live instances one entity may have (None: unlimited).
    pub max_instances_per_entity: Option<u32>,
    /// Shared memory: the recall index's place, the embedder, the write limit.
    pub memory: MemoryConfig,
}

/// Settings of shared memory (DESIGN §5).
#[derive(Debug, Clone, Default)]
pub struct MemoryConfig {
    /// Where the recall index persists (`<data dir>/recall`); `None`: in memory,
    /// rebuilt from the memory log at every start.
    pub index_dir: Option<std::path::PathBuf>,
    /// An OpenAI-compatible embeddings endpoint and model.
    pub embedder: Option<(String, String)>,
    /// Memory writes per second per writer (0 = unlimited), 429 above.
    pub write_rate_per_s: u32,
}

/// Shared memory's parts of the hub: the recall index, the embedder, and the
/// per-writer write limit (a token bucket keyed by the writer, apart from the
/// per-token request limit, so one chatty writer cannot flood everyone's recall).
pub struct MemoryService {
    pub index: Arc<recall::RecallIndex>,
    pub embedder: Option<Arc<recall::embedder::Embedder>>,
    limiter: limits::Limits,
}

impl MemoryService {
    /// Takes `n` writes from the writer's budget.
    pub(crate) fn check_rate(&self, writer: &str, n: usize) -> concord_core::Result<()> {
        for _ in 0..n.max(1) {
            self.limiter.check(writer)?;
        }
        Ok(())
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            hub_id: concord_core::ids::new_id("hub"),
            rate_limit_per_s: 5_000,
            rate_limit_burst: 10_000,
            max_body_bytes: 1024 * 1024,
            reap_interval: Duration::from_millis(200),
            events_max_age_ms: 7 * 86_400_000,
            events_max_count: 1_000_000,
            retention_interval: Duration::from_secs(10),
            inbox_retention_ms: 86_400_000,
            tasks_retention_ms: 7 * 86_400_000,
            max_streams_per_token: 256,
            max_long_polls_per_token: 1024,
            max_instances_per_entity: Some(10_000),
            memory: MemoryConfig::default(),
            mcp_allowed_hosts: mcp::DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            mcp_allowed_origins: mcp::DEFAULT_ALLOWED_ORIGINS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            breakers: concord_core::breaker::Policies::default(),
            observe_rate_per_s: 100,
        }
    }
}

/// Everything handlers share. One per hub process, behind an `Arc`.
pub struct AppState {
    pub store: DynStore,
    pub config: HubConfig,
    pub(crate) auth: auth::AuthCache,
    pub(crate) limits: limits::Limits,
    pub(crate) presence: presence::Presence,
    pub(crate) metrics: metrics::Metrics,
    /// Bumped whenever some primary role is released, to wake campaigners that wait.
    pub(crate) primary_released: watch::Sender<u64>,
    pub(crate) started: Instant,
    /// Every committed event, in seq order, from the log tail (see `bus.rs`).
    pub(crate) bus: tokio::sync::broadcast::Sender<Arc<bus::BusEvent>>,
    pub(crate) subscribers: bus::SubscriberCount,
    pub memory: MemoryService,
    /// A client of this hub's own HTTP API (its listen address), set once the
    /// listener is bound: `/mcp` tools call through it with the caller's token.
    pub(crate) self_client: OnceLock<concord_client::Client>,
    /// Logged-in dashboard browsers (`/ui`), see `ui::session`.
    pub(crate) ui_sessions: ui::session::Sessions,
}

impl AppState {
    pub(crate) fn now_ms(&self) -> i64 {
        concord_core::Timestamp::now().millis()
    }
}

/// A running hub: its shared state and background tasks.
pub struct Hub {
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Builds the state and starts the background tasks.
    pub async fn start(store: DynStore, config: HubConfig) -> concord_core::Result<Hub> {
        let (primary_released, _) = watch::channel(0);
        let index = Arc::new(recall::RecallIndex::open(
            store.clone(),
            config.memory.index_dir.as_deref(),
        )?);
        let memory = MemoryService {
            index: index.clone(),
            embedder: config
                .memory
                .embedder
                .as_ref()
                .map(|(url, model)| Arc::new(recall::embedder::Embedder::new(url, model))),
            limiter: limits::Limits::new(
                config.memory.write_rate_per_s,
                config.memory.write_rate_per_s,
                0,
                0,
            ),
        };
        let state = Arc::new(AppState {
            memory,
            limits: limits::Limits::new(
                config.rate_limit_per_s,
                config.rate_limit_burst,
                config.max_streams_per_token,
                config.max_long_polls_per_token,
            )
            .with_observe_rate(config.observe_rate_per_s),
            store,
            config,
            auth: auth::AuthCache::default(),
            presence: presence::Presence::default(),
            metrics: metrics::Metrics::default(),
            primary_released,
            started: Instant::now(),
            bus: tokio::sync::broadcast::channel(bus::BUS_CAPACITY).0,
            subscribers: bus::SubscriberCount::default(),
            self_client: OnceLock::new(),
            ui_sessions: ui::session::Sessions::default(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let cursor = state.store.last_event_seq().await?;
        let mut tasks = vec![
            tokio::spawn(reaper::run(state.clone(), stop_rx.clone())),
            tokio::spawn(tail::run(state.clone(), cursor, stop_rx.clone())),
            tokio::spawn(index.run(stop_rx.clone())),
        ];
        if let Some(e) = &state.memory.embedder {
            tasks.push(tokio::spawn(recall::embedder::fill(
                state.clone(),
                e.clone(),
                stop_rx,
            )));
        }
        Ok(Hub { state, stop, tasks })
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then drains requests and stops the tasks.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.bound(listener.local_addr()?)?;
        let app = self.router();
        // Without TCP_NODELAY (which `axum::serve` leaves off) a small write that
        // follows an unacknowledged one waits for the peer's delayed ACK: an SSE
        // stream's next events, or a long-poll's answer, sat up to 40 ms in the
        // kernel. Measured as a p95 of 21 ms on event delivery against 2 ms at p50.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
            }
        });
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        self.stop().await;
        result
    }

    /// Tells the hub where it listens, so it can call its own API (`/mcp` does).
    /// A wildcard address is reached through loopback.
    pub fn bound(&self, addr: SocketAddr) -> std::io::Result<()> {
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let url = format!("http://{}", SocketAddr::new(ip, addr.port()));
        let client = concord_client::Client::new(vec![url], None)
            .map_err(|e| std::io::Error::other(e.message))?;
        let _ = self.state.self_client.set(client);
        Ok(())
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .metrics
        .record(&method, &route, resp.status().as_u16());
    resp
}

fn panic_response(
    state: Arc<AppState>,
) -> impl Fn(Box<dyn std::any::Any + Send>) -> Response + Clone {
    move |_| {
        state
            .metrics
            .panics
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!("a handler panicked; answered 500");
        ApiError(Error::internal(
            "internal error (the hub caught a panic; see its log)",
        ))
        .into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    routes::routes()
        .merge(mcp::routes(state.clone()))
        .merge(ui::routes())
        .fallback(|| async { ApiError(Error::not_found("no such route")) })
        .method_not_allowed_fallback(|| async {
            ApiError(Error::new(
                concord_core::ErrorCode::MethodNotAllowed,
                "method not allowed on this route (the Allow header lists those that are)",
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response(state.clone()),
        ))
        .with_state(state)
}
