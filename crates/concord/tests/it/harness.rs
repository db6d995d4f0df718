//! Starts real `concord serve` processes for the tests and talks to them only
//! through the public interface (HTTP via concord-client, the CLI binary).

use concord_client::Client;
use concord_core::api::{RegisterInstanceRequest, Registered, Role};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_concord");

pub struct Hub {
    pub child: Option<Child>,
    pub url: String,
    pub admin: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    extra: Vec<String>,
    listen: String,
}

fn wait_for_file(path: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("hub exited before it was ready: {status}");
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
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut hub = Hub {
            child: None,
            url: String::new(),
            admin: String::new(),
            dir,
            _tmp: Some(tmp),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            listen: "127.0.0.1:0".into(),
        };
        hub.spawn();
        hub
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
            .env("CONCORD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn concord serve");
        self.url = wait_for_file(&self.dir.join("hub.url"), &mut child);
        self.admin = std::fs::read_to_string(self.dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string();
        self.child = Some(child);
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
