//! Starts real `concord serve` processes for the tests and talks to them only
//! through the public interface (HTTP via concord-client, the CLI binary).

use concord_client::Client;
use concord_core::api::{RegisterInstanceRequest, Registered, Role};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_concord");

/// The repository root (scripts, `.venv`, `tests/` live there).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `CONCORD_REQUIRE_ALL=1`: a test that would skip for want of a tool fails instead.
pub fn require_all() -> bool {
    std::env::var("CONCORD_REQUIRE_ALL").as_deref() == Ok("1")
}

pub struct Hub {
    pub child: Option<Child>,
    pub url: String,
    pub admin: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    extra: Vec<String>,
    /// `--listen`: an ephemeral port unless a test needs a fixed one.
    pub listen: String,
    /// Extra environment (a shared `CONCORD_ADMIN_TOKEN` for replicas).
    env: Vec<(String, String)>,
}

fn wait_for_file(path: &Path, log: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "hub exited before it was ready: {status}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "hub did not write {} in time",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Hub {
    pub fn start() -> Hub {
        Hub::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Hub {
        let mut hub = Hub::configure(extra, &[]);
        hub.spawn();
        hub
    }

    /// A hub not started yet, on a fresh data dir.
    pub fn configure(extra: &[&str], env: &[(&str, &str)]) -> Hub {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        Hub {
            child: None,
            url: String::new(),
            admin: String::new(),
            dir,
            _tmp: Some(tmp),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            listen: "127.0.0.1:0".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Starts (again) on the same data dir.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("hub.url"));
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", &self.listen, "--data-dir"])
            .arg(&self.dir)
            .args(["--durability", "normal"])
            .args(&self.extra)
            .env_remove("CONCORD_ADMIN_TOKEN")
            .env_remove("CONCORD_DATABASE_URL")
            .env_remove("CONCORD_DATABASE_SCHEMA")
            .env("CONCORD_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("hub.log"))
                    .expect("hub.log"),
            ));
        let mut child = cmd.spawn().expect("spawn concord serve");
        self.url = wait_for_file(
            &self.dir.join("hub.url"),
            &self.dir.join("hub.log"),
            &mut child,
        );
        self.admin = match self.env.iter().find(|(k, _)| k == "CONCORD_ADMIN_TOKEN") {
            Some((_, token)) => token.clone(),
            // A replica that joins a cluster without the token has none.
            None => std::fs::read_to_string(self.dir.join("admin.token"))
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        self.child = Some(child);
    }

    /// What the hub wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default()
    }

    /// Starts again on the same data dir and the same address, as a hub that was
    /// restarted in place: clients that knew its URL reach it again.
    pub fn respawn_same_port(&mut self) {
        self.listen = self.url.trim_start_matches("http://").to_string();
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn admin(&self) -> Client {
        Client::new(vec![self.url.clone()], Some(self.admin.clone())).expect("client")
    }

    pub fn anon(&self) -> Client {
        Client::new(vec![self.url.clone()], None).expect("client")
    }

    /// Runs the CLI against this hub with the admin token.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("CONCORD_URL", &self.url)
            .env("CONCORD_TOKEN", &self.admin)
            .output()
            .expect("run concord")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn reg(entity: &str, role: Role, label: Option<&str>) -> RegisterInstanceRequest {
    RegisterInstanceRequest {
        entity: entity.into(),
        role,
        label: label.map(Into::into),
        ttl_ms: Some(15_000),
        capabilities: vec![],
        endpoint: None,
        host: Some("testhost".into()),
        version: None,
        persistent: false,
        forked_from: None,
        meta: serde_json::json!({}),
    }
}

/// Registers and returns the registration plus a client acting as the instance.
pub async fn register(c: &Client, req: RegisterInstanceRequest) -> (Registered, Client) {
    let r = c.register(&req).await.expect("register");
    let session = c.with_token(r.session_token.clone());
    (r, session)
}

/// Polls `f` until it returns Some, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------- PostgreSQL clusters ----------

/// The database URL for tests of hubs on PostgreSQL, or `None` (after saying so
/// loudly) to skip; with `CONCORD_REQUIRE_ALL=1` a missing URL fails the test.
/// The convention of the store's conformance suite.
pub fn pg_url(test: &str) -> Option<String> {
    match std::env::var("CONCORD_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if std::env::var("CONCORD_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!("CONCORD_REQUIRE_ALL=1 but CONCORD_TEST_DATABASE_URL is not set: {test} cannot run on postgres");
            }
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of passing tests, and a skip must not go unseen.
            let _ = writeln!(
                std::io::stderr(),
                "!!! SKIPPED {test}: needs PostgreSQL (set CONCORD_TEST_DATABASE_URL) !!!"
            );
            None
        }
    }
}

/// A plain connection to the test database, for what tests do behind the hubs'
/// backs (dropping their schema).
pub async fn pg_admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Hub replicas (real `concord serve` processes, each with its own data dir)
/// on one fresh PostgreSQL schema, sharing one admin token.
pub struct Cluster {
    pub hubs: Vec<Hub>,
    pub db: String,
    pub schema: String,
    pub admin: String,
}

impl Cluster {
    /// `n` replicas on a fresh schema; `None` when PostgreSQL tests are skipped.
    pub fn start(test: &str, n: usize) -> Option<Cluster> {
        let db = pg_url(test)?;
        let mut c = Cluster {
            hubs: Vec::new(),
            schema: concord_core::ids::new_id("t").to_lowercase(),
            admin: concord_core::token::generate_secret(),
            db,
        };
        for _ in 0..n {
            let db = c.db.clone();
            c.add_hub(&db);
        }
        Some(c)
    }

    /// Starts one more replica, on `database` (the cluster's URL, or a proxy in
    /// front of it). Returns its index.
    pub fn add_hub(&mut self, database: &str) -> usize {
        let admin = self.admin.clone();
        self.add_hub_with(database, &[("CONCORD_ADMIN_TOKEN", &admin)])
    }

    pub fn add_hub_with(&mut self, database: &str, env: &[(&str, &str)]) -> usize {
        let mut hub = Hub::configure(
            &["--database", database, "--database-schema", &self.schema],
            env,
        );
        hub.spawn();
        self.hubs.push(hub);
        self.hubs.len() - 1
    }

    /// An admin client of replica `i` only.
    pub fn admin(&self, i: usize) -> Client {
        Client::new(vec![self.hubs[i].url.clone()], Some(self.admin.clone())).expect("client")
    }

    /// An admin client that knows every replica and fails over between them.
    pub fn admin_all(&self) -> Client {
        Client::new(
            self.hubs.iter().map(|h| h.url.clone()).collect(),
            Some(self.admin.clone()),
        )
        .expect("client")
    }

    /// Stops the replicas, then drops the schema. Only reached when the test
    /// passed: a failed test leaves its schema behind to be looked at.
    pub async fn finish(mut self) {
        for h in &mut self.hubs {
            h.kill9();
        }
        let admin = pg_admin(&self.db).await;
        if let Err(e) = admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await
        {
            eprintln!("could not drop schema {}: {e}", self.schema);
        }
    }
}
