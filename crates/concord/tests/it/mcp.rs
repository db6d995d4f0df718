//! MCP end to end, with a client nobody here wrote: the official Python SDK (`mcp`
//! 2.x) drives `/mcp` over Streamable HTTP (its low-level `ClientSession` and its
//! high-level `Client`) and `concord mcp` over stdio. The scenarios are the scripts
//! in `tests/mcp/` at the repository root; this module starts the hub, prepares
//! what they need, runs them and checks their exit status and output.
//!
//! Python with `mcp` is `$CONCORD_PYTHON`, else `.venv` at the repository root
//! (`.ci/run` creates it), else `python3` on PATH. Without it the Python tests skip with a notice on
//! stderr, and fail when `CONCORD_REQUIRE_ALL=1`. The HTTP-level checks of bad
//! requests need no Python.

use crate::harness::*;
use concord_client::Client;
use concord_core::api::{CreateTokenRequest, InstanceState, Registered, Role};
use concord_core::token::TokenKind;
use concord_core::ErrorCode;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn scripts() -> PathBuf {
    repo_root().join("tests/mcp")
}

/// A Python that can `import mcp` (2.x), or None after saying why on stderr.
fn python(test: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("CONCORD_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(repo_root().join(".venv/bin/python"));
    candidates.push(PathBuf::from("python3"));
    let mut why = Vec::new();
    for py in candidates {
        let probe = Command::new(&py)
            .args([
                "-c",
                "import sys, importlib.metadata as m; v = m.version('mcp'); \
                 sys.exit(0 if int(v.split('.')[0]) == 2 else 3)",
            ])
            .output();
        match probe {
            Ok(o) if o.status.success() => return Some(py),
            Ok(o) => why.push(format!(
                "{}: no mcp 2.x ({})",
                py.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => why.push(format!("{}: {e}", py.display())),
        }
    }
    let msg = format!(
        "{test}: SKIPPED: no Python with the `mcp` 2.x package ({}); run \
         `python3 -m venv .venv && .venv/bin/pip install 'mcp>=2,<3'`",
        why.join("; ")
    );
    if require_all() {
        panic!("CONCORD_REQUIRE_ALL=1 but {msg}");
    }
    eprintln!("{msg}");
    None
}

/// Runs a script to its end (bounded), returning its output; panics on failure
/// with everything it printed.
fn run_script(py: &PathBuf, script: &str, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(py);
    cmd.arg(scripts().join(script))
        .current_dir(scripts())
        .env("CONCORD_BIN", BIN)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start python");
    let out = wait_bounded(child, Duration::from_secs(180), script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "OK"),
        "{script} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // Shown with --nocapture: what the client negotiated and saw.
    eprintln!("{script}:\n{stderr}");
    out
}

fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("collect output"),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "{what} did not finish within {limit:?}:\n--- stdout\n{}\n--- stderr\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

async fn agent_token(admin: &Client, entity: &str) -> String {
    admin
        .create_token(&CreateTokenRequest {
            kind: TokenKind::Agent,
            entity: Some(entity.into()),
            name: Some("mcp-test".into()),
        })
        .await
        .expect("agent token")
        .token
}

async fn instances_of(admin: &Client, entity: &str) -> Vec<concord_core::api::Instance> {
    admin
        .list_instances(Some(entity), None, Some("all"))
        .await
        .expect("list instances")
        .instances
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_streamable_http_with_client_session() {
    let Some(py) = python("mcp_over_streamable_http_with_client_session") else {
        return;
    };
    let hub = Hub::start();
    let admin = hub.admin();
    let (p, _) = register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    let (o, _) = register(&admin, reg("sisters", Role::Secondary, Some("tab-2"))).await;
    let env = [
        ("CONCORD_MCP_URL", format!("{}/mcp", hub.url)),
        ("CONCORD_ENTITY", "sisters".to_string()),
        ("CONCORD_PRIMARY_TOKEN", p.session_token.clone()),
        ("CONCORD_PRIMARY_ID", p.instance.id.clone()),
        ("CONCORD_OTHER_TOKEN", o.session_token.clone()),
        ("CONCORD_OTHER_ID", o.instance.id.clone()),
    ];
    tokio::task::spawn_blocking(move || run_script(&py, "http_session.py", &env))
        .await
        .unwrap();
    // What the tools did is what REST sees.
    let entry = admin.get_state("sisters", "deploy/status").await.unwrap();
    assert_eq!(entry.value, json!({"color": "green"}));
    assert_eq!(entry.updated_by, p.instance.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_streamable_http_with_high_level_client() {
    let Some(py) = python("mcp_over_streamable_http_with_high_level_client") else {
        return;
    };
    let hub = Hub::start();
    let admin = hub.admin();
    let (p, _) = register(&admin, reg("anvil", Role::Secondary, Some("coder"))).await;
    let env = [
        ("CONCORD_MCP_URL", format!("{}/mcp", hub.url)),
        ("CONCORD_TOKEN", p.session_token.clone()),
        ("CONCORD_ID", p.instance.id.clone()),
        ("CONCORD_ADMIN_TOKEN", hub.admin.clone()),
    ];
    tokio::task::spawn_blocking(move || run_script(&py, "http_client.py", &env))
        .await
        .unwrap();
    // The client campaigned through MCP: REST agrees.
    let e = admin.entity("anvil").await.unwrap();
    assert_eq!(e.primary.map(|i| i.id), Some(p.instance.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_stdio_bridges() {
    let Some(py) = python("mcp_over_stdio_bridges") else {
        return;
    };
    let hub = Hub::start();
    let admin = hub.admin();
    let token = agent_token(&admin, "crew").await;
    let env = [
        ("CONCORD_HUB", hub.url.clone()),
        ("CONCORD_AGENT_TOKEN", token),
        ("CONCORD_ENTITY", "crew".to_string()),
    ];
    let out = tokio::task::spawn_blocking(move || run_script(&py, "stdio.py", &env))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Both bridges registered labelled instances; when their clients closed stdin
    // they closed them (no ghost left to expire).
    let all = eventually(Duration::from_secs(10), "both bridges closed", || async {
        let all = instances_of(&admin, "crew").await;
        all.iter()
            .all(|i| i.state == InstanceState::Closed)
            .then_some(all)
    })
    .await;
    let mut labels: Vec<_> = all.iter().filter_map(|i| i.label.clone()).collect();
    labels.sort();
    assert_eq!(labels, ["lead", "tab-2"], "{stdout}");
    assert!(admin.ghosts().await.unwrap().ghosts.is_empty());
}

/// `remember`, `recall` and `forget` call `/v1/memories`, which the shared-memory
/// work adds. Until this hub answers there, the test says so and skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_memory_tools() {
    let hub = Hub::start();
    let admin = hub.admin();
    let probe = admin
        .call::<_, Value>(
            concord_client::Method::POST,
            "/v1/memories/search",
            Some(&json!({"query": "probe"})),
        )
        .await;
    if let Err(e) = &probe {
        if e.code == ErrorCode::NotFound {
            eprintln!(
                "mcp_memory_tools: SKIPPED: this hub has no /v1/memories yet ({}); the memory \
                 tools run once the shared-memory routes are merged",
                e.message
            );
            return;
        }
    }
    let Some(py) = python("mcp_memory_tools") else {
        return;
    };
    let token = agent_token(&admin, "sisters").await;
    let env = [
        ("CONCORD_HUB", hub.url.clone()),
        ("CONCORD_AGENT_TOKEN", token),
        ("CONCORD_ENTITY", "sisters".to_string()),
    ];
    tokio::task::spawn_blocking(move || run_script(&py, "memory.py", &env))
        .await
        .unwrap();
}

/// The hub goes away under a running bridge: tools say the hub is unreachable; the
/// hub comes back after the instance's lease ran out; the bridge registers anew and
/// `whoami` names the new instance and the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_bridge_outlives_the_hub() {
    let Some(py) = python("mcp_bridge_outlives_the_hub") else {
        return;
    };
    let mut hub = Hub::start();
    let admin = hub.admin();
    let token = agent_token(&admin, "crew").await;
    let mut child = Command::new(&py)
        .arg(scripts().join("failover.py"))
        .current_dir(scripts())
        .env("CONCORD_BIN", BIN)
        .env("CONCORD_HUB", &hub.url)
        .env("CONCORD_AGENT_TOKEN", &token)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let mut to_script = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let expect = |want: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.starts_with(want) => return l,
                Ok(_) => continue,
                Err(_) => panic!("failover.py never said {want:?}"),
            }
        }
    };

    let first = expect("REGISTERED ");
    let old_id = first.trim_start_matches("REGISTERED ").to_string();
    let ttl = admin.get_instance(&old_id).await.unwrap().ttl_ms as u64;
    hub.kill9();
    let killed = Instant::now();
    writeln!(to_script, "hub-down").unwrap();
    expect("UNREACHABLE-OK");
    // Come back only once the old lease has surely run out, so the restarted hub
    // must expire the instance: the durable lease is never written more than
    // 1.5 TTL past the last heartbeat (DESIGN §2), and none arrived after the kill.
    let lapsed = killed + Duration::from_millis(ttl * 3 / 2 + 100);
    tokio::time::sleep_until(lapsed.into()).await;
    hub.respawn_same_port();
    writeln!(to_script, "hub-up").unwrap();
    let again = expect("REREGISTERED ");
    let new_id = again.trim_start_matches("REREGISTERED ").to_string();
    assert_ne!(new_id, old_id);
    expect("OK");
    drop(to_script);
    let out = wait_bounded(child, Duration::from_secs(60), "failover.py");
    let err_text = errs.join().unwrap_or_default();
    assert!(out.status.success(), "failover.py failed: {err_text}");
    let admin = hub.admin();
    let old = admin.get_instance(&old_id).await.unwrap();
    assert_ne!(old.state, InstanceState::Live);
    // The new instance was closed when the client went away.
    eventually(
        Duration::from_secs(10),
        "the new instance closed",
        || async {
            let i = admin.get_instance(&new_id).await.ok()?;
            (i.state == InstanceState::Closed).then_some(())
        },
    )
    .await;
}

async fn raw_mcp(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = http
        .post(format!("{url}/mcp"))
        .header("accept", "application/json, text/event-stream")
        .body(body.to_string());
    if !headers.iter().any(|(k, _)| *k == "content-type") {
        req = req.header("content-type", "application/json");
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Bad MCP requests get clear refusals and disturb nothing: REST keeps answering
/// and a well-formed MCP call right after works. Needs no Python.
#[tokio::test]
async fn bad_mcp_requests_are_refused_and_disturb_nothing() {
    let hub = Hub::start_with(&["--max-body", "4096"]);
    let admin = hub.admin();
    let (p, me): (Registered, Client) =
        register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}})
    .to_string();
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}}})
    .to_string();
    let proto = [("mcp-protocol-version", "2025-06-18")];

    // Who may use /mcp: an instance session, nothing else.
    let (status, body) = raw_mcp(&http, &hub.url, None, &init, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"unauthorized\""), "{body}");
    let (status, body) = raw_mcp(&http, &hub.url, Some("cnc_nope"), &init, &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = raw_mcp(&http, &hub.url, Some(&hub.admin), &init, &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("session token"), "{body}");

    let tok = Some(p.session_token.as_str());
    // Not JSON, not JSON-RPC, too big, wrong content type, a foreign Host or Origin.
    let (status, body) = raw_mcp(&http, &hub.url, tok, "{not json", &[]).await;
    assert!((400..500).contains(&status), "{status} {body}");
    let (status, body) = raw_mcp(&http, &hub.url, tok, "[1,2,3]", &[]).await;
    assert!((400..500).contains(&status), "{status} {body}");
    let big = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "publish", "arguments": {"topic": "a.b", "data": "x".repeat(10_000)}}})
    .to_string();
    let (status, body) = raw_mcp(&http, &hub.url, tok, &big, &proto).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = raw_mcp(
        &http,
        &hub.url,
        tok,
        &init,
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(status, 415, "{body}");
    let (status, body) = raw_mcp(&http, &hub.url, tok, &init, &[("host", "evil.example")]).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = raw_mcp(
        &http,
        &hub.url,
        tok,
        &init,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Arguments of the wrong type: a tool error naming the argument, not a failure.
    let bad_args = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "set_state", "arguments": {"key": "k", "value": 1, "fence": "x"}}})
    .to_string();
    let (status, body) = raw_mcp(&http, &hub.url, tok, &bad_args, &proto).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(v["result"]["isError"], true, "{body}");
    assert_eq!(
        v["result"]["structuredContent"]["error"]["details"]["field"],
        "fence"
    );

    // Everything still works: REST, and a proper MCP call.
    assert!(me.heartbeat(&p.instance.id).await.is_ok());
    assert_eq!(admin.status().await.unwrap().live_instances, 1);
    let (status, body) = raw_mcp(&http, &hub.url, tok, &init, &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw_mcp(&http, &hub.url, tok, &call, &proto).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(v["result"]["isError"], false, "{body}");
    assert_eq!(
        v["result"]["structuredContent"]["instance"],
        p.instance.id.as_str()
    );
    assert_eq!(v["result"]["structuredContent"]["is_primary"], true);
    // /v1/whoami says the same over REST.
    let who = me.whoami().await.unwrap();
    assert_eq!(who.kind, TokenKind::Session);
    assert_eq!(who.instance.as_deref(), Some(p.instance.id.as_str()));
    assert_eq!(admin.whoami().await.unwrap().kind, TokenKind::Admin);
    assert_eq!(
        hub.anon().whoami().await.unwrap_err().code,
        ErrorCode::Unauthorized
    );
}

/// `--mcp-allowed-hosts` opens `/mcp` to a name deliberately; others stay refused.
#[tokio::test]
async fn mcp_allowed_hosts_are_configurable() {
    let hub = Hub::start_with(&["--mcp-allowed-hosts", "hub.example,10.1.2.3:7717"]);
    let admin = hub.admin();
    let (p, _) = register(&admin, reg("sisters", Role::Secondary, Some("tab"))).await;
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}})
    .to_string();
    let tok = Some(p.session_token.as_str());
    for (host, want) in [
        ("hub.example:7717", 200),
        ("10.1.2.3:7717", 200),
        ("10.1.2.3:9999", 403),
        ("other.example", 403),
        ("127.0.0.1:7717", 200),
    ] {
        let (status, body) = raw_mcp(&http, &hub.url, tok, &init, &[("host", host)]).await;
        assert_eq!(status, want, "{host}: {body}");
    }
}

/// `concord mcp` closes its instance on SIGTERM (not only when stdin closes), and
/// refuses at once to start with a token the hub rejects.
#[tokio::test]
async fn bridge_closes_its_instance_on_a_signal_and_fails_fast_on_a_bad_token() {
    let hub = Hub::start();
    let admin = hub.admin();
    let token = agent_token(&admin, "crew").await;
    let bridge = |token: &str, label: &str| {
        Command::new(BIN)
            .args(["mcp", "--entity", "crew", "--label", label])
            .args(["--hub", &hub.url, "--token", token])
            .env("CONCORD_SPOOL_DIR", hub.dir.join("spool"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start concord mcp")
    };

    let bad = bridge("cnc_not_a_token", "nope");
    let out = tokio::task::spawn_blocking(move || {
        wait_bounded(bad, Duration::from_secs(30), "concord mcp with a bad token")
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unauthorized"), "{stderr}");

    // stdin stays open: only the signal ends it.
    let child = bridge(&token, "signalled");
    let live = eventually(Duration::from_secs(20), "the bridge registered", || async {
        instances_of(&admin, "crew")
            .await
            .into_iter()
            .find(|i| i.label.as_deref() == Some("signalled") && i.state == InstanceState::Live)
    })
    .await;
    assert_eq!(live.role, Role::Secondary);
    // SAFETY: kill(2) on the pid of a child this test started and still owns.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = tokio::task::spawn_blocking(move || {
        wait_bounded(child, Duration::from_secs(30), "concord mcp after SIGTERM")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout is the MCP channel only");
    let closed = admin.get_instance(&live.id).await.unwrap();
    assert_eq!(closed.state, InstanceState::Closed, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_dispatch_breaker_and_lease_tools() {
    let Some(py) = python("mcp_dispatch_breaker_and_lease_tools") else {
        return;
    };
    let hub = Hub::start_with(&[
        "--breaker",
        "provider:*=window_ms=60000,min_samples=4,error_rate=0.5,open_ms=30000,min_instances=2",
    ]);
    let admin = hub.admin();
    let (me, _) = register(&admin, reg("crew", Role::Secondary, Some("asker"))).await;
    let (other, _) = register(&admin, reg("crew", Role::Secondary, Some("second"))).await;
    // A real peer answering the dispatch.
    let mut peer = std::process::Command::new(crate::harness::BIN)
        .args([
            "work",
            "dispatch.review",
            "--entity",
            "reviewers",
            "--label",
            "reviewer",
            "--capabilities",
            "review",
        ])
        .args([
            "--",
            "sh",
            "-c",
            "cat > /dev/null; echo '{\"verdict\": \"approve\"}'",
        ])
        .env("CONCORD_URL", &hub.url)
        .env("CONCORD_TOKEN", &hub.admin)
        .env("CONCORD_SPOOL_DIR", hub.dir.join("spool"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::harness::eventually(Duration::from_secs(20), "the peer to register", || {
        let admin = admin.clone();
        async move {
            (!admin
                .list_instances(Some("reviewers"), None, None)
                .await
                .unwrap()
                .instances
                .is_empty())
            .then_some(())
        }
    })
    .await;
    let env = [
        ("CONCORD_MCP_URL", format!("{}/mcp", hub.url)),
        ("CONCORD_TOKEN", me.session_token.clone()),
        ("CONCORD_ID", me.instance.id.clone()),
        ("CONCORD_OTHER_TOKEN", other.session_token.clone()),
    ];
    let out = tokio::task::spawn_blocking(move || run_script(&py, "coordination.py", &env)).await;
    let _ = peer.kill();
    let _ = peer.wait();
    out.unwrap();
}
