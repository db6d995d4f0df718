//! `concord serve`: owns the data directory (lock file, admin token, address file),
//! opens the store and runs the hub until SIGINT or SIGTERM.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use concord_core::token::{generate_secret, hash_secret};
use concord_server::{Hub, HubConfig};
use concord_store::sqlite::{Durability, SqliteStore};
use concord_store::DynStore;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub enum DurabilityArg {
    /// fsync at every group commit (survives power loss).
    Full,
    /// survives a crash of the process, not of the machine.
    Normal,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7717", env = "CONCORD_LISTEN")]
    pub listen: SocketAddr,
    /// Data directory (SQLite file, admin token, lock). With --database it holds only
    /// this replica's files (admin token, address, lock): give each replica its own.
    /// Default: $CONCORD_DATA_DIR or ~/.local/share/concord.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "full")]
    pub durability: DurabilityArg,
    /// PostgreSQL URL (several hub replicas on one database). Without it: embedded SQLite.
    #[arg(long, env = "CONCORD_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// PostgreSQL schema for the hub's tables (created if missing), so that several
    /// clusters or test runs can share one database. Default: the connection's
    /// search_path (normally `public`).
    #[arg(long, env = "CONCORD_DATABASE_SCHEMA", requires = "database")]
    pub database_schema: Option<String>,
    /// PostgreSQL connections this replica keeps (one more listens for the others'
    /// notifications). Size it so that replicas × pool stays under the server's
    /// max_connections.
    #[arg(long, env = "CONCORD_DATABASE_POOL", requires = "database",
          default_value_t = concord_store::postgres::DEFAULT_POOL_SIZE as u16,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub database_pool: u16,
    /// Per-token request rate limit per second (0 = off).
    #[arg(long, default_value_t = 5000)]
    pub rate_limit: u32,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body: usize,
    /// Event retention by age, in seconds.
    #[arg(long, default_value_t = 7 * 86_400)]
    pub events_max_age: i64,
    /// Event retention by count: the newest N events are kept.
    #[arg(long, default_value_t = 1_000_000)]
    pub events_max_count: i64,
    /// Live instances one entity may have (0 = unlimited).
    #[arg(long, default_value_t = 10_000)]
    pub max_instances_per_entity: u32,
    /// Open SSE streams per token.
    #[arg(long, default_value_t = 256)]
    pub max_streams_per_token: usize,
    /// Open long-polls per token.
    #[arg(long, default_value_t = 1024)]
    pub max_long_polls_per_token: usize,
    /// How often retention runs, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub retention_interval_ms: u64,
    /// An OpenAI-compatible embeddings server (e.g. Ollama's `http://127.0.0.1:11434`)
    /// that computes the vectors of memories and queries sent without one.
    #[arg(long, env = "CONCORD_EMBEDDER", requires = "embedder_model")]
    pub embedder: Option<String>,
    /// The embedder's model name (e.g. `nomic-embed-text`).
    #[arg(long, env = "CONCORD_EMBEDDER_MODEL")]
    pub embedder_model: Option<String>,
    /// Memory writes per second per writer (0 = off), 429 with Retry-After above.
    #[arg(long, default_value_t = 0)]
    pub memory_rate_limit: u32,
    /// Extra `Host` names (or `host:port`) that `/mcp` answers besides loopback and
    /// the listen address, comma-separated; `*` admits any (no DNS-rebinding guard).
    #[arg(long, value_delimiter = ',', env = "CONCORD_MCP_ALLOWED_HOSTS")]
    pub mcp_allowed_hosts: Vec<String>,
    /// Extra browser origins (`https://app.example:443`, `http://host:*`) that `/mcp`
    /// answers besides loopback ones, comma-separated; `*` admits any.
    #[arg(long, value_delimiter = ',', env = "CONCORD_MCP_ALLOWED_ORIGINS")]
    pub mcp_allowed_origins: Vec<String>,
    /// Circuit-breaker policy for subjects matching a pattern (repeatable; first match wins):
    /// 'provider:*=window_ms=60000,min_samples=5,error_rate=0.5,open_ms=30000,min_instances=2,probe_ms=10000'.
    #[arg(long = "breaker", value_parser = parse_breaker)]
    pub breakers: Vec<(String, concord_core::breaker::Policy)>,
    /// Observations per second one instance may report (0 = unlimited).
    #[arg(long, default_value_t = 100)]
    pub observe_rate: u32,
}

fn parse_breaker(s: &str) -> Result<(String, concord_core::breaker::Policy), String> {
    concord_core::breaker::parse_rule(s).map_err(|e| e.message)
}

/// The default data directory, shared by `serve` and the CLI's discovery.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CONCORD_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("concord");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/concord"),
        None => PathBuf::from("concord-data"),
    }
}

/// Holds the data directory's lock for as long as it lives.
struct DirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> Result<DirLock> {
    let path = dir.join("concord.lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another concord hub is already running on data dir {} ({}); refusing to start. \
                 Stop it, or give this one its own --data-dir.",
                dir.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e).context("cannot lock the data dir"),
    }
    file.set_len(0)?;
    writeln!(file, "pid {}", std::process::id())?;
    Ok(DirLock { _file: file })
}

fn write_secret_file(path: &Path, secret: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    Ok(())
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONCORD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let _lock = lock_data_dir(&dir)?;

    let store: DynStore = match &args.database {
        Some(url) => Arc::new(
            concord_store::postgres::PostgresStore::connect_with(
                url,
                args.database_schema.as_deref(),
                usize::from(args.database_pool),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("cannot open the PostgreSQL store")?,
        ),
        None => {
            let durability = match args.durability {
                DurabilityArg::Full => Durability::Full,
                DurabilityArg::Normal => Durability::Normal,
            };
            let path = dir.join("concord.db");
            Arc::new(
                SqliteStore::open(&path, durability)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("cannot open {}", path.display()))?,
            )
        }
    };
    admin_token(&store, &dir, args.database.is_some()).await?;

    let mut mcp_allowed_hosts: Vec<String> = concord_server::MCP_DEFAULT_ALLOWED_HOSTS
        .iter()
        .map(|s| s.to_string())
        .collect();
    // A specific listen address is reached by its literal IP: admitting it opens no
    // door to DNS rebinding, which needs a name.
    if !args.listen.ip().is_unspecified() {
        mcp_allowed_hosts.push(args.listen.ip().to_string());
    }
    mcp_allowed_hosts.extend(args.mcp_allowed_hosts.iter().map(|h| h.trim().to_string()));
    let mut mcp_allowed_origins: Vec<String> = concord_server::MCP_DEFAULT_ALLOWED_ORIGINS
        .iter()
        .map(|s| s.to_string())
        .collect();
    mcp_allowed_origins.extend(
        args.mcp_allowed_origins
            .iter()
            .map(|o| o.trim().to_string()),
    );
    let config = HubConfig {
        rate_limit_per_s: args.rate_limit,
        rate_limit_burst: args.rate_limit.saturating_mul(2),
        max_body_bytes: args.max_body,
        events_max_age_ms: args.events_max_age.saturating_mul(1000),
        events_max_count: args.events_max_count.max(1),
        retention_interval: std::time::Duration::from_millis(args.retention_interval_ms.max(100)),
        max_instances_per_entity: (args.max_instances_per_entity > 0)
            .then_some(args.max_instances_per_entity),
        max_streams_per_token: args.max_streams_per_token.max(1),
        max_long_polls_per_token: args.max_long_polls_per_token.max(1),
        memory: concord_server::MemoryConfig {
            index_dir: Some(dir.join("recall")),
            embedder: args.embedder.clone().zip(args.embedder_model.clone()),
            write_rate_per_s: args.memory_rate_limit,
        },
        mcp_allowed_hosts,
        mcp_allowed_origins,
        breakers: concord_core::breaker::Policies {
            rules: args.breakers.clone(),
            default: concord_core::breaker::Policy::default(),
        },
        observe_rate_per_s: args.observe_rate,
        ..HubConfig::default()
    };
    let hub = Hub::start(store.clone(), config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    // Signal handlers go in before the hub says where it is: a SIGTERM that
    // arrives right after start must shut down cleanly, not kill the process.
    let shutdown = shutdown_signal()?;
    std::fs::write(dir.join("hub.url"), format!("{url}\n"))?;
    let backend = match &args.database_schema {
        Some(schema) => format!("{}, schema {schema}", store.backend()),
        None => store.backend().to_string(),
    };
    eprintln!(
        "concord {} listening on {url} (store: {backend}, data dir: {}, started in {} ms)",
        env!("CARGO_PKG_VERSION"),
        dir.display(),
        started.elapsed().as_millis()
    );
    hub.serve(listener, shutdown).await?;
    let _ = std::fs::remove_file(dir.join("hub.url"));
    eprintln!("concord stopped");
    Ok(())
}

/// Makes sure the store has an admin token and says where to find it.
///
/// `CONCORD_ADMIN_TOKEN` installs that token (every replica of a cluster is given
/// the same one). Without it, the first hub on an empty store creates one and
/// writes it to `<data dir>/admin.token`. A later replica on the same database
/// has its own data dir and so no such file: it cannot read the secret back (the
/// store keeps only its hash), so it says plainly where the token is.
async fn admin_token(store: &DynStore, dir: &Path, clustered: bool) -> Result<()> {
    let token_file = dir.join("admin.token");
    if let Ok(secret) = std::env::var("CONCORD_ADMIN_TOKEN") {
        if !secret.trim().is_empty() {
            store
                .bootstrap_admin(&hash_secret(secret.trim()), false)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!("admin token: from CONCORD_ADMIN_TOKEN");
            return Ok(());
        }
    }
    let secret = generate_secret();
    if store
        .bootstrap_admin(&hash_secret(&secret), true)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        write_secret_file(&token_file, &secret)?;
        eprintln!(
            "admin token: created and written to {} (mode 0600)",
            token_file.display()
        );
        return Ok(());
    }
    let ours = std::fs::read_to_string(&token_file)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let valid = match &ours {
        Some(t) => matches!(
            store.authenticate(&hash_secret(t)).await,
            Ok(Some(p)) if p.kind == concord_core::token::TokenKind::Admin
        ),
        None => false,
    };
    if valid {
        eprintln!("admin token: existing ({})", token_file.display());
        return Ok(());
    }
    let here = match ours {
        Some(_) => format!(
            "{} is not an admin token of this store",
            token_file.display()
        ),
        None => format!("there is no {}", token_file.display()),
    };
    if clustered {
        eprintln!(
            "admin token: this database already has one, created by the first hub that \
             started on it and written to that hub's <data dir>/admin.token; {here}. \
             Give every replica that token with CONCORD_ADMIN_TOKEN (and the CLI with \
             CONCORD_TOKEN), or copy that file to {}. The hub runs meanwhile.",
            token_file.display()
        );
    } else {
        eprintln!(
            "admin token: the store already has one but {here}. Use an admin token you \
             kept, or restart with CONCORD_ADMIN_TOKEN set to a new secret to add one."
        );
    }
    Ok(())
}

fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("shutting down");
    })
}
