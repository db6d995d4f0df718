//! `concord up FLEET.toml`, `concord down FLEET.toml`, `concord ps`: a host's
//! agents declared in one file.
//!
//! Supervision model: `up` starts one detached `concord run` supervisor per agent
//! (its own session, so it outlives `up` and the terminal) and records it under
//! `<home_root>/.concord-fleet/`: `<entity>--<slug>.agent.json` (written by `up`:
//! the spec it was started with, the supervisor's pid, the fleet file) beside
//! `<entity>--<slug>.state.json` (written by the supervisor: process, port,
//! instance). Each supervisor restarts its own child, so nothing central has to
//! stay up; `up` again compares the file with these records and touches only what
//! differs; `down` signals the supervisors, which stop their children and close
//! their instances; `ps` joins the records with the hub's view of each instance.
//!
//! Everything that can be checked is checked before anything starts (the file,
//! programs, homes, the hub and token), and agents started by an `up` that then
//! fails to come up are stopped again, so an `up` either applies or says why not.

use crate::cli::Conn;
use crate::output;
use crate::run::{self, write_atomic};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use concord_client::Client;
use concord_core::api::PutScheduleRequest;
use concord_core::fleet::{self, AgentSpec, FleetFile, PortRange};
use concord_core::ErrorCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The directory of the records, under the home root.
const REGISTRY: &str = ".concord-fleet";

#[derive(Args)]
pub struct UpArgs {
    /// The fleet file (TOML).
    pub file: PathBuf,
    /// How long to wait for the agents started to be up before giving up on them.
    #[arg(long, default_value_t = 30_000)]
    pub wait_ms: u64,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct DownArgs {
    /// The fleet file whose agents to stop.
    pub file: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct PsArgs {
    /// Only this fleet file's agents (and its home_root).
    pub file: Option<PathBuf>,
    /// Where the agents' homes are (default: the fleet file's, else `<data dir>/agents`).
    #[arg(long)]
    pub home_root: Option<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

/// A fleet file read, checked and resolved against its own directory.
struct Fleet {
    /// Canonical path: the fleet's identity in the records.
    path: PathBuf,
    file: FleetFile,
    range: PortRange,
    home_root: PathBuf,
    registry: PathBuf,
}

/// `line:column` (1-based) of a byte offset, as editors count.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Reads and checks a fleet file: syntax and types (with line and column), then
/// the rules of `FleetFile::validate` (naming the field).
fn load(path: &Path) -> Result<Fleet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the fleet file {}", path.display()))?;
    let file: FleetFile = toml::from_str(&text).map_err(|e| match e.span() {
        Some(span) => {
            let (line, col) = line_col(&text, span.start);
            anyhow!(
                "{}:{line}:{col}: {} (line {line}, column {col})",
                path.display(),
                e.message().trim_end()
            )
        }
        None => anyhow!("{}: {}", path.display(), e.message().trim_end()),
    })?;
    let range = file.validate().map_err(|e| {
        let field = e.details["field"].as_str().unwrap_or("").to_string();
        anyhow!("{}: {field}: {}", path.display(), e.message)
    })?;
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let home_root = match &file.home_root {
        Some(r) => dir.join(expand_home(r)),
        None => run::default_home_root(),
    };
    let registry = home_root.join(REGISTRY);
    Ok(Fleet {
        path,
        file,
        range,
        home_root,
        registry,
    })
}

/// `~/x` → `$HOME/x`, the one expansion people expect in a config file.
fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

impl Fleet {
    fn key(a: &AgentSpec) -> Result<String> {
        Ok(format!(
            "{}--{}",
            a.entity,
            fleet::slug("label", &a.label).map_err(crate::cli::e)?
        ))
    }

    fn home(&self, a: &AgentSpec) -> Result<PathBuf> {
        run::home_of(&self.home_root, &a.entity, &a.label)
    }

    /// The hub(s) and token the supervisors use: the file's, else the CLI's.
    fn conn(&self, conn: &Conn) -> Result<Conn> {
        let mut c = conn.clone();
        if !self.file.hub.is_empty() {
            c.hub = self.file.hub.clone();
        }
        if let Some(t) = &self.file.token_file {
            c.token = Some(self.read_token(t)?);
        }
        Ok(c)
    }

    /// A token file, relative to the fleet file's directory.
    fn read_token(&self, file: &str) -> Result<String> {
        let p = self
            .path
            .parent()
            .unwrap_or(Path::new("/"))
            .join(expand_home(file));
        let token = std::fs::read_to_string(&p)
            .with_context(|| format!("token_file: cannot read {}", p.display()))?;
        Ok(token.trim().to_string())
    }

    /// An agent's program as `concord run` gets it: a relative path is taken
    /// from the fleet file's directory, a bare name from PATH.
    fn program(&self, a: &AgentSpec) -> Result<PathBuf> {
        let p = &a.command[0];
        let resolved = if p.contains('/') && !p.starts_with('/') {
            let dir = self.path.parent().unwrap_or(Path::new("/"));
            run::resolve_program(&dir.join(expand_home(p)).to_string_lossy())
        } else {
            run::resolve_program(&expand_home(p).to_string_lossy())
        };
        resolved.with_context(|| format!("agent {}/{}", a.entity, a.label))
    }

    /// What identifies a running agent's configuration: its spec plus the
    /// fleet-wide settings it was started with. A change restarts it.
    fn spec(&self, a: &AgentSpec, hub: &[String]) -> String {
        json!({
            "agent": a,
            "hub": hub,
            "home_root": self.home_root,
            "port_range": self.range.to_string(),
            "ttl_ms": a.ttl_ms.or(self.file.ttl_ms),
        })
        .to_string()
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.registry.join(format!("{key}.agent.json"))
    }

    fn state_path(&self, key: &str) -> PathBuf {
        self.registry.join(format!("{key}.state.json"))
    }

    fn fleet_record_path(&self) -> PathBuf {
        self.registry.join(format!(
            "fleet-{:016x}.json",
            fnv1a(self.path.to_string_lossy().as_bytes())
        ))
    }
}

/// A stable short name for a path (no hash crate for one file name).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// One `.agent.json` record.
#[derive(Clone)]
struct Record {
    key: String,
    doc: Value,
    path: PathBuf,
}

impl Record {
    fn pid(&self) -> Option<i32> {
        self.doc["supervisor_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
    }
    fn state_file(&self) -> PathBuf {
        PathBuf::from(self.doc["state_file"].as_str().unwrap_or_default())
    }
    fn fleet(&self) -> &str {
        self.doc["fleet"].as_str().unwrap_or_default()
    }
    /// Whether its supervisor still runs (and is ours: a recycled pid is not).
    fn alive(&self) -> bool {
        self.pid()
            .is_some_and(|pid| supervisor_alive(pid, &self.state_file()))
    }
}

fn records(registry: &Path) -> Vec<Record> {
    let Ok(dir) = std::fs::read_dir(registry) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".agent.json")?.to_string();
            let doc = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some(Record {
                key,
                doc,
                path: e.path(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// A live process (not a zombie) whose command line is `concord run` with this
/// state file.
fn supervisor_alive(pid: i32, state_file: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state is the field after the parenthesized command name.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    if state.is_none_or(|s| s == "Z" || s == "X") {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let wanted = state_file.as_os_str().as_encoded_bytes();
    args.iter().any(|a| *a == b"run") && args.contains(&wanted)
}

fn read_json(path: &Path) -> Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// The `concord run` command line of an agent.
fn run_argv(
    fleet: &Fleet,
    a: &AgentSpec,
    program: &Path,
    hub: &[String],
    key: &str,
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "run".into(),
        "--entity".into(),
        a.entity.clone(),
        "--label".into(),
        a.label.clone(),
        "--role".into(),
        a.role.clone(),
        "--home-root".into(),
        fleet.home_root.to_string_lossy().into_owned(),
        "--port".into(),
        a.port.to_string(),
        "--port-range".into(),
        fleet.range.to_string(),
        "--restart".into(),
        a.restart.as_str().into(),
        "--state-file".into(),
        fleet.state_path(key).to_string_lossy().into_owned(),
    ];
    if !a.capabilities.is_empty() {
        v.push(format!("--capabilities={}", a.capabilities.join(",")));
    }
    if let Some(n) = a.max_restarts {
        v.extend(["--max-restarts".into(), n.to_string()]);
    }
    if let Some(ttl) = a.ttl_ms.or(fleet.file.ttl_ms) {
        v.extend(["--ttl-ms".into(), ttl.to_string()]);
    }
    if let Some(g) = a.grace_ms {
        v.extend(["--grace-ms".into(), g.to_string()]);
    }
    if let Some(h) = &a.health {
        if let Some(u) = &h.url {
            v.extend(["--health-url".into(), u.clone()]);
        }
        if let Some(c) = &h.cmd {
            v.extend(["--health-cmd".into(), c.clone()]);
        }
        if let Some(i) = h.interval_ms {
            v.extend(["--health-interval-ms".into(), i.to_string()]);
        }
        if let Some(f) = h.failures {
            v.extend(["--health-failures".into(), f.to_string()]);
        }
    }
    if !hub.is_empty() {
        v.push(format!("--hub={}", hub.join(",")));
    }
    v.push("--".into());
    v.push(program.to_string_lossy().into_owned());
    v.extend(a.command[1..].iter().cloned());
    v
}

/// Holds `<registry>/lock` (flock) while an `up` or `down` changes the records,
/// so two of them at once cannot start an agent twice. Released when dropped.
fn lock_registry(registry: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = registry.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `concord up` or `concord down` is changing the agents of {} right now",
            registry.parent().unwrap_or(registry).display()
        );
    }
    Ok(f)
}

/// A supervisor started by this `up`, kept until it is known to be up.
struct Started {
    key: String,
    child: std::process::Child,
    state_file: PathBuf,
    record: PathBuf,
    log: PathBuf,
}

/// Starts `concord run` for one agent, detached: its own session, stdin closed,
/// its notes appended to `<home>/logs/supervisor.log`. The token and the agent's
/// environment go through the environment, never the command line (`ps` shows it).
fn start_agent(
    fleet: &Fleet,
    a: &AgentSpec,
    program: &Path,
    conn: &Conn,
    spec: &str,
) -> Result<Started> {
    let key = Fleet::key(a)?;
    let home = fleet.home(a)?;
    let log_path = home.join("logs").join("supervisor.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the concord binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(run_argv(fleet, a, program, &conn.hub, &key))
        .envs(&a.env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let token = match &a.token_file {
        Some(f) => Some(fleet.read_token(f)?),
        None => conn.token.clone(),
    };
    match token {
        Some(t) => cmd.env("CONCORD_TOKEN", t),
        None => cmd.env_remove("CONCORD_TOKEN"),
    };
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from our
    // terminal and process group so it outlives `up`.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let state_file = fleet.state_path(&key);
    // A state file of an earlier run is kept (it remembers the port) but must not
    // be mistaken for this run's progress.
    let mut previous = read_json(&state_file);
    if previous.is_object() {
        previous["instance"] = Value::Null;
        previous["process"]["state"] = json!("starting");
        let _ = write_atomic(&state_file, &previous);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start the supervisor of {}/{}", a.entity, a.label))?;
    let record = fleet.record_path(&key);
    write_atomic(
        &record,
        &json!({
            "fleet": fleet.path,
            "entity": a.entity,
            "label": a.label,
            "role": a.role,
            "spec": spec,
            "supervisor_pid": child.id(),
            "home": home,
            "state_file": state_file,
            "started_at": chrono::Utc::now().to_rfc3339(),
        }),
    )
    .with_context(|| format!("cannot write {}", record.display()))?;
    Ok(Started {
        key,
        child,
        state_file,
        record,
        log: log_path,
    })
}

/// Waits until every supervisor reports its child running and registered (or
/// gives up on it); returns the failures as (key, why).
fn wait_up(started: &mut [Started], deadline: Instant) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    let mut pending: Vec<usize> = (0..started.len()).collect();
    while !pending.is_empty() {
        pending.retain(|&i| {
            let s = &mut started[i];
            let st = read_json(&s.state_file);
            if st["process"]["state"] == "running" && st["instance"].is_string() {
                return false;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                if status.success() {
                    // A one-shot agent that ran and finished well.
                    return false;
                }
                let why = st["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| last_line(&s.log).unwrap_or_else(|| status.to_string()));
                failed.push((s.key.clone(), why));
                return false;
            }
            if Instant::now() > deadline {
                failed.push((
                    s.key.clone(),
                    format!(
                        "not up in time (process {}, hub {}); see {}",
                        st["process"]["state"].as_str().unwrap_or("starting"),
                        st["hub"].as_str().unwrap_or("not registered"),
                        s.log.display()
                    ),
                ));
                return false;
            }
            true
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    failed
}

fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("error: ").to_string())
}

/// SIGTERM to a supervisor, then wait for it to stop its child and close its
/// instance; past `timeout`, SIGKILL (its child dies with it) and close the
/// instance here.
async fn stop_supervisor(rec: &Record, client: &Client, timeout: Duration) -> String {
    let Some(pid) = rec.pid().filter(|_| rec.alive()) else {
        // A supervisor killed outright left its instance to expire: close it now.
        if let Some(id) = read_json(&rec.state_file())["instance"].as_str() {
            let _ = client.close_instance(id).await;
        }
        return "not running".into();
    };
    // SAFETY: kill(2) on a pid just checked to be this agent's supervisor.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + timeout;
    while rec.alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if !rec.alive() {
        return "stopped".into();
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = read_json(&rec.state_file());
    if let Some(id) = st["instance"].as_str() {
        let _ = client.close_instance(id).await;
    }
    "killed (did not stop in time)".into()
}

/// How long a supervisor may take to stop: its child's grace period and a margin.
fn stop_timeout(doc: &Value) -> Duration {
    let spec: Value = doc["spec"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let grace = spec["agent"]["grace_ms"].as_u64().unwrap_or(10_000);
    Duration::from_millis(grace + 5_000)
}

fn remove_record(rec: &Record) {
    let _ = std::fs::remove_file(&rec.path);
}

pub async fn up(args: UpArgs) -> Result<()> {
    let fleet = load(&args.file)?;
    let conn = fleet.conn(&args.conn)?;
    // Every check that can fail, before anything changes.
    let mut programs = BTreeMap::new();
    for a in &fleet.file.agents {
        programs.insert(Fleet::key(a)?, fleet.program(a)?);
    }
    for a in &fleet.file.agents {
        if let Some(f) = &a.token_file {
            fleet
                .read_token(f)
                .with_context(|| format!("agent {}/{}", a.entity, a.label))?;
        }
        run::make_home(&fleet.home(a)?)?;
    }
    std::fs::create_dir_all(&fleet.registry)
        .with_context(|| format!("cannot create {}", fleet.registry.display()))?;
    let _lock = lock_registry(&fleet.registry)?;
    let client = conn.client()?;
    if client.token().is_none() {
        bail!("no token: set token_file in the fleet file, pass --token or set CONCORD_TOKEN");
    }
    // A hub that starts with the machine may not answer yet: wait for it (within
    // --wait-ms), but fail at once on a wrong token.
    let hub_deadline = Instant::now() + Duration::from_millis(args.wait_ms);
    loop {
        match client.whoami().await {
            Ok(_) => break,
            Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < hub_deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => bail!(
                "the hub at {}: {} ({})",
                client.urls().join(","),
                e.message,
                e.code.as_str()
            ),
        }
    }
    let all = records(&fleet.registry);
    let mine: Vec<&Record> = all
        .iter()
        .filter(|r| r.fleet() == fleet.path.to_string_lossy())
        .collect();
    for a in &fleet.file.agents {
        let key = Fleet::key(a)?;
        if let Some(other) = all
            .iter()
            .find(|r| r.key == key && r.fleet() != fleet.path.to_string_lossy() && r.alive())
        {
            bail!(
                "agent {}/{} already runs from another fleet file ({}) in {}",
                a.entity,
                a.label,
                other.fleet(),
                fleet.home_root.display()
            );
        }
    }

    let desired: BTreeMap<String, String> = fleet
        .file
        .agents
        .iter()
        .map(|a| Ok((Fleet::key(a)?, fleet.spec(a, &conn.hub))))
        .collect::<Result<_>>()?;
    let running: BTreeMap<String, String> = mine
        .iter()
        .filter(|r| r.alive())
        .map(|r| {
            (
                r.key.clone(),
                r.doc["spec"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let plan = fleet::plan(&desired, &running);

    // Schedules: create or replace those of the file, remove those it dropped.
    let fleet_record = read_json(&fleet.fleet_record_path());
    for s in &fleet.file.schedules {
        client
            .put_schedule(
                &s.name,
                &PutScheduleRequest {
                    queue: s.queue.clone(),
                    payload: s.payload.clone(),
                    every_ms: s.every_ms,
                    cron: s.cron.clone(),
                    priority: s.priority,
                    requires: s.requires.clone(),
                    max_attempts: s.max_attempts,
                },
            )
            .await
            .map_err(|e| anyhow!("schedule {}: {} ({})", s.name, e.message, e.code.as_str()))?;
    }
    let names: Vec<&str> = fleet
        .file
        .schedules
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    for old in fleet_record["schedules"].as_array().into_iter().flatten() {
        if let Some(old) = old.as_str().filter(|o| !names.contains(o)) {
            let _ = client.delete_schedule(old).await;
        }
    }

    let by_key: BTreeMap<&str, &Record> = mine.iter().map(|r| (r.key.as_str(), *r)).collect();
    for key in plan.stop.iter().chain(&plan.restart) {
        if let Some(rec) = by_key.get(key.as_str()) {
            let how = stop_supervisor(rec, &client, stop_timeout(&rec.doc)).await;
            eprintln!("concord up: {key}: {how}");
            if plan.stop.contains(key) {
                remove_record(rec);
            }
        }
    }
    // Records of agents whose supervisors died and that the file dropped.
    for rec in mine.iter().filter(|r| !desired.contains_key(&r.key)) {
        remove_record(rec);
    }

    let mut started = Vec::new();
    let mut failure = None;
    for a in &fleet.file.agents {
        let key = Fleet::key(a)?;
        if !plan.start.contains(&key) && !plan.restart.contains(&key) {
            continue;
        }
        match start_agent(&fleet, a, &programs[&key], &conn, &desired[&key]) {
            Ok(s) => started.push(s),
            Err(e) => {
                failure = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let mut failed = wait_up(
        &mut started,
        Instant::now() + Duration::from_millis(args.wait_ms),
    );
    if let Some(f) = failure {
        failed.push(("(start)".into(), f));
    }
    if !failed.is_empty() {
        // Nothing half-started: what this `up` started goes down again.
        for s in &mut started {
            let rec = Record {
                key: s.key.clone(),
                doc: read_json(&s.record),
                path: s.record.clone(),
            };
            let _ = stop_supervisor(&rec, &client, stop_timeout(&rec.doc)).await;
            let _ = s.child.kill();
            let _ = s.child.wait();
            remove_record(&rec);
        }
        let lines: Vec<String> = failed
            .iter()
            .map(|(k, why)| format!("  {k}: {why}"))
            .collect();
        bail!(
            "the fleet did not come up; the agents this `up` started were stopped again:\n{}",
            lines.join("\n")
        );
    }
    // `up` does not wait for the supervisors it started: they belong to the host.
    for mut s in started {
        let _ = s.child.try_wait();
    }
    write_atomic(
        &fleet.fleet_record_path(),
        &json!({"fleet": fleet.path, "schedules": names}),
    )
    .with_context(|| format!("cannot write {}", fleet.fleet_record_path().display()))?;

    let summary = json!({
        "started": plan.start,
        "restarted": plan.restart,
        "stopped": plan.stop,
        "unchanged": plan.keep,
        "schedules": names,
    });
    if args.conn.json {
        output::json(&summary)?;
    } else {
        for (what, keys) in [
            ("started", &plan.start),
            ("restarted", &plan.restart),
            ("stopped", &plan.stop),
            ("unchanged", &plan.keep),
        ] {
            if !keys.is_empty() {
                println!("{what}: {}", keys.join(", "));
            }
        }
        if !names.is_empty() {
            println!("schedules: {}", names.join(", "));
        }
    }
    Ok(())
}

pub async fn down(args: DownArgs) -> Result<()> {
    // The records say what runs; the file only says where they are. So `down`
    // works even after the file was edited (or broken).
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read the fleet file {}", args.file.display()))?;
    let fleet = match load(&args.file) {
        Ok(f) => f,
        Err(e) => {
            // Still find home_root if the rest is broken: a file that parses.
            let file: FleetFile = toml::from_str(&text).map_err(|_| e)?;
            let path = std::fs::canonicalize(&args.file)?;
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let home_root = file
                .home_root
                .as_deref()
                .map(|r| dir.join(expand_home(r)))
                .unwrap_or_else(run::default_home_root);
            Fleet {
                registry: home_root.join(REGISTRY),
                home_root,
                path,
                range: fleet::DEFAULT_PORT_RANGE,
                file,
            }
        }
    };
    let conn = fleet.conn(&args.conn)?;
    let client = conn.client()?;
    let _lock = match fleet.registry.exists() {
        true => Some(lock_registry(&fleet.registry)?),
        false => None,
    };
    let mine: Vec<Record> = records(&fleet.registry)
        .into_iter()
        .filter(|r| r.fleet() == fleet.path.to_string_lossy())
        .collect();
    let stops = mine.iter().map(|rec| {
        let client = client.clone();
        async move {
            let how = stop_supervisor(rec, &client, stop_timeout(&rec.doc)).await;
            remove_record(rec);
            (rec.key.clone(), how)
        }
    });
    let results = futures::future::join_all(stops).await;
    let fleet_record = read_json(&fleet.fleet_record_path());
    let mut schedules = Vec::new();
    for name in fleet_record["schedules"].as_array().into_iter().flatten() {
        if let Some(name) = name.as_str() {
            match client.delete_schedule(name).await {
                Ok(_) => schedules.push(name.to_string()),
                Err(e) => eprintln!("concord down: schedule {name}: {}", e.message),
            }
        }
    }
    let _ = std::fs::remove_file(fleet.fleet_record_path());
    if args.conn.json {
        let agents: Vec<Value> = results
            .iter()
            .map(|(k, how)| json!({"agent": k, "result": how}))
            .collect();
        output::json(&json!({"agents": agents, "schedules_removed": schedules}))?;
    } else {
        for (k, how) in &results {
            println!("{k}: {how}");
        }
        if !schedules.is_empty() {
            println!("schedules removed: {}", schedules.join(", "));
        }
    }
    Ok(())
}

pub async fn ps(args: PsArgs) -> Result<()> {
    let (registry, only, conn) = match &args.file {
        Some(f) => {
            let fleet = load(f)?;
            let conn = fleet.conn(&args.conn)?;
            let root = args.home_root.clone().unwrap_or(fleet.home_root.clone());
            (root.join(REGISTRY), Some(fleet.path), conn)
        }
        None => (
            args.home_root
                .clone()
                .unwrap_or_else(run::default_home_root)
                .join(REGISTRY),
            None,
            args.conn.clone(),
        ),
    };
    let client = conn.client()?;
    let mut rows = Vec::new();
    for rec in records(&registry) {
        if only
            .as_ref()
            .is_some_and(|p| rec.fleet() != p.to_string_lossy())
        {
            continue;
        }
        let st = read_json(&rec.state_file());
        let alive = rec.alive();
        let process = if alive {
            st["process"]["state"]
                .as_str()
                .unwrap_or("starting")
                .to_string()
        } else if st["process"]["state"] == "exited" {
            // The child ended for good (per its restart policy) and so did its supervisor.
            "exited".to_string()
        } else {
            "stopped".to_string()
        };
        let instance = st["instance"].as_str().map(str::to_string);
        let (presence, role) = match &instance {
            Some(id) => match client.get_instance(id).await {
                Ok(i) => (i.state.as_str().to_string(), i.role.as_str().to_string()),
                Err(e) if e.code == ErrorCode::Unavailable => (
                    "hub unreachable".into(),
                    rec.doc["role"].as_str().unwrap_or("").into(),
                ),
                Err(e) => (
                    e.code.as_str().to_string(),
                    rec.doc["role"].as_str().unwrap_or("").into(),
                ),
            },
            None => (
                "not registered".into(),
                rec.doc["role"].as_str().unwrap_or("").into(),
            ),
        };
        rows.push(json!({
            "entity": rec.doc["entity"],
            "label": rec.doc["label"],
            "role": role,
            "process": process,
            "pid": if alive { st["process"]["pid"].clone() } else { Value::Null },
            "supervisor_pid": if alive { json!(rec.pid()) } else { Value::Null },
            "port": st["process"]["port"],
            "restarts": st["process"]["restarts"],
            "instance": instance,
            "presence": presence,
            "state_detail": if alive {
                st["state_detail"].clone()
            } else {
                json!(format!(
                    "{}; supervisor not running",
                    st["state_detail"].as_str().unwrap_or("never started")
                ))
            },
            "home": rec.doc["home"],
            "fleet": rec.doc["fleet"],
        }));
    }
    if args.conn.json {
        return output::json(&json!({ "agents": rows }));
    }
    let cell = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            [
                "entity",
                "label",
                "role",
                "process",
                "pid",
                "port",
                "restarts",
                "presence",
                "state_detail",
            ]
            .iter()
            .map(|k| cell(&r[*k]))
            .collect()
        })
        .collect();
    output::table(
        &[
            "ENTITY", "LABEL", "ROLE", "PROCESS", "PID", "PORT", "RESTARTS", "HUB", "DETAIL",
        ],
        &table,
    );
    Ok(())
}
