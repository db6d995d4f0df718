//! The client commands. With no flags they find the local hub (`<data dir>/hub.url`,
//! else 127.0.0.1:7717) and the admin token (`<data dir>/admin.token`);
//! `CONCORD_URL` and `CONCORD_TOKEN` override, so one machine needs no setup.

use crate::output::{self, ago, opt, table};
use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use concord_client::Client;
use concord_client::StreamItem;
use concord_core::api::{CreateTokenRequest, Instance, Role, SendMessageRequest};
use concord_core::token::TokenKind;
use serde_json::Value;

#[derive(Args, Clone)]
pub struct Conn {
    /// Hub URL(s), comma-separated for a cluster. Default: $CONCORD_URL, the local hub.
    #[arg(long, global = true, env = "CONCORD_URL", value_delimiter = ',')]
    pub hub: Vec<String>,
    /// Bearer token. Default: $CONCORD_TOKEN, else the local admin token.
    #[arg(long, global = true, env = "CONCORD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    pub fn client(&self) -> Result<Client> {
        let dir = crate::serve::default_data_dir();
        let urls = if self.hub.is_empty() {
            let from_file = std::fs::read_to_string(dir.join("hub.url"))
                .ok()
                .map(|s| s.trim().to_string());
            vec![from_file
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "http://127.0.0.1:7717".into())]
        } else {
            self.hub.clone()
        };
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => std::fs::read_to_string(dir.join("admin.token"))
                .ok()
                .map(|s| s.trim().to_string()),
        };
        Client::new(urls, token).map_err(|e| anyhow!("{e}"))
    }
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Summary of the hub: backend, entities, live instances, ghosts.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// List instances.
    Instances {
        #[arg(long)]
        entity: Option<String>,
        #[arg(long)]
        role: Option<String>,
        /// live (default), expired, closed, all
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one entity: epoch, primary, live instances.
    Entity {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List ghosts (unlabelled instances, heartbeats from unknown or dead instances).
    Ghosts {
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Read and write an entity's fenced state.
    #[command(subcommand)]
    State(StateCmd),
    /// Publish an event: TOPIC and DATA (JSON; a bare word is a string).
    Publish {
        topic: String,
        data: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow events live (SSE), e.g. `concord tail 'crew.>' 'sys.primary.*'`.
    Tail {
        /// Patterns: `*` one word, `>` the rest. Default: everything.
        patterns: Vec<String>,
        /// Start after this seq (default: from now on).
        #[arg(long)]
        from: Option<i64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send a message: TO is instance:ID, entity:NAME, primary:NAME or cap:CAPABILITY.
    Send {
        to: String,
        subject: String,
        body: String,
        #[arg(long)]
        thread: Option<String>,
        #[arg(long)]
        ack_required: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Work-queue tasks.
    #[command(subcommand)]
    Task(crate::task_cli::TaskCmd),
    /// Counts per state for every queue.
    Queues {
        #[command(flatten)]
        conn: Conn,
    },
    /// Recurring schedules that enqueue tasks.
    #[command(subcommand)]
    Schedule(crate::task_cli::ScheduleCmd),
    /// One command to many agents, one answer back (quorum and reducer).
    Dispatch(crate::dispatch_cli::DispatchArgs),
    /// Report an outcome of a call to a subject (shared circuit breakers).
    Observe(crate::coordination_cli::ObserveArgs),
    /// Shared circuit breakers.
    #[command(subcommand)]
    Breaker(crate::coordination_cli::BreakerCmd),
    /// Resource leases (exclusive or shared, names or path globs).
    #[command(subcommand)]
    Lease(crate::coordination_cli::LeaseCmd),
    /// Run a command once per task of a queue: `concord work QUEUE -- CMD ARGS…`.
    Work(crate::work::WorkArgs),
    /// Read this instance's inbox (needs the instance's session token).
    Inbox {
        /// Wait up to 30 s for a message.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long)]
        unacked: bool,
        /// Ack what was read.
        #[arg(long)]
        ack: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a memory: `concord remember shared:providers "kimi drops requests at 03:00"`.
    Remember {
        /// entity:NAME, instance:ins_… or shared:NAME.
        space: String,
        text: String,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// private, entity, circle:NAME or public.
        #[arg(long)]
        visibility: Option<String>,
        #[arg(long)]
        fence: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Recall memories (with provenance and age).
    Recall {
        query: String,
        #[arg(long = "space")]
        spaces: Vec<String>,
        #[arg(long)]
        trusted_only: bool,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        conn: Conn,
    },
    /// Read, list the versions of, or forget a memory.
    #[command(subcommand)]
    Memory(crate::memory_cli::MemoryCmd),
    /// Diff a fork against canonical memory, promote its memories.
    #[command(subcommand)]
    Fork(crate::memory_cli::ForkCmd),
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token; prints its secret once.
    Create {
        /// admin, agent or reader
        #[arg(long)]
        kind: String,
        #[arg(long)]
        entity: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    List {
        #[command(flatten)]
        conn: Conn,
    },
    Revoke {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum StateCmd {
    /// Print one key, or every key of the entity.
    Get {
        entity: String,
        key: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a key: VALUE is JSON (a bare word is taken as a string).
    Set {
        entity: String,
        key: String,
        value: String,
        #[arg(long)]
        fence: Option<u64>,
        #[arg(long)]
        if_revision: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
    Delete {
        entity: String,
        key: String,
        #[arg(long)]
        fence: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
}

pub fn e(err: concord_core::Error) -> anyhow::Error {
    anyhow!("{} ({})", err.message, err.code.as_str())
}

fn instance_rows(list: &[Instance], primary: Option<&str>) -> Vec<Vec<String>> {
    list.iter()
        .map(|i| {
            let mut role = i.role.as_str().to_string();
            if primary == Some(i.id.as_str()) {
                role = "primary".into();
            }
            if i.persistent {
                role.push_str(" (persistent)");
            }
            if i.role != Role::Primary && i.is_unlabeled() {
                role.push_str(" GHOST");
            }
            vec![
                i.id.clone(),
                i.entity.clone(),
                role,
                opt(&i.label),
                i.state.as_str().into(),
                opt(&i.host),
                opt(&i.version),
                ago(i.last_seen_at.millis()),
            ]
        })
        .collect()
}

const INSTANCE_HEADER: &[&str] = &[
    "ID", "ENTITY", "ROLE", "LABEL", "STATE", "HOST", "VERSION", "SEEN",
];

pub async fn run(cmd: ClientCommand) -> Result<()> {
    match cmd {
        ClientCommand::Status { conn } => {
            let c = conn.client()?;
            let s = c.status().await.map_err(e)?;
            if conn.json {
                return output::json(&s);
            }
            let ents = c.entities().await.map_err(e)?;
            println!(
                "hub {} ({} store, up {}s) at {}",
                s.version,
                s.backend,
                s.uptime_ms / 1000,
                c.urls().join(", ")
            );
            println!(
                "{} entities, {} live instances, {} ghosts",
                s.entities, s.live_instances, s.ghosts
            );
            let rows: Vec<Vec<String>> = ents
                .entities
                .iter()
                .map(|x| {
                    vec![
                        x.name.clone(),
                        x.epoch.to_string(),
                        opt(&x.primary),
                        x.live_instances.to_string(),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                println!();
                table(&["ENTITY", "EPOCH", "PRIMARY", "LIVE"], &rows);
            }
        }
        ClientCommand::Instances {
            entity,
            role,
            state,
            conn,
        } => {
            let role = match role.as_deref() {
                None => None,
                Some(r) => Some(
                    Role::parse(r)
                        .ok_or_else(|| anyhow!("--role must be primary, secondary or fork"))?,
                ),
            };
            let list = conn
                .client()?
                .list_instances(entity.as_deref(), role, state.as_deref())
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&list);
            }
            table(INSTANCE_HEADER, &instance_rows(&list.instances, None));
        }
        ClientCommand::Entity { name, conn } => {
            let d = conn.client()?.entity(&name).await.map_err(e)?;
            if conn.json {
                return output::json(&d);
            }
            println!("entity {}  epoch {}", d.name, d.epoch);
            match &d.primary {
                Some(p) => println!("primary {} ({})", p.id, opt(&p.label)),
                None => println!("primary: none"),
            }
            println!();
            table(
                INSTANCE_HEADER,
                &instance_rows(&d.instances, d.primary.as_ref().map(|p| p.id.as_str())),
            );
        }
        ClientCommand::Ghosts { conn } => {
            let g = conn.client()?.ghosts().await.map_err(e)?;
            if conn.json {
                return output::json(&g);
            }
            let rows: Vec<Vec<String>> = g
                .ghosts
                .iter()
                .map(|x| {
                    vec![
                        opt(&x.instance),
                        opt(&x.entity),
                        x.reason.clone(),
                        opt(&x.host),
                        ago(x.seen_at.millis()),
                    ]
                })
                .collect();
            table(&["INSTANCE", "ENTITY", "REASON", "HOST", "SEEN"], &rows);
        }
        ClientCommand::Publish { topic, data, conn } => {
            let p = conn
                .client()?
                .publish(&topic, parse_value(&data))
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&p);
            }
            println!("published {topic} at seq {}", p.seq);
        }
        ClientCommand::Tail {
            patterns,
            from,
            count,
            conn,
        } => tail(patterns, from, count, conn).await?,
        ClientCommand::Send {
            to,
            subject,
            body,
            thread,
            ack_required,
            conn,
        } => {
            let req = SendMessageRequest {
                to,
                subject,
                body: parse_value(&body),
                thread_id: thread,
                ack_required,
            };
            let m = conn.client()?.send_message(&req).await.map_err(e)?;
            if conn.json {
                return output::json(&m);
            }
            println!(
                "sent {} (thread {}) to {}",
                m.id,
                m.thread_id,
                m.delivered_to.join(", ")
            );
        }
        ClientCommand::Inbox {
            wait,
            after,
            unacked,
            ack,
            conn,
        } => {
            let c = conn.client()?;
            let page = c
                .inbox(after, 100, if wait { 30_000 } else { 0 }, unacked)
                .await
                .map_err(e)?;
            if ack {
                for m in &page.messages {
                    c.ack(&m.id).await.map_err(e)?;
                }
            }
            if conn.json {
                return output::json(&page);
            }
            let rows: Vec<Vec<String>> = page
                .messages
                .iter()
                .map(|m| {
                    vec![
                        m.cursor.to_string(),
                        m.id.clone(),
                        opt(&m.from.instance),
                        m.subject.clone(),
                        m.body.to_string(),
                        if m.acked || ack {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                        ago(m.created_at.millis()),
                    ]
                })
                .collect();
            table(
                &["CURSOR", "ID", "FROM", "SUBJECT", "BODY", "ACKED", "SENT"],
                &rows,
            );
        }
        ClientCommand::Task(t) => crate::task_cli::task(t).await?,
        ClientCommand::Queues { conn } => crate::task_cli::queues(conn).await?,
        ClientCommand::Schedule(s) => crate::task_cli::schedule(s).await?,
        ClientCommand::Work(w) => crate::work::run(w).await?,
        ClientCommand::Dispatch(d) => crate::dispatch_cli::run(d).await?,
        ClientCommand::Observe(o) => crate::coordination_cli::observe(o).await?,
        ClientCommand::Breaker(b) => crate::coordination_cli::breaker(b).await?,
        ClientCommand::Lease(l) => crate::coordination_cli::lease(l).await?,
        ClientCommand::Token(t) => token(t).await?,
        ClientCommand::State(s) => state(s).await?,
        ClientCommand::Remember {
            space,
            text,
            kind,
            tags,
            visibility,
            fence,
            conn,
        } => {
            let r = crate::memory_cli::Remember {
                space,
                text,
                kind,
                tags,
                visibility,
                fence,
            };
            crate::memory_cli::remember(r, &conn).await?
        }
        ClientCommand::Recall {
            query,
            spaces,
            trusted_only,
            limit,
            conn,
        } => crate::memory_cli::recall(query, spaces, trusted_only, limit, &conn).await?,
        ClientCommand::Memory(m) => crate::memory_cli::memory(m).await?,
        ClientCommand::Fork(f) => crate::memory_cli::fork(f).await?,
    }
    Ok(())
}

async fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            kind,
            entity,
            name,
            conn,
        } => {
            let kind = TokenKind::parse(&kind)
                .filter(|k| *k != TokenKind::Session)
                .ok_or_else(|| anyhow!("--kind must be admin, agent or reader"))?;
            let t = conn
                .client()?
                .create_token(&CreateTokenRequest { kind, entity, name })
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&t);
            }
            println!(
                "created {} token {}{}",
                t.kind.as_str(),
                t.id,
                t.entity.map(|e| format!(" for {e}")).unwrap_or_default()
            );
            println!("secret (shown once): {}", t.token);
        }
        TokenCmd::List { conn } => {
            let l = conn.client()?.list_tokens().await.map_err(e)?;
            if conn.json {
                return output::json(&l);
            }
            let rows: Vec<Vec<String>> = l
                .tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.kind.as_str().into(),
                        opt(&t.entity),
                        opt(&t.name),
                        t.created_at.to_rfc3339(),
                    ]
                })
                .collect();
            table(&["ID", "KIND", "ENTITY", "NAME", "CREATED"], &rows);
        }
        TokenCmd::Revoke { id, conn } => {
            let r = conn.client()?.revoke_token(&id).await.map_err(e)?;
            if conn.json {
                return output::json(&r);
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

pub fn parse_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

async fn state(cmd: StateCmd) -> Result<()> {
    match cmd {
        StateCmd::Get {
            entity,
            key: Some(key),
            conn,
        } => {
            let s = conn.client()?.get_state(&entity, &key).await.map_err(e)?;
            if conn.json {
                return output::json(&s);
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&s.value).context("value")?
            );
            eprintln!(
                "revision {} by {} at {}",
                s.revision,
                s.updated_by,
                s.updated_at.to_rfc3339()
            );
        }
        StateCmd::Get {
            entity,
            key: None,
            conn,
        } => {
            let l = conn.client()?.list_state(&entity).await.map_err(e)?;
            if conn.json {
                return output::json(&l);
            }
            let rows: Vec<Vec<String>> = l
                .entries
                .iter()
                .map(|s| {
                    vec![
                        s.key.clone(),
                        s.value.to_string(),
                        s.revision.to_string(),
                        s.updated_by.clone(),
                    ]
                })
                .collect();
            table(&["KEY", "VALUE", "REVISION", "UPDATED BY"], &rows);
        }
        StateCmd::Set {
            entity,
            key,
            value,
            fence,
            if_revision,
            conn,
        } => {
            let s = conn
                .client()?
                .put_state(&entity, &key, parse_value(&value), fence, if_revision)
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&s);
            }
            println!("{entity}/{key} = {} (revision {})", s.value, s.revision);
        }
        StateCmd::Delete {
            entity,
            key,
            fence,
            conn,
        } => {
            let d = conn
                .client()?
                .delete_state(&entity, &key, fence)
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&d);
            }
            println!("{}", if d.deleted { "deleted" } else { "no such key" });
        }
    }
    Ok(())
}

async fn tail(
    patterns: Vec<String>,
    from: Option<i64>,
    count: Option<usize>,
    conn: Conn,
) -> Result<()> {
    let c = conn.client()?;
    let topics = if patterns.is_empty() {
        ">".to_string()
    } else {
        patterns.join(",")
    };
    let from = match from {
        Some(f) => f,
        None => c.status().await.map_err(e)?.last_event_seq,
    };
    let mut last = from;
    let mut seen = 0usize;
    loop {
        let mut stream = match c.stream_events(&topics, None, Some(last)).await {
            Ok(s) => s,
            Err(err) if err.code == concord_core::ErrorCode::Unavailable => {
                eprintln!("tail: {}; retrying", err.message);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(err) => return Err(e(err)),
        };
        loop {
            match stream.next().await {
                Ok(Some(StreamItem::Event(ev))) => {
                    last = ev.seq;
                    if conn.json {
                        println!("{}", serde_json::to_string(&ev)?);
                    } else {
                        let who = ev
                            .source
                            .instance
                            .clone()
                            .or(ev.source.token.clone())
                            .unwrap_or_else(|| "hub".into());
                        println!(
                            "{:>8}  {}  {:<28} {:<30} {}",
                            ev.seq,
                            ev.time.to_rfc3339(),
                            ev.topic,
                            who,
                            ev.data
                        );
                    }
                    seen += 1;
                    if count.is_some_and(|n| seen >= n) {
                        return Ok(());
                    }
                }
                Ok(Some(StreamItem::Error(err))) => return Err(e(err)),
                // The hub closed or the connection broke: resume from the last seq.
                Ok(None) | Err(_) => break,
            }
        }
    }
}
