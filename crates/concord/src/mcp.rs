//! `concord mcp`: the MCP tool set on stdio, for MCP clients that launch a command.
//!
//! One line of client config makes an agent a labelled instance of the fleet: the
//! bridge registers it (a secondary unless told otherwise; `--role primary`
//! campaigns), heartbeats it for as long as the client runs, keeps its role and
//! fence current so fenced tools fill them in, and closes it when stdin closes or
//! on SIGINT/SIGTERM. If the hub goes away the tools say so and the bridge keeps
//! trying; if the hub forgot the instance meanwhile (it expired), the bridge
//! registers a new one and `whoami` names both. stdout is the MCP channel: the
//! bridge's own notes go to stderr.
//!
//! Degraded mode: writes that are safe to replay (memory to shared spaces or the
//! instance's own, events, observations, enqueues) that find no hub wait in a
//! spool file of this entity and label (`--spool-dir`), and the tool answers
//! "spooled"; the bridge sends them, in order, once the hub answers a heartbeat.

use crate::cli::Conn;
use anyhow::{anyhow, Result};
use async_trait::async_trait;
use clap::{Args, ValueEnum};
use concord_client::Client;
use concord_core::api::{HeartbeatResponse, RegisterInstanceRequest, Role};
use concord_core::{Error, ErrorCode};
use concord_mcp::{Agent, ConcordMcp, Session};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServiceExt};
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Labelled, non-authoritative (the default).
    Secondary,
    /// Campaign for the entity's primary role, and keep campaigning while it is held.
    Primary,
    /// A fork of the entity (give --forked-from).
    Fork,
}

#[derive(Args)]
pub struct McpArgs {
    /// The entity (agent identity) this instance belongs to.
    #[arg(long)]
    entity: String,
    /// What this instance is for (e.g. "tab-2", "reviewer"): unlabelled instances are ghosts.
    #[arg(long)]
    label: String,
    #[arg(long, value_enum, default_value = "secondary")]
    role: RoleArg,
    /// Capabilities offered (comma-separated): messages to cap:X and tasks requiring X reach it.
    #[arg(long, value_delimiter = ',')]
    capabilities: Vec<String>,
    /// Lease TTL; the bridge heartbeats every third of it.
    #[arg(long, default_value_t = 15_000)]
    ttl_ms: i64,
    /// Version tag (routes like `entity:v1` resolve to it).
    #[arg(long)]
    version: Option<String>,
    /// For --role fork: the instance this one diverged from.
    #[arg(long)]
    forked_from: Option<String>,
    /// Where writes wait while no hub answers (one file per entity and label).
    /// Default: $XDG_STATE_HOME/concord/spool, else ~/.local/state/concord/spool.
    #[arg(long, env = "CONCORD_SPOOL_DIR")]
    spool_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

/// The current registration.
#[derive(Clone)]
struct Registration {
    id: String,
    client: Client,
    role: Role,
    fence: Option<u64>,
}

#[derive(Default)]
struct BridgeState {
    current: Option<Registration>,
    /// Instances this bridge registered before, newest last (they expired or closed).
    previous: Vec<String>,
    /// Why the hub cannot be reached right now.
    unreachable: Option<String>,
}

struct Bridge {
    /// The agent (or admin) token's client: registers instances.
    agent: Client,
    args: McpArgs,
    hostname: Option<String>,
    /// A std lock: held for field reads and writes only, never across an await.
    state: RwLock<BridgeState>,
    /// Wakes the presence loop at once (a tool ran into unknown_instance, say).
    wake: Notify,
}

impl Bridge {
    fn read<T>(&self, f: impl FnOnce(&BridgeState) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut BridgeState) -> T) -> T {
        match self.state.write() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn request(&self, role: Role) -> RegisterInstanceRequest {
        RegisterInstanceRequest {
            entity: self.args.entity.clone(),
            role,
            label: Some(self.args.label.clone()),
            ttl_ms: Some(self.args.ttl_ms),
            capabilities: self.args.capabilities.clone(),
            endpoint: None,
            host: self.hostname.clone(),
            version: self.args.version.clone(),
            persistent: false,
            forked_from: self.args.forked_from.clone(),
            meta: json!({"mcp": {"transport": "stdio"}}),
        }
    }

    fn wants_primary(&self) -> bool {
        self.args.role == RoleArg::Primary
    }

    /// Registers a new instance. `--role primary` asks for the role at once and, if
    /// it is held, registers as a secondary that goes on campaigning.
    async fn register(&self) -> Result<(), Error> {
        let role = match self.args.role {
            RoleArg::Primary => Role::Primary,
            RoleArg::Secondary => Role::Secondary,
            RoleArg::Fork => Role::Fork,
        };
        let reg = match self.agent.register(&self.request(role)).await {
            Err(e) if e.code == ErrorCode::PrimaryHeld => {
                eprintln!(
                    "concord mcp: {}; registering as a secondary and campaigning",
                    e.message
                );
                self.agent.register(&self.request(Role::Secondary)).await?
            }
            other => other?,
        };
        eprintln!(
            "concord mcp: registered {} in {} as {}{}",
            reg.instance.id,
            reg.instance.entity,
            reg.instance.role.as_str(),
            reg.fence
                .map(|f| format!(" (fence {f})"))
                .unwrap_or_default()
        );
        let registration = Registration {
            client: self
                .agent
                .with_token(reg.session_token)
                .for_instance(reg.instance.id.clone()),
            id: reg.instance.id,
            role: reg.instance.role,
            fence: reg.fence,
        };
        self.write(|s| {
            if let Some(old) = s.current.take() {
                s.previous.push(old.id);
            }
            s.current = Some(registration);
            s.unreachable = None;
        });
        Ok(())
    }

    fn note_unreachable(&self, e: &Error) {
        let first = self.write(|s| s.unreachable.replace(e.message.clone()).is_none());
        if first {
            eprintln!("concord mcp: {} (retrying)", e.message);
        }
    }

    /// One round of presence: register if there is no instance, else heartbeat it
    /// (and, for `--role primary`, campaign while another holds the role).
    async fn tick(&self) {
        let Some(reg) = self.read(|s| s.current.clone()) else {
            match self.register().await {
                Ok(()) => {}
                Err(e) if e.code == ErrorCode::Unavailable => self.note_unreachable(&e),
                Err(e) => eprintln!("concord mcp: registering: {e}"),
            }
            return;
        };
        match reg.client.heartbeat(&reg.id).await {
            Ok(beat) => {
                if self.read(|s| s.unreachable.is_some()) {
                    eprintln!("concord mcp: the hub answers again; {} is live", reg.id);
                }
                self.write(|s| s.unreachable = None);
                self.observed(&reg.id, &beat);
                replay(&reg.client).await;
                if self.wants_primary() && beat.role != Role::Primary {
                    self.campaign(&reg).await;
                }
            }
            Err(e) if e.code == ErrorCode::Unavailable => self.note_unreachable(&e),
            Err(e) if matches!(e.code, ErrorCode::UnknownInstance | ErrorCode::Unauthorized) => {
                // The hub forgot the instance (it expired while the hub or this
                // process was away) or its token: start over as a new instance.
                eprintln!(
                    "concord mcp: the hub no longer knows {} ({}); registering again",
                    reg.id, e.message
                );
                self.write(|s| {
                    if s.current.as_ref().is_some_and(|c| c.id == reg.id) {
                        s.current = None;
                        s.previous.push(reg.id.clone());
                    }
                    s.unreachable = None;
                });
                match self.register().await {
                    Ok(()) => {}
                    Err(e) if e.code == ErrorCode::Unavailable => self.note_unreachable(&e),
                    Err(e) => eprintln!("concord mcp: registering: {e}"),
                }
            }
            Err(e) => eprintln!("concord mcp: heartbeat: {e}"),
        }
    }

    /// A campaign that waits briefly, so the presence loop keeps its rhythm: the
    /// role is taken within one beat of being released.
    async fn campaign(&self, reg: &Registration) {
        let wait = (self.args.ttl_ms / 3).clamp(0, 5_000) as u64;
        match reg
            .client
            .campaign(&self.args.entity, &reg.id, Some(wait))
            .await
        {
            Ok(grant) => {
                eprintln!(
                    "concord mcp: {} is now the primary of {} (fence {})",
                    reg.id, self.args.entity, grant.fence
                );
                self.write(|s| {
                    if let Some(c) = s.current.as_mut().filter(|c| c.id == reg.id) {
                        c.role = Role::Primary;
                        c.fence = Some(grant.fence);
                    }
                });
            }
            Err(e) if e.code == ErrorCode::PrimaryHeld => {}
            Err(e) if e.code == ErrorCode::Unavailable => self.note_unreachable(&e),
            Err(e) => eprintln!("concord mcp: campaign: {e}"),
        }
    }

    /// Keeps the instance alive until `stop` fires.
    async fn presence(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.tick().await;
            let every = if self.read(|s| s.unreachable.is_some() || s.current.is_none()) {
                Duration::from_millis(500)
            } else {
                Duration::from_millis((self.args.ttl_ms / 3).max(200) as u64)
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Closes the instance (its primary role, claims and leases are released at once).
    async fn close(&self) {
        let Some(reg) = self.read(|s| s.current.clone()) else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(5), reg.client.close_instance(&reg.id)).await
        {
            Ok(Ok(_)) => eprintln!("concord mcp: closed {}", reg.id),
            Ok(Err(e)) => eprintln!("concord mcp: closing {}: {e}", reg.id),
            Err(_) => eprintln!(
                "concord mcp: closing {}: the hub did not answer; it expires by itself",
                reg.id
            ),
        }
    }
}

#[async_trait]
impl Agent for Bridge {
    async fn session(&self, _request: &RequestContext<RoleServer>) -> Result<Session, Error> {
        let (current, unreachable) = self.read(|s| (s.current.clone(), s.unreachable.clone()));
        match current {
            Some(reg) => Ok(Session {
                client: reg.client,
                instance: reg.id,
                entity: self.args.entity.clone(),
            }),
            None => Err(Error::unavailable(match unreachable {
                Some(why) => format!("{why}; not registered yet"),
                None => "not registered with the hub yet".into(),
            })),
        }
    }

    fn observed(&self, instance: &str, beat: &HeartbeatResponse) {
        self.write(|s| {
            if let Some(c) = s.current.as_mut().filter(|c| c.id == instance) {
                c.role = beat.role;
                c.fence = beat.fence;
            }
        });
    }

    fn failed(&self, error: &Error) -> Option<String> {
        match error.code {
            ErrorCode::Unavailable => {
                self.note_unreachable(error);
                Some(
                    "the hub cannot be reached; concord mcp keeps retrying and re-registers \
                     if the hub forgot this instance meanwhile"
                        .into(),
                )
            }
            // Only about this bridge's own instance: a message to some other unknown
            // instance says nothing about ours.
            ErrorCode::UnknownInstance | ErrorCode::Unauthorized
                if error.code == ErrorCode::Unauthorized
                    || self.read(|s| {
                        s.current
                            .as_ref()
                            .is_some_and(|c| error.details["instance"] == c.id.as_str())
                    }) =>
            {
                self.wake.notify_one();
                Some(
                    "the hub no longer knows this instance; concord mcp is registering it \
                     again: call whoami to see the new instance id"
                        .into(),
                )
            }
            _ => None,
        }
    }

    fn describe(&self) -> Value {
        self.read(|s| {
            json!({
                "transport": "stdio",
                "hub": self.agent.urls(),
                "hub_reachable": s.unreachable.is_none(),
                "previous_instances": s.previous,
                "wants_primary": self.wants_primary(),
                "spool": self.agent.spool().map(|sp| json!({
                    "path": sp.path(),
                    "pending": sp.pending(),
                    "rejected_path": sp.rejected_path(),
                })),
            })
        })
    }

    fn last_role(&self) -> Option<Role> {
        self.read(|s| s.current.as_ref().map(|c| c.role))
    }
}

/// Sends what the spool holds, now that a heartbeat says the hub answers with
/// this session; reports on stderr what happened.
pub(crate) async fn replay(client: &Client) {
    if client.spool().is_none_or(|s| s.pending() == 0) {
        return;
    }
    let report = client.replay_spool().await;
    if report.delivered + report.rejected > 0 {
        eprintln!(
            "concord: spool replayed: {} delivered, {} rejected (see {})",
            report.delivered,
            report.rejected,
            client
                .spool()
                .map(|s| s.rejected_path().display().to_string())
                .unwrap_or_default()
        );
    }
    if let Some(e) = report.stopped {
        eprintln!("concord: spool replay paused: {e}");
    }
}

/// Opens the spool of this entity and label in `dir` (or the default directory),
/// and puts `client` in degraded mode with it. A directory that was named but
/// cannot be used is an error; with no directory to be found at all (no
/// `$XDG_STATE_HOME` nor `$HOME`) the client runs without a spool, and says so.
pub(crate) fn with_spool(
    who: &str,
    client: Client,
    dir: Option<&std::path::Path>,
    entity: &str,
    label: &str,
) -> Result<Client> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => match concord_client::spool::default_dir() {
            Some(d) => d,
            None => {
                eprintln!(
                    "concord {who}: no spool directory (set --spool-dir, $XDG_STATE_HOME or \
                     $HOME): writes made while the hub is unreachable fail instead of waiting"
                );
                return Ok(client);
            }
        },
    };
    let spool = concord_client::Spool::open(&dir, entity, label)
        .map_err(|e| anyhow!("cannot open the spool in {}: {e}", dir.display()))?;
    if spool.pending() > 0 {
        eprintln!(
            "concord {who}: {} spooled writes wait in {}; sent once the hub answers",
            spool.pending(),
            spool.path().display()
        );
    }
    Ok(client.with_spool(spool))
}

pub async fn run(args: McpArgs) -> Result<()> {
    let agent = with_spool(
        "mcp",
        args.conn.client()?,
        args.spool_dir.as_deref(),
        &args.entity,
        &args.label,
    )?;
    if agent.token().is_none() {
        return Err(anyhow!(
            "no token: pass --token (an agent token of the entity) or set CONCORD_TOKEN"
        ));
    }
    let bridge = Arc::new(Bridge {
        agent,
        hostname: crate::work::hostname(),
        args,
        state: RwLock::new(BridgeState::default()),
        wake: Notify::new(),
    });
    // A wrong token or entity is a configuration error worth failing on at once;
    // a hub that is not up yet is not: serve, and register when it answers.
    match bridge.register().await {
        Ok(()) => {}
        Err(e) if e.code == ErrorCode::Unavailable => bridge.note_unreachable(&e),
        Err(e) => return Err(anyhow!("cannot register with the hub: {e}")),
    }
    let (stop, stop_rx) = watch::channel(false);
    let presence = tokio::spawn(bridge.clone().presence(stop_rx));

    let handler = ConcordMcp::new(bridge.clone());
    let outcome = tokio::select! {
        served = handler.serve(rmcp::transport::stdio_pipes()) => match served {
            Ok(running) => {
                let ct = running.cancellation_token();
                let waiting = running.waiting();
                tokio::pin!(waiting);
                tokio::select! {
                    _ = &mut waiting => Ok(()),
                    _ = crate::work::shutdown_signal() => {
                        ct.cancel();
                        let _ = waiting.await;
                        Ok(())
                    }
                }
            }
            Err(e) => Err(anyhow!("MCP handshake on stdio failed: {e}")),
        },
        _ = crate::work::shutdown_signal() => Ok(()),
    };
    let _ = stop.send(true);
    let _ = presence.await;
    bridge.close().await;
    outcome
}
