//! Agents supervised on one host (`concord run`, `concord up`): the fleet file's
//! model and the pure rules around it.
//!
//! Everything here is decided without I/O so it can be tested on its own and so the
//! supervisor and the fleet commands agree on one answer: where an agent's home is
//! (`slug`), which ports it may take (`PortRange`), whether and when a child that
//! exited is started again (`RestartPolicy::should_restart`, `backoff_ms`), the
//! one-line state shown on the dashboard (`state_detail`), whether a fleet file is
//! sound before anything starts (`FleetFile::validate`), and what a second `up`
//! must change (`plan`).

use crate::error::Error;
use crate::validate;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Longest slug of a label: a directory name that stays readable in `ls`.
pub const MAX_SLUG_LEN: usize = 64;

/// The directory name of an instance label: lowercase ASCII letters and digits,
/// every other run of characters one `-`. Two labels with the same slug would share
/// a home, so fleet validation refuses them; a label with no letter or digit has no
/// slug at all and is refused too (a hash would be an unreadable directory name).
pub fn slug(field: &str, label: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(label.len());
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out = out.trim_end_matches('-').to_string();
    if out.len() > MAX_SLUG_LEN {
        out.truncate(MAX_SLUG_LEN);
        out = out.trim_end_matches('-').to_string();
    }
    if out.is_empty() {
        return Err(Error::bad_field(
            field,
            format!("{label:?} needs at least one ASCII letter or digit (it names the agent's home directory)"),
        ));
    }
    Ok(out)
}

/// The ports `--port auto` may hand out, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

pub const DEFAULT_PORT_RANGE: PortRange = PortRange {
    start: 7800,
    end: 7999,
};

impl PortRange {
    /// `A-B` with 1024 <= A <= B <= 65535: privileged ports would need root, and a
    /// reversed range is a typo, not an empty range.
    pub fn parse(field: &str, s: &str) -> Result<PortRange, Error> {
        let bad = |m: String| Error::bad_field(field, m);
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| bad(format!("{s:?}: expected START-END, e.g. 7800-7999")))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| bad(format!("{s:?}: {p:?} is not a port number (1024..=65535)")))
        };
        let (start, end) = (port(a)?, port(b)?);
        if start < 1024 {
            return Err(bad(format!(
                "{s:?}: ports below 1024 need root; start at 1024 or above"
            )));
        }
        if start > end {
            return Err(bad(format!("{s:?}: the start is above the end")));
        }
        Ok(PortRange { start, end })
    }

    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// The port an agent gets: a free one leased from the range, a fixed one, or none
/// (a worker that serves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortChoice {
    #[default]
    Auto,
    Fixed(u16),
    None,
}

impl PortChoice {
    pub fn parse(field: &str, s: &str) -> Result<PortChoice, Error> {
        match s.trim() {
            "auto" => Ok(PortChoice::Auto),
            "none" => Ok(PortChoice::None),
            n => match n.parse::<u16>() {
                Ok(p) if p > 0 => Ok(PortChoice::Fixed(p)),
                _ => Err(Error::bad_field(
                    field,
                    format!("{s:?}: expected auto, none or a port number"),
                )),
            },
        }
    }
}

impl fmt::Display for PortChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortChoice::Auto => f.write_str("auto"),
            PortChoice::None => f.write_str("none"),
            PortChoice::Fixed(p) => write!(f, "{p}"),
        }
    }
}

/// In a fleet file a port is `"auto"`, `"none"` or a number.
impl<'de> Deserialize<'de> for PortChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortChoice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\", \"none\" or a port number")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortChoice, E> {
                u16::try_from(n)
                    .ok()
                    .filter(|p| *p > 0)
                    .map(PortChoice::Fixed)
                    .ok_or_else(|| E::custom(format!("{n} is not a port number (1..=65535)")))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortChoice, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(-1))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortChoice, E> {
                PortChoice::parse("port", s).map_err(|e| E::custom(e.message))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for PortChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// When a child that exited is started again (like systemd's `Restart=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Never,
    #[default]
    OnFailure,
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }

    /// Whether to start the child again after an exit (`success`: exit code 0),
    /// having restarted it `restarts` times so far, at most `max_restarts` times.
    pub fn should_restart(self, success: bool, restarts: u32, max_restarts: Option<u32>) -> bool {
        let wanted = match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Always => true,
        };
        wanted && max_restarts.is_none_or(|max| restarts < max)
    }
}

/// A child that ran at least this long before exiting was healthy: its next
/// restart starts the backoff over instead of doubling it.
pub const STABLE_RUN_MS: u64 = 30_000;

/// The wait before restart number `consecutive` (0 for the first after a stable
/// run): `initial_ms` doubled each time, never above `max_ms`. Exponential so a
/// child that crashes at once does not spin, capped so it comes back within a
/// bounded time once its cause is fixed.
pub fn backoff_ms(consecutive: u32, initial_ms: u64, max_ms: u64) -> u64 {
    let factor = 1u64.checked_shl(consecutive.min(63)).unwrap_or(u64::MAX);
    initial_ms
        .saturating_mul(factor)
        .min(max_ms.max(initial_ms))
}

/// The supervised process's state, as `meta.process.state` on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    /// The child is running.
    Running,
    /// The child exited and is being started again now.
    Restarting,
    /// The child exited and the supervisor waits before starting it again.
    Backoff,
    /// The child exited for good (policy, restart limit, or stopped).
    Exited,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Restarting => "restarting",
            ProcessState::Backoff => "backoff",
            ProcessState::Exited => "exited",
        }
    }
}

/// What the child's own health check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No health check configured.
    Unchecked,
    /// Configured, no answer yet since the child started.
    Pending,
    Up,
    /// Failing `n` times in a row.
    Down(u32),
}

/// The short human line of `meta.state_detail`: process × endpoint, so a reader
/// tells "process up, endpoint down" (hung) from "process down" (crashed). Hub
/// presence is the third axis, shown from the instance's own state.
pub fn state_detail(process: ProcessState, health: Health, last_exit: Option<&str>) -> String {
    let after = last_exit.map(|e| format!(" after {e}")).unwrap_or_default();
    match process {
        ProcessState::Running => match health {
            Health::Unchecked => "process up".into(),
            Health::Pending => "process up, endpoint not checked yet".into(),
            Health::Up => "process up, endpoint up".into(),
            Health::Down(n) => format!(
                "process up, endpoint down ({n} failed check{})",
                if n == 1 { "" } else { "s" }
            ),
        },
        ProcessState::Restarting => format!("process restarting{after}"),
        ProcessState::Backoff => format!("process down{after}, waiting to restart"),
        ProcessState::Exited => format!("process exited{after}"),
    }
}

/// How an exit is described in `meta.process.last_exit`.
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "unknown exit".into(),
    }
}

// ---------- the fleet file ----------

/// `concord up FLEET.toml`: one host's agents, declared. Unknown keys are errors:
/// a misspelt `restrat` silently ignored would be a policy nobody asked for.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Hub URL, or several (a cluster); default: the CLI's (`--hub`,
    /// `$CONCORD_URL`, the local hub).
    #[serde(default, deserialize_with = "one_or_many")]
    pub hub: Vec<String>,
    /// A file holding the token the supervisors register with; default `$CONCORD_TOKEN`
    /// or the local admin token. A path, so the secret stays out of the fleet file.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Agents' homes go under it: `<home_root>/<entity>/<label slug>/`.
    #[serde(default)]
    pub home_root: Option<String>,
    /// `A-B`: where `port = "auto"` agents take their ports.
    #[serde(default)]
    pub port_range: Option<String>,
    /// Instance TTL for every agent unless an agent sets its own.
    #[serde(default)]
    pub ttl_ms: Option<i64>,
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentSpec>,
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleSpec>,
}

/// `hub = "http://…"` or `hub = ["http://a…", "http://b…"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a hub URL or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                out.push(url);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// One `[[agent]]`: what `concord run` is given for it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub entity: String,
    pub label: String,
    #[serde(default = "default_role")]
    pub role: String,
    /// The program and its arguments (an array: no shell quoting to get wrong).
    pub command: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub max_restarts: Option<u32>,
    #[serde(default)]
    pub port: PortChoice,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health: Option<HealthSpec>,
    #[serde(default)]
    pub ttl_ms: Option<i64>,
    /// How long a stopping child gets between SIGTERM and SIGKILL.
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// This agent's own token (e.g. an agent token of its entity) instead of the
    /// fleet's; the child inherits it as `CONCORD_TOKEN`.
    #[serde(default)]
    pub token_file: Option<String>,
}

fn default_role() -> String {
    "secondary".into()
}

/// The child's own health check: an HTTP path on its port, or a command.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// e.g. `/healthz`: GET `http://127.0.0.1:<port><url>` must answer 2xx.
    #[serde(default)]
    pub url: Option<String>,
    /// Run by `sh -c` in the agent's home with its environment; exit 0 is healthy.
    #[serde(default)]
    pub cmd: Option<String>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// Failed checks in a row before the endpoint counts as down.
    #[serde(default)]
    pub failures: Option<u32>,
}

/// One `[[schedule]]`: a recurring task, created with `PUT /v1/schedules/{name}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    pub queue: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub every_ms: Option<i64>,
    #[serde(default)]
    pub cron: Option<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

pub const ROLES: [&str; 3] = ["primary", "secondary", "fork"];

/// Checks an agent's own fields; `field` is its position, `agent[2]`.
pub fn validate_agent(field: &str, a: &AgentSpec) -> Result<(), Error> {
    let f = |name: &str| format!("{field}.{name}");
    validate::name(&f("entity"), &a.entity)?;
    validate::label(&f("label"), &a.label)?;
    slug(&f("label"), &a.label)?;
    if !ROLES.contains(&a.role.as_str()) {
        return Err(Error::bad_field(
            &f("role"),
            format!("{:?}: expected primary, secondary or fork", a.role),
        ));
    }
    if a.command.first().is_none_or(|c| c.trim().is_empty()) {
        return Err(Error::bad_field(
            &f("command"),
            "must name a program: command = [\"program\", \"arg\", …]",
        ));
    }
    validate::capabilities(&f("capabilities"), &a.capabilities)?;
    if let Some(ttl) = a.ttl_ms {
        validate::ttl_ms(&f("ttl_ms"), ttl)?;
    }
    for key in a.env.keys() {
        let ok = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Error::bad_field(
                &f("env"),
                format!("{key:?} is not an environment variable name"),
            ));
        }
    }
    if let Some(h) = &a.health {
        match (&h.url, &h.cmd) {
            (Some(_), Some(_)) => {
                return Err(Error::bad_field(
                    &f("health"),
                    "give either url or cmd, not both",
                ))
            }
            (None, None) => {
                return Err(Error::bad_field(&f("health"), "give url or cmd"));
            }
            (Some(url), None) => {
                if !url.starts_with('/') {
                    return Err(Error::bad_field(
                        &f("health.url"),
                        format!("{url:?}: a path on the agent's port, starting with '/'"),
                    ));
                }
                if a.port == PortChoice::None {
                    return Err(Error::bad_field(
                        &f("health.url"),
                        "needs a port: set port = \"auto\" or a number, or use health.cmd",
                    ));
                }
            }
            (None, Some(_)) => {}
        }
        if h.failures == Some(0) {
            return Err(Error::bad_field(
                &f("health.failures"),
                "must be at least 1",
            ));
        }
        if h.interval_ms.is_some_and(|ms| ms < 100) {
            return Err(Error::bad_field(
                &f("health.interval_ms"),
                "must be at least 100",
            ));
        }
    }
    Ok(())
}

impl FleetFile {
    /// Everything that can be checked without I/O, first error first: each agent,
    /// no two agents sharing a home (same entity and label slug) or a fixed port,
    /// enough ports in the range for the `auto` agents, fixed ports outside it
    /// (else `auto` could hand one of them out), and the schedules.
    pub fn validate(&self) -> Result<PortRange, Error> {
        let range = match &self.port_range {
            Some(r) => PortRange::parse("port_range", r)?,
            None => DEFAULT_PORT_RANGE,
        };
        if let Some(ttl) = self.ttl_ms {
            validate::ttl_ms("ttl_ms", ttl)?;
        }
        if self.hub.iter().any(|u| u.trim().is_empty()) {
            return Err(Error::bad_field("hub", "a hub URL must not be empty"));
        }
        let mut homes = BTreeMap::new();
        let mut fixed = BTreeMap::new();
        let mut auto = 0usize;
        for (i, a) in self.agents.iter().enumerate() {
            let field = format!("agent[{i}]");
            validate_agent(&field, a)?;
            let home = (a.entity.clone(), slug(&field, &a.label)?);
            if let Some(j) = homes.insert(home.clone(), i) {
                return Err(Error::bad_field(
                    &format!("{field}.label"),
                    format!(
                        "{:?} of {} is the same agent (home {}/{}) as agent[{j}]: labels must differ within an entity",
                        a.label, a.entity, home.0, home.1
                    ),
                ));
            }
            match a.port {
                PortChoice::Auto => auto += 1,
                PortChoice::None => {}
                PortChoice::Fixed(p) => {
                    if let Some(j) = fixed.insert(p, i) {
                        return Err(Error::bad_field(
                            &format!("{field}.port"),
                            format!("port {p} is also agent[{j}]'s"),
                        ));
                    }
                    if range.contains(p) {
                        return Err(Error::bad_field(
                            &format!("{field}.port"),
                            format!("port {p} is inside port_range {range}, which auto ports are taken from; pick one outside it"),
                        ));
                    }
                }
            }
        }
        if auto > range.len() {
            return Err(Error::bad_field(
                "port_range",
                format!(
                    "{range} has {} ports but {auto} agents take an auto port",
                    range.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.schedules.iter().enumerate() {
            let field = format!("schedule[{i}]");
            validate::name(&format!("{field}.name"), &s.name)?;
            if !names.insert(s.name.as_str()) {
                return Err(Error::bad_field(
                    &format!("{field}.name"),
                    format!("{:?} is declared twice", s.name),
                ));
            }
            crate::task::validate_queue(&format!("{field}.queue"), &s.queue)?;
            validate::capabilities(&format!("{field}.requires"), &s.requires)?;
            crate::task::Recurrence::parse(s.every_ms, s.cron.as_deref()).map_err(|e| {
                let sub = e.details["field"]
                    .as_str()
                    .unwrap_or("every_ms")
                    .to_string();
                Error::bad_field(&format!("{field}.{sub}"), e.message)
            })?;
            if s.max_attempts.is_some_and(|m| !(1..=100).contains(&m)) {
                return Err(Error::bad_field(
                    &format!("{field}.max_attempts"),
                    "must be between 1 and 100",
                ));
            }
        }
        Ok(range)
    }
}

/// What `up` does to bring the running fleet to the file: agents keyed by
/// `entity/label slug`, each with its spec as canonical JSON.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In the file, not running.
    pub start: Vec<String>,
    /// Running with another spec: stopped, then started with the new one.
    pub restart: Vec<String>,
    /// Running, no longer in the file.
    pub stop: Vec<String>,
    /// Running with the same spec: left alone.
    pub keep: Vec<String>,
}

/// `desired`: key → spec of the file; `running`: key → spec of each agent whose
/// supervisor is alive. A supervisor that died (or an agent that exited for
/// good) is not running, so `up` starts it again: the file says it should run.
pub fn plan(desired: &BTreeMap<String, String>, running: &BTreeMap<String, String>) -> Plan {
    let mut p = Plan::default();
    for (key, spec) in desired {
        match running.get(key) {
            None => p.start.push(key.clone()),
            Some(old) if old == spec => p.keep.push(key.clone()),
            Some(_) => p.restart.push(key.clone()),
        }
    }
    p.stop = running
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(entity: &str, label: &str) -> AgentSpec {
        AgentSpec {
            entity: entity.into(),
            label: label.into(),
            role: "secondary".into(),
            command: vec!["/bin/true".into()],
            capabilities: vec![],
            restart: RestartPolicy::OnFailure,
            max_restarts: None,
            port: PortChoice::Auto,
            env: BTreeMap::new(),
            health: None,
            ttl_ms: None,
            grace_ms: None,
            token_file: None,
        }
    }

    fn fleet(agents: Vec<AgentSpec>) -> FleetFile {
        FleetFile {
            hub: vec![],
            token_file: None,
            home_root: None,
            port_range: Some("8000-8009".into()),
            ttl_ms: None,
            agents,
            schedules: vec![],
        }
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("label", "Main Session").unwrap(), "main-session");
        assert_eq!(slug("label", "  tab #2 (test) ").unwrap(), "tab-2-test");
        assert_eq!(slug("label", "v1.2_beta").unwrap(), "v1-2-beta");
        assert_eq!(slug("label", "héllo").unwrap(), "h-llo");
        assert_eq!(slug("label", &"abc ".repeat(40)).unwrap().len(), 63);
        assert!(slug("label", &"a".repeat(200)).unwrap().len() <= MAX_SLUG_LEN);
        let e = slug("agent[0].label", "🤖 !").unwrap_err();
        assert_eq!(e.details["field"], "agent[0].label");
        // Never a path component that walks: only [a-z0-9-], never leading '-'.
        assert!(slug("label", "/").is_err());
        for l in ["../etc", "a/../../b", ".hidden", "-x-"] {
            let s = slug("label", l).unwrap();
            assert!(s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!s.starts_with('-') && !s.ends_with('-'), "{s}");
        }
    }

    #[test]
    fn port_ranges() {
        let r = PortRange::parse("port_range", "7800-7802").unwrap();
        assert_eq!((r.start, r.end, r.len()), (7800, 7802, 3));
        assert_eq!(r.ports().collect::<Vec<_>>(), vec![7800, 7801, 7802]);
        assert!(r.contains(7801) && !r.contains(7803));
        assert_eq!(PortRange::parse("p", "9000-9000").unwrap().len(), 1);
        assert_eq!(PortRange::parse("p", " 9000 - 9001 ").unwrap().len(), 2);
        for bad in ["7800", "9000-8000", "80-90", "a-b", "1024-70000", ""] {
            let e = PortRange::parse("port_range", bad).unwrap_err();
            assert_eq!(e.details["field"], "port_range", "{bad}");
        }
        assert_eq!(r.to_string(), "7800-7802");
    }

    #[test]
    fn port_choices() {
        assert_eq!(PortChoice::parse("port", "auto").unwrap(), PortChoice::Auto);
        assert_eq!(PortChoice::parse("port", "none").unwrap(), PortChoice::None);
        assert_eq!(
            PortChoice::parse("port", "8080").unwrap(),
            PortChoice::Fixed(8080)
        );
        assert!(PortChoice::parse("port", "0").is_err());
        assert!(PortChoice::parse("port", "99999").is_err());
        assert!(PortChoice::parse("port", "free").is_err());
    }

    #[test]
    fn restart_policies() {
        use RestartPolicy::*;
        assert!(!Never.should_restart(false, 0, None));
        assert!(OnFailure.should_restart(false, 0, None));
        assert!(!OnFailure.should_restart(true, 0, None));
        assert!(Always.should_restart(true, 0, None));
        assert!(Always.should_restart(true, 2, Some(3)));
        assert!(!Always.should_restart(true, 3, Some(3)));
        assert!(!OnFailure.should_restart(false, 0, Some(0)));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff_ms(0, 1000, 60_000), 1000);
        assert_eq!(backoff_ms(1, 1000, 60_000), 2000);
        assert_eq!(backoff_ms(5, 1000, 60_000), 32_000);
        assert_eq!(backoff_ms(6, 1000, 60_000), 60_000);
        assert_eq!(backoff_ms(200, 1000, 60_000), 60_000);
        assert_eq!(backoff_ms(u32::MAX, u64::MAX, u64::MAX), u64::MAX);
        // A cap below the initial delay never makes the wait shorter than asked.
        assert_eq!(backoff_ms(3, 500, 100), 500);
        let mut last = 0;
        for n in 0..80 {
            let d = backoff_ms(n, 100, 10_000);
            assert!(d >= last && d <= 10_000);
            last = d;
        }
    }

    #[test]
    fn state_details() {
        use ProcessState::*;
        assert_eq!(state_detail(Running, Health::Unchecked, None), "process up");
        assert_eq!(
            state_detail(Running, Health::Down(3), None),
            "process up, endpoint down (3 failed checks)"
        );
        assert_eq!(
            state_detail(Running, Health::Up, None),
            "process up, endpoint up"
        );
        assert_eq!(
            state_detail(Backoff, Health::Unchecked, Some("exit code 1")),
            "process down after exit code 1, waiting to restart"
        );
        assert_eq!(
            state_detail(Exited, Health::Up, Some("signal 9")),
            "process exited after signal 9"
        );
        assert_eq!(describe_exit(Some(2), None), "exit code 2");
        assert_eq!(describe_exit(None, Some(15)), "signal 15");
    }

    #[test]
    fn fleet_validation() {
        let ok = fleet(vec![
            agent("sisters", "main"),
            agent("sisters", "tab 2"),
            agent("anvil", "main"),
        ]);
        assert_eq!(ok.validate().unwrap().len(), 10);

        let field = |f: FleetFile| {
            f.validate().unwrap_err().details["field"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            field(fleet(vec![
                agent("sisters", "Main"),
                agent("sisters", "main")
            ])),
            "agent[1].label"
        );
        assert_eq!(
            field(fleet(vec![agent("bad name", "x")])),
            "agent[0].entity"
        );
        let mut a = agent("a", "b");
        a.command = vec![];
        assert_eq!(field(fleet(vec![a])), "agent[0].command");
        let mut a = agent("a", "b");
        a.role = "boss".into();
        assert_eq!(field(fleet(vec![a])), "agent[0].role");
        let mut a = agent("a", "b");
        a.health = Some(HealthSpec {
            url: Some("/h".into()),
            cmd: Some("true".into()),
            ..Default::default()
        });
        assert_eq!(field(fleet(vec![a])), "agent[0].health");
        let mut a = agent("a", "b");
        a.port = PortChoice::None;
        a.health = Some(HealthSpec {
            url: Some("/h".into()),
            ..Default::default()
        });
        assert_eq!(field(fleet(vec![a])), "agent[0].health.url");
        let mut a = agent("a", "b");
        a.env.insert("BAD-NAME".into(), "x".into());
        assert_eq!(field(fleet(vec![a])), "agent[0].env");
        // Fixed ports: unique, and outside the auto range.
        let (mut a, mut b) = (agent("a", "x"), agent("a", "y"));
        a.port = PortChoice::Fixed(9100);
        b.port = PortChoice::Fixed(9100);
        assert_eq!(field(fleet(vec![a.clone(), b])), "agent[1].port");
        a.port = PortChoice::Fixed(8005);
        assert_eq!(field(fleet(vec![a])), "agent[0].port");
        // More auto agents than ports.
        let many: Vec<_> = (0..11).map(|i| agent("a", &format!("w{i}"))).collect();
        assert_eq!(field(fleet(many)), "port_range");
        let mut f = fleet(vec![]);
        f.port_range = Some("9-8".into());
        assert_eq!(field(f), "port_range");
        // Schedules.
        let sched = |name: &str, every: Option<i64>, cron: Option<&str>| ScheduleSpec {
            name: name.into(),
            queue: "review".into(),
            payload: Value::Null,
            every_ms: every,
            cron: cron.map(Into::into),
            priority: 0,
            requires: vec![],
            max_attempts: None,
        };
        let mut f = fleet(vec![]);
        f.schedules = vec![
            sched("nightly", None, Some("0 3 * * *")),
            sched("nightly", Some(60_000), None),
        ];
        assert_eq!(field(f), "schedule[1].name");
        let mut f = fleet(vec![]);
        f.schedules = vec![sched("n", None, Some("not cron"))];
        assert_eq!(field(f), "schedule[0].cron");
        let mut f = fleet(vec![]);
        f.schedules = vec![sched("n", None, None)];
        assert_eq!(field(f), "schedule[0].every_ms");
    }

    #[test]
    fn plans_apply_only_the_difference() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let desired = m(&[("a/main", "1"), ("a/tab", "2"), ("b/new", "3")]);
        let running = m(&[("a/main", "1"), ("a/tab", "old"), ("c/gone", "4")]);
        let p = plan(&desired, &running);
        assert_eq!(p.start, vec!["b/new"]);
        assert_eq!(p.restart, vec!["a/tab"]);
        assert_eq!(p.stop, vec!["c/gone"]);
        assert_eq!(p.keep, vec!["a/main"]);
        let p = plan(&desired, &desired);
        assert_eq!(
            (p.start.len(), p.restart.len(), p.stop.len(), p.keep.len()),
            (0, 0, 0, 3)
        );
        let p = plan(&BTreeMap::new(), &running);
        assert_eq!(p.stop.len(), 3);
    }
}
