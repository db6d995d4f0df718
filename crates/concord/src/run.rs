//! `concord run -- CMD ARGS…`: one agent process, supervised and present on the hub.
//!
//! The supervisor registers an instance for the agent, gives it an isolated home
//! (`<home root>/<entity>/<label slug>/`, kept across restarts) and a port leased
//! from the hub (`port:<host>:<n>`, so two agents on one host never share one),
//! starts the command there, and then runs three loops:
//!
//! - the child loop (this task): waits for the child, restarts it per policy with
//!   exponential backoff (same home, same port), and on SIGTERM/SIGINT stops it
//!   gracefully (SIGTERM to its process group, a grace period, SIGKILL);
//! - the presence loop: heartbeats the instance while the supervisor lives, reports
//!   process × endpoint in the instance's `meta` (`state_detail`, `process`), and,
//!   while the child's health check keeps failing, withholds heartbeats so the hub
//!   sees the agent go (a hung child loses its presence); when health returns it
//!   registers again if the hub expired the instance meanwhile;
//! - the health loop (with `--health-url` or `--health-cmd`).
//!
//! The hub is never on the child's critical path: if it cannot be reached the child
//! keeps running and the presence loop retries with backoff. Only `--port auto`
//! waits for the hub before the first start, since the port comes from it.

use crate::cli::Conn;
use crate::mcp::RoleArg;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use concord_client::Client;
use concord_core::api::{
    AcquireLeaseRequest, LeaseMode, PatchInstanceRequest, RegisterInstanceRequest, Role,
};
use concord_core::fleet::{
    self, backoff_ms, describe_exit, state_detail, Health, PortChoice, PortRange, ProcessState,
    RestartPolicy,
};
use concord_core::{Error, ErrorCode};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::{watch, Notify};

/// Port leases outlive a hub hiccup by far; they are renewed at half-life and
/// released with the instance anyway.
const PORT_LEASE_TTL_MS: i64 = 600_000;

#[derive(Args, Clone)]
pub struct RunArgs {
    /// The entity (agent identity) the instance belongs to.
    #[arg(long)]
    pub entity: String,
    /// What this agent is for; also names its home directory (slugged).
    #[arg(long)]
    pub label: String,
    #[arg(long, value_enum, default_value = "secondary")]
    pub role: RoleArg,
    /// Capabilities offered (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// For --role fork: the instance this one diverged from.
    #[arg(long)]
    pub forked_from: Option<String>,
    /// Homes go under it: `<home-root>/<entity>/<label slug>/`. Default `<data dir>/agents`.
    #[arg(long)]
    pub home_root: Option<PathBuf>,
    /// `auto` (a free port of --port-range, leased on the hub), `none`, or a number.
    #[arg(long, default_value = "auto")]
    pub port: String,
    /// Where `--port auto` looks, e.g. 7800-7999.
    #[arg(long)]
    pub port_range: Option<String>,
    /// Host name in the port leases (`port:<host>:<n>`) and the instance's `host`.
    #[arg(long)]
    pub host: Option<String>,
    /// Host in the endpoint recorded on the hub (`http://<advertise>:<port>`).
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise: String,
    /// never, on-failure or always.
    #[arg(long, default_value = "on-failure", value_parser = parse_restart)]
    pub restart: RestartPolicy,
    /// Stop restarting after this many restarts (default: no limit).
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// First wait before a restart; doubles per crash in a row.
    #[arg(long, default_value_t = 1_000)]
    pub backoff_ms: u64,
    #[arg(long, default_value_t = 60_000)]
    pub backoff_max_ms: u64,
    /// Health check: GET this path on the child's port (2xx is healthy).
    #[arg(long, conflicts_with = "health_cmd")]
    pub health_url: Option<String>,
    /// Health check: run this with `sh -c` in the home (exit 0 is healthy).
    #[arg(long)]
    pub health_cmd: Option<String>,
    #[arg(long, default_value_t = 5_000)]
    pub health_interval_ms: u64,
    /// Failed checks in a row before the endpoint is down and heartbeats stop.
    #[arg(long, default_value_t = 3)]
    pub health_failures: u32,
    /// Instance TTL; heartbeats every third of it.
    #[arg(long, default_value_t = 15_000)]
    pub ttl_ms: i64,
    /// Between SIGTERM and SIGKILL when stopping the child.
    #[arg(long, default_value_t = 10_000)]
    pub grace_ms: u64,
    /// Rotate `<home>/logs/{stdout,stderr}.log` past this size.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    pub log_max_bytes: u64,
    /// Rotated files kept per log (`stdout.log.1` is the newest).
    #[arg(long, default_value_t = 5)]
    pub log_keep: u32,
    /// Extra environment for the child: KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Where to keep this supervisor's state as JSON (read by `concord ps`).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    serde_json::from_value(Value::String(s.into()))
        .map_err(|_| format!("{s:?}: expected never, on-failure or always"))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

pub fn default_home_root() -> PathBuf {
    crate::serve::default_data_dir().join("agents")
}

/// `<root>/<entity>/<label slug>`.
pub fn home_of(root: &Path, entity: &str, label: &str) -> Result<PathBuf> {
    concord_core::validate::name("entity", entity).map_err(crate::cli::e)?;
    let slug = fleet::slug("label", label).map_err(crate::cli::e)?;
    Ok(root.join(entity).join(slug))
}

/// Where a program will be found: a path (made absolute, since the child runs in
/// its home), or the first executable of that name on PATH.
pub fn resolve_program(program: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::absolute(program)
            .with_context(|| format!("command {program:?}: cannot make the path absolute"))?;
        if !p.exists() {
            bail!("command {program:?} does not exist");
        }
        if !executable(&p) {
            bail!("command {program:?} is not an executable file");
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| {
            anyhow!(
                "command {program:?} not found on PATH ({})",
                std::env::var("PATH").unwrap_or_default()
            )
        })
}

/// Creates the home and its `logs/` (kept if they exist).
pub fn make_home(home: &Path) -> Result<()> {
    std::fs::create_dir_all(home.join("logs"))
        .with_context(|| format!("cannot create the agent's home {}", home.display()))
}

/// Whether nothing listens on `port` (any address): checked before a port is
/// handed out, since processes outside Concord hold ports without leases.
pub fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The instance the supervisor holds now (replaced if the hub expired it).
#[derive(Clone)]
struct Registration {
    id: String,
    client: Client,
}

/// Everything the three loops share. A std mutex: held for field access only,
/// never across an await.
struct RunState {
    reg: Option<Registration>,
    /// (lease id, when it was last acquired or renewed)
    lease: Option<(String, Instant)>,
    process: ProcessState,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
    health: Health,
    /// Heartbeats withheld because the child's health keeps failing.
    withheld: bool,
    /// Why the hub cannot be reached right now.
    hub_error: Option<String>,
    /// Wants the primary role but holds a secondary one for now.
    campaigning: bool,
    /// What was last written to the hub's meta, to skip identical writes.
    reported: Option<Value>,
}

struct Supervisor {
    args: RunArgs,
    agent: Client,
    program: PathBuf,
    host: String,
    home: PathBuf,
    port: Option<u16>,
    st: Mutex<RunState>,
    wake: Notify,
}

impl Supervisor {
    fn with<T>(&self, f: impl FnOnce(&mut RunState) -> T) -> T {
        match self.st.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn note(&self, msg: impl AsRef<str>) {
        eprintln!(
            "concord run [{}/{}]: {}",
            self.args.entity,
            self.args.label,
            msg.as_ref()
        );
    }

    fn health_checked(&self) -> bool {
        self.args.health_url.is_some() || self.args.health_cmd.is_some()
    }

    fn endpoint(&self) -> Option<String> {
        self.port
            .map(|p| format!("http://{}:{p}", self.args.advertise))
    }

    fn request(&self, role: Role) -> RegisterInstanceRequest {
        RegisterInstanceRequest {
            entity: self.args.entity.clone(),
            role,
            label: Some(self.args.label.clone()),
            ttl_ms: Some(self.args.ttl_ms),
            capabilities: self.args.capabilities.clone(),
            endpoint: self.endpoint(),
            host: Some(self.host.clone()),
            version: None,
            persistent: false,
            forked_from: self.args.forked_from.clone(),
            meta: self.meta(),
        }
    }

    /// `meta` as the dashboard reads it: `state_detail` and `process`.
    fn meta(&self) -> Value {
        self.with(|s| {
            json!({
                "state_detail": state_detail(s.process, s.health, s.last_exit.as_deref()),
                "process": {
                    "state": s.process.as_str(),
                    "pid": s.pid,
                    "restarts": s.restarts,
                    "port": self.port,
                    "home": self.home.display().to_string(),
                    "last_exit": s.last_exit,
                },
                "supervisor": { "pid": std::process::id(), "command": self.args.command },
            })
        })
    }

    /// The local state file `concord ps` reads: the meta plus the hub's view.
    fn write_state_file(&self, error: Option<&str>) {
        let Some(path) = &self.args.state_file else {
            return;
        };
        let (instance, hub) = self.with(|s| {
            let hub = if let Some(e) = &s.hub_error {
                format!("unreachable: {e}")
            } else if s.withheld {
                "heartbeats withheld (health failing)".to_string()
            } else if s.reg.is_some() {
                "registered".to_string()
            } else {
                "not registered".to_string()
            };
            (s.reg.as_ref().map(|r| r.id.clone()), hub)
        });
        let mut doc = self.meta();
        doc["instance"] = json!(instance);
        doc["hub"] = json!(hub);
        doc["error"] = json!(error);
        doc["entity"] = json!(self.args.entity);
        doc["label"] = json!(self.args.label);
        doc["updated_at"] = json!(chrono::Utc::now().to_rfc3339());
        if let Err(e) = write_atomic(path, &doc) {
            self.note(format!(
                "cannot write the state file {}: {e}",
                path.display()
            ));
        }
    }

    /// Registers a new instance; `--role primary` falls back to a campaigning
    /// secondary while the role is held.
    async fn register(&self) -> Result<(), Error> {
        let role = match self.args.role {
            RoleArg::Primary => Role::Primary,
            RoleArg::Secondary => Role::Secondary,
            RoleArg::Fork => Role::Fork,
        };
        let (reg, campaigning) = match self.agent.register(&self.request(role)).await {
            Err(e) if e.code == ErrorCode::PrimaryHeld => {
                self.note(format!(
                    "{}; registering as a secondary and campaigning",
                    e.message
                ));
                (
                    self.agent.register(&self.request(Role::Secondary)).await?,
                    true,
                )
            }
            other => (other?, false),
        };
        let registration = Registration {
            client: self.agent.with_token(reg.session_token.clone()),
            id: reg.instance.id.clone(),
        };
        self.note(format!(
            "registered {} as {}",
            reg.instance.id,
            reg.instance.role.as_str()
        ));
        self.write_session_file(&reg.instance.id, &reg.session_token);
        self.with(|s| {
            s.reg = Some(registration.clone());
            s.hub_error = None;
            s.campaigning = campaigning;
            s.reported = None;
            s.lease = None;
        });
        if let Some(port) = self.port {
            // Re-registration after an expiry: the old instance's lease went with
            // it; take the same port again (the child still listens on it).
            match self.lease_port(&registration.client, port).await {
                Ok(id) => self.with(|s| s.lease = Some((id, Instant::now()))),
                Err(e) => self.note(format!("port {port}: {}", e.message)),
            }
        }
        Ok(())
    }

    /// The child reads its current session from here after a re-registration
    /// (its environment only has the first one). Mode 0600: it holds a token.
    fn write_session_file(&self, id: &str, token: &str) {
        let doc = json!({
            "instance_id": id,
            "session_token": token,
            "hub": self.agent.urls(),
        });
        let path = self.home.join("concord-session.json");
        if let Err(e) = write_atomic(&path, &doc) {
            self.note(format!("cannot write {}: {e}", path.display()));
        }
    }

    async fn lease_port(&self, client: &Client, port: u16) -> Result<String, Error> {
        let env = client
            .acquire_lease(&AcquireLeaseRequest {
                resource: port_resource(&self.host, port),
                mode: LeaseMode::Exclusive,
                ttl_ms: Some(PORT_LEASE_TTL_MS),
                reason: Some(format!("port of {}/{}", self.args.entity, self.args.label)),
                idempotency_key: None,
            })
            .await?;
        Ok(env.lease.id)
    }

    /// Writes `meta` (and the endpoint) to the hub when it changed, and the state
    /// file always.
    async fn report(&self) {
        self.write_state_file(None);
        let Some(reg) = self.with(|s| s.reg.clone()) else {
            return;
        };
        let meta = self.meta();
        if self.with(|s| s.reported.as_ref() == Some(&meta)) {
            return;
        }
        let patch = PatchInstanceRequest {
            label: None,
            capabilities: None,
            endpoint: self.endpoint(),
            meta: Some(meta.clone()),
        };
        match reg.client.patch_instance(&reg.id, &patch).await {
            Ok(_) => self.with(|s| s.reported = Some(meta)),
            Err(e) if e.code == ErrorCode::Unavailable => self.hub_unreachable(&e),
            Err(e) => self.note(format!("reporting state: {}", e.message)),
        }
    }

    fn hub_unreachable(&self, e: &Error) {
        let first = self.with(|s| s.hub_error.replace(e.message.clone()).is_none());
        if first {
            self.note(format!("{} (the agent keeps running; retrying)", e.message));
            self.write_state_file(None);
        }
    }

    fn health_down(&self) -> bool {
        self.with(|s| matches!(s.health, Health::Down(n) if n >= self.args.health_failures))
    }

    /// One round of presence.
    async fn tick(&self) {
        let current = self.with(|s| s.reg.clone());
        if self.health_down() {
            if !self.with(|s| std::mem::replace(&mut s.withheld, true)) {
                // Say why first, while the instance still exists to carry it.
                self.report().await;
                self.note("the child's health check keeps failing: heartbeats withheld, so the hub sees the agent gone");
            }
            self.write_state_file(None);
            return;
        }
        if self.with(|s| std::mem::replace(&mut s.withheld, false)) {
            self.note("the child is healthy again: resuming presence");
        }
        let Some(reg) = current else {
            match self.register().await {
                Ok(()) => self.report().await,
                Err(e) if e.code == ErrorCode::Unavailable => self.hub_unreachable(&e),
                Err(e) => self.note(format!("registering: {}", e.message)),
            }
            return;
        };
        match reg.client.heartbeat(&reg.id).await {
            Ok(beat) => {
                if self.with(|s| s.hub_error.take().is_some()) {
                    self.note(format!("the hub answers again; {} is live", reg.id));
                }
                if beat.role == Role::Primary {
                    self.with(|s| s.campaigning = false);
                } else if self.with(|s| s.campaigning) {
                    if let Ok(g) = reg.client.campaign(&self.args.entity, &reg.id, None).await {
                        self.note(format!("now the primary (fence {})", g.fence));
                        self.with(|s| s.campaigning = false);
                    }
                }
                self.renew_lease(&reg).await;
                self.report().await;
            }
            Err(e) if e.code == ErrorCode::Unavailable => self.hub_unreachable(&e),
            Err(e) if matches!(e.code, ErrorCode::UnknownInstance | ErrorCode::Unauthorized) => {
                self.note(format!(
                    "the hub no longer knows {} ({}); registering again",
                    reg.id, e.message
                ));
                self.with(|s| {
                    s.reg = None;
                    s.lease = None;
                });
                match self.register().await {
                    Ok(()) => self.report().await,
                    Err(e) if e.code == ErrorCode::Unavailable => self.hub_unreachable(&e),
                    Err(e) => self.note(format!("registering: {}", e.message)),
                }
            }
            Err(e) => self.note(format!("heartbeat: {}", e.message)),
        }
    }

    async fn renew_lease(&self, reg: &Registration) {
        let due = self.with(|s| {
            s.lease.as_ref().and_then(|(id, at)| {
                (at.elapsed() >= Duration::from_millis(PORT_LEASE_TTL_MS as u64 / 2))
                    .then(|| id.clone())
            })
        });
        let Some(id) = due else { return };
        match reg.client.renew_lease(&id, Some(PORT_LEASE_TTL_MS)).await {
            Ok(_) => self.with(|s| s.lease = Some((id, Instant::now()))),
            Err(e) if e.code == ErrorCode::Unavailable => self.hub_unreachable(&e),
            Err(e) => {
                self.note(format!("renewing the port lease: {}", e.message));
                if let Some(port) = self.port {
                    if let Ok(id) = self.lease_port(&reg.client, port).await {
                        self.with(|s| s.lease = Some((id, Instant::now())));
                    }
                }
            }
        }
    }

    async fn presence(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut retry = 0u32;
        loop {
            self.tick().await;
            let troubled = self.with(|s| s.hub_error.is_some() || s.reg.is_none());
            let every = if troubled && !self.health_down() {
                retry = retry.saturating_add(1);
                Duration::from_millis(backoff_ms(retry - 1, 250, 10_000))
            } else {
                retry = 0;
                Duration::from_millis((self.args.ttl_ms / 3).max(200) as u64)
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn check_health(&self) -> bool {
        let timeout = Duration::from_millis(self.args.health_interval_ms.clamp(500, 5_000));
        if let (Some(path), Some(port)) = (&self.args.health_url, self.port) {
            let url = format!("http://127.0.0.1:{port}{path}");
            let Ok(http) = reqwest::Client::builder().timeout(timeout).build() else {
                return false;
            };
            return http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
        }
        if let Some(cmd) = &self.args.health_cmd {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg(cmd);
            self.child_env(&mut c);
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let Ok(mut child) = c.spawn() else {
                return false;
            };
            return matches!(
                tokio::time::timeout(timeout, child.wait()).await,
                Ok(Ok(status)) if status.success()
            );
        }
        true
    }

    async fn health(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if !self.health_checked() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(self.args.health_interval_ms)) => {}
                _ = stop.changed() => return,
            }
            if self.with(|s| s.process != ProcessState::Running) {
                continue;
            }
            let ok = self.check_health().await;
            let changed = self.with(|s| {
                let before = s.health;
                s.health = match (ok, s.health) {
                    (true, _) => Health::Up,
                    (false, Health::Down(n)) => Health::Down(n.saturating_add(1)),
                    (false, _) => Health::Down(1),
                };
                before != s.health
            });
            if changed {
                self.wake.notify_one();
            }
        }
    }

    /// The child's environment: the supervisor's, plus who it is on the hub.
    fn child_env(&self, c: &mut tokio::process::Command) {
        let (id, token) = self.with(|s| {
            s.reg
                .as_ref()
                .map(|r| (r.id.clone(), r.client.token().unwrap_or("").to_string()))
                .unwrap_or_default()
        });
        c.current_dir(&self.home)
            .env("CONCORD_URL", self.agent.urls().join(","))
            .env("CONCORD_SESSION_TOKEN", token)
            .env("CONCORD_INSTANCE_ID", id)
            .env("CONCORD_ENTITY", &self.args.entity)
            .env("CONCORD_LABEL", &self.args.label)
            .env("CONCORD_HOME", &self.home);
        match self.port {
            Some(p) => c.env("PORT", p.to_string()),
            None => c.env_remove("PORT"),
        };
        for (k, v) in &self.args.env {
            c.env(k, v);
        }
    }

    fn spawn_child(&self) -> std::io::Result<tokio::process::Child> {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(&self.args.command[1..]);
        self.child_env(&mut c);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a stop reaches the whole tree it started.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only sets a flag of the new process.
        unsafe {
            c.pre_exec(|| {
                // If the supervisor dies without stopping it, the child goes too:
                // an unsupervised agent with a stale lease is worse than none.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = c.spawn()?;
        let logs = self.home.join("logs");
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, self.log(&logs, "stdout.log")));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, self.log(&logs, "stderr.log")));
        }
        Ok(child)
    }

    fn log(&self, dir: &Path, name: &str) -> RotatingLog {
        RotatingLog {
            path: dir.join(name),
            max_bytes: self.args.log_max_bytes.max(1),
            keep: self.args.log_keep,
            file: None,
            size: 0,
        }
    }

    fn set_process(&self, state: ProcessState, pid: Option<u32>) {
        self.with(|s| {
            s.process = state;
            s.pid = pid;
            if state == ProcessState::Running {
                s.health = if self.health_checked() {
                    Health::Pending
                } else {
                    Health::Unchecked
                };
            }
        });
        self.wake.notify_one();
    }

    /// Runs the child until it is done for good or `stop` fires; returns whether
    /// its last exit was a success, and how it ended.
    async fn child_loop(&self, mut stop: watch::Receiver<bool>) -> Option<(bool, String)> {
        let mut consecutive = 0u32;
        loop {
            let started = Instant::now();
            let exit = match self.spawn_child() {
                Ok(mut child) => {
                    let pid = child.id();
                    self.note(format!("started pid {}", pid.unwrap_or(0)));
                    self.set_process(ProcessState::Running, pid);
                    tokio::select! {
                        status = child.wait() => match status {
                            Ok(st) => {
                                use std::os::unix::process::ExitStatusExt;
                                (st.success(), describe_exit(st.code(), st.signal()))
                            }
                            Err(e) => (false, format!("lost: {e}")),
                        },
                        _ = stop.changed() => {
                            let how = self.stop_child(&mut child).await;
                            self.with(|s| s.last_exit = Some(how.clone()));
                            self.set_process(ProcessState::Exited, None);
                            return Some((true, how));
                        }
                    }
                }
                Err(e) => (false, format!("cannot start: {e}")),
            };
            let (success, how) = exit;
            self.note(format!("child exited: {how}"));
            let restarts = self.with(|s| {
                s.last_exit = Some(how.clone());
                s.restarts
            });
            if !self
                .args
                .restart
                .should_restart(success, restarts, self.args.max_restarts)
            {
                self.set_process(ProcessState::Exited, None);
                return Some((success, how));
            }
            if started.elapsed() >= Duration::from_millis(fleet::STABLE_RUN_MS) {
                consecutive = 0;
            }
            let wait = backoff_ms(consecutive, self.args.backoff_ms, self.args.backoff_max_ms);
            consecutive = consecutive.saturating_add(1);
            self.note(format!("restarting in {wait} ms"));
            self.set_process(ProcessState::Backoff, None);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = stop.changed() => {
                    self.set_process(ProcessState::Exited, None);
                    return Some((true, how));
                }
            }
            self.with(|s| s.restarts += 1);
            self.set_process(ProcessState::Restarting, None);
        }
    }

    /// SIGTERM to the child's process group, the grace period, then SIGKILL.
    async fn stop_child(&self, child: &mut tokio::process::Child) -> String {
        let Some(pid) = child.id() else {
            return "stopped".into();
        };
        let group = -(pid as i32);
        // SAFETY: kill(2) on the child's own process group.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let grace = Duration::from_millis(self.args.grace_ms);
        let how = match tokio::time::timeout(grace, child.wait()).await {
            Ok(_) => "stopped (SIGTERM)".to_string(),
            Err(_) => {
                self.note(format!(
                    "pid {pid} still running {} ms after SIGTERM: SIGKILL",
                    self.args.grace_ms
                ));
                "stopped (SIGKILL after the grace period)".to_string()
            }
        };
        // The group may hold more than the child: make sure none of it outlives us.
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = child.wait().await;
        self.note(format!("pid {pid} {how}"));
        how
    }

    /// Releases the port lease and closes the instance (bounded: a hub that does
    /// not answer lets the instance expire by itself).
    async fn close(&self) {
        let (reg, lease) = self.with(|s| (s.reg.clone(), s.lease.take()));
        let Some(reg) = reg else { return };
        let work = async {
            if let Some((id, _)) = lease {
                let _ = reg.client.release_lease(&id, false).await;
            }
            reg.client.close_instance(&reg.id).await
        };
        match tokio::time::timeout(Duration::from_secs(5), work).await {
            Ok(Ok(_)) => self.note(format!("closed {}", reg.id)),
            Ok(Err(e)) => self.note(format!("closing {}: {}", reg.id, e.message)),
            Err(_) => self.note(format!(
                "closing {}: the hub did not answer; it expires by itself",
                reg.id
            )),
        }
    }
}

pub fn port_resource(host: &str, port: u16) -> String {
    format!("port:{host}:{port}")
}

/// Takes a free port for `client`'s instance: the preferred one first (the port
/// this agent had before), then the range in order. A port is free when no lease
/// holds it and nothing listens on it; the exclusive lease is what makes two
/// supervisors starting at the same moment disagree (the loser moves on).
async fn allocate_port(
    client: &Client,
    sup: &Supervisor,
    range: PortRange,
    preferred: Option<u16>,
) -> Result<(u16, String)> {
    let candidates = preferred
        .filter(|p| range.contains(*p))
        .into_iter()
        .chain(range.ports().filter(|p| Some(*p) != preferred));
    for port in candidates {
        if !bindable(port) {
            continue;
        }
        match sup.lease_port(client, port).await {
            Ok(id) => {
                // Something outside Concord may have bound it since.
                if bindable(port) {
                    return Ok((port, id));
                }
                let _ = client.release_lease(&id, false).await;
            }
            Err(e) if e.code == ErrorCode::LeaseConflict => continue,
            Err(e) => {
                return Err(anyhow!(
                    "leasing port {port}: {} ({})",
                    e.message,
                    e.code.as_str()
                ))
            }
        }
    }
    bail!("port range {range} exhausted: every port is leased by another agent or in use on this host")
}

/// A log file rotated by size: `name` is current, `name.1` the newest old one.
struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<std::fs::File>,
    size: u64,
}

impl RotatingLog {
    /// Appends, rotating first when the file would pass `max_bytes`. Cuts at a
    /// line end where it can, so a line is split only if it alone is too long.
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        loop {
            if self.file.is_none() {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                self.size = f.metadata()?.len();
                self.file = Some(f);
            }
            if buf.is_empty() {
                return Ok(());
            }
            let room = self.max_bytes.saturating_sub(self.size) as usize;
            let take = if buf.len() <= room {
                buf.len()
            } else {
                match buf[..room].iter().rposition(|b| *b == b'\n') {
                    Some(nl) => nl + 1,
                    None if self.size > 0 => 0,
                    None => room.max(1),
                }
            };
            if let Some(f) = self.file.as_mut() {
                f.write_all(&buf[..take])?;
            }
            self.size += take as u64;
            buf = &buf[take..];
            if buf.is_empty() {
                return Ok(());
            }
            self.rotate()?;
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.keep == 0 {
            return std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(&self.path, numbered(1))
    }
}

async fn pump(mut from: impl tokio::io::AsyncRead + Unpin, mut to: RotatingLog) {
    // Created at once, so `tail -f` works before the child says anything.
    if let Err(e) = to.write(&[]) {
        eprintln!("concord run: opening {}: {e}", to.path.display());
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Err(e) = to.write(&buf[..n]) {
                    eprintln!("concord run: writing {}: {e}", to.path.display());
                }
            }
        }
    }
}

/// Writes JSON through a temporary file and a rename, so a reader never sees half.
pub fn write_atomic(path: &Path, doc: &Value) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(doc)
                .unwrap_or_default()
                .as_bytes(),
        )?;
    }
    std::fs::rename(&tmp, path)
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Everything that can be wrong with the input, before anything starts.
    let port_choice = PortChoice::parse("--port", &args.port).map_err(crate::cli::e)?;
    let range = match &args.port_range {
        Some(r) => PortRange::parse("--port-range", r).map_err(crate::cli::e)?,
        None => fleet::DEFAULT_PORT_RANGE,
    };
    concord_core::validate::ttl_ms("--ttl-ms", args.ttl_ms).map_err(crate::cli::e)?;
    if args
        .health_url
        .as_deref()
        .is_some_and(|u| !u.starts_with('/'))
    {
        bail!("--health-url: a path on the agent's port, starting with '/'");
    }
    if args.health_url.is_some() && port_choice == PortChoice::None {
        bail!("--health-url needs a port (--port auto or a number)");
    }
    if args.health_failures == 0 {
        bail!("--health-failures: must be at least 1");
    }
    let program = resolve_program(&args.command[0])?;
    let root = args.home_root.clone().unwrap_or_else(default_home_root);
    let home = home_of(&root, &args.entity, &args.label)?;
    make_home(&home)?;
    let agent = args.conn.client()?;
    if agent.token().is_none() {
        bail!(
            "no token: pass --token (an agent token of the entity, or admin) or set CONCORD_TOKEN"
        );
    }
    let host = args
        .host
        .clone()
        .or_else(crate::work::hostname)
        .unwrap_or_else(|| "localhost".into());
    // The port this agent had last time, to keep it across supervisor restarts.
    let previous_port = args
        .state_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["process"]["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok());
    if let PortChoice::Fixed(p) = port_choice {
        if !bindable(p) {
            bail!("--port {p}: something on this host already listens on it");
        }
    }

    let mut sup = Supervisor {
        program,
        host,
        home,
        port: match port_choice {
            PortChoice::Fixed(p) => Some(p),
            _ => None,
        },
        agent,
        st: Mutex::new(RunState {
            reg: None,
            lease: None,
            process: ProcessState::Restarting,
            pid: None,
            restarts: 0,
            last_exit: None,
            health: Health::Unchecked,
            withheld: false,
            hub_error: None,
            campaigning: false,
            reported: None,
        }),
        wake: Notify::new(),
        args,
    };

    // First registration. A wrong token or entity fails now; a hub that is down
    // only delays `--port auto` (its port comes from the hub), nothing else.
    // Signal handlers first: a SIGTERM from `concord down` right after the start
    // must stop the agent gracefully, not kill the supervisor outright.
    let (stop, mut stop_rx) = watch::channel(false);
    let signals = spawn_signal_watch(stop.clone())?;
    let mut attempt = 0u32;
    loop {
        match sup.register().await {
            Ok(()) => break,
            Err(e) if e.code == ErrorCode::Unavailable => {
                if port_choice != PortChoice::Auto {
                    sup.hub_unreachable(&e);
                    break;
                }
                if attempt == 0 {
                    sup.note(format!(
                        "{}: waiting for the hub to lease a port",
                        e.message
                    ));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(backoff_ms(attempt, 250, 10_000))) => {}
                    _ = stop_rx.changed() => return Ok(()),
                }
                attempt = attempt.saturating_add(1);
            }
            Err(e) => {
                sup.write_state_file(Some(&e.message));
                bail!(
                    "cannot register with the hub: {} ({})",
                    e.message,
                    e.code.as_str()
                )
            }
        }
    }
    if port_choice == PortChoice::Auto {
        let reg = sup.with(|s| s.reg.clone());
        if let Some(reg) = reg {
            match allocate_port(&reg.client, &sup, range, previous_port).await {
                Ok((port, lease)) => {
                    sup.port = Some(port);
                    sup.with(|s| s.lease = Some((lease, Instant::now())));
                }
                Err(e) => {
                    sup.close().await;
                    sup.write_state_file(Some(&format!("{e:#}")));
                    return Err(e);
                }
            }
        }
    }
    let sup = Arc::new(sup);
    sup.note(format!(
        "home {}, port {}",
        sup.home.display(),
        sup.port
            .map(|p| p.to_string())
            .unwrap_or_else(|| "none".into())
    ));

    let presence = tokio::spawn(sup.clone().presence(stop_rx.clone()));
    let health = tokio::spawn(sup.clone().health(stop_rx.clone()));
    let last = if *stop_rx.borrow_and_update() {
        None
    } else {
        sup.child_loop(stop_rx).await
    };
    let stopped = *stop.borrow();
    let _ = stop.send(true);
    signals.abort();
    let _ = presence.await;
    let _ = health.await;
    sup.report().await;
    sup.close().await;
    sup.write_state_file(None);
    match last {
        Some((false, how)) if !stopped => bail!("the agent exited for good: {how}"),
        _ => Ok(()),
    }
}

/// Installs the SIGTERM/SIGINT handlers now (not when a task first runs) and
/// turns either signal into `stop`.
fn spawn_signal_watch(stop: watch::Sender<bool>) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop.send(true);
    }))
}
