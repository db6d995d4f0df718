//! The dashboard (`/ui`): sessions, CSRF and who may do what over plain HTTP, and
//! the pages themselves in a real browser.
//!
//! The browser test runs `tests/ui/dashboard.mjs` (Playwright driving Debian's
//! Chromium, `/usr/bin/chromium` or `$CONCORD_CHROMIUM`) against a hub seeded here.
//! Without Chromium, node or `tests/ui/node_modules` it skips with a notice on
//! stderr, and fails when `CONCORD_REQUIRE_ALL=1` (`.ci/run` installs them).

use crate::harness::*;
use concord_client::{memory, Client};
use concord_core::api::{CreateTokenRequest, EnqueueRequest, PutScheduleRequest, Role};
use concord_core::token::TokenKind;
use reqwest::header::{HeaderMap, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A browser client: no redirects followed, so each answer is seen as sent.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

async fn token(admin: &Client, kind: TokenKind, entity: Option<&str>) -> (String, String) {
    let t = admin
        .create_token(&CreateTokenRequest {
            kind,
            entity: entity.map(Into::into),
            name: Some(format!("ui-{}", kind.as_str())),
        })
        .await
        .expect("token");
    (t.id, t.token)
}

/// Logs in through the form; returns the response.
async fn post_login(http: &reqwest::Client, url: &str, token: &str) -> reqwest::Response {
    http.post(format!("{url}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", concord_client::pct(token)))
        .send()
        .await
        .expect("login")
}

/// A logged-in browser: its cookie header and the CSRF token its pages carry.
struct Session {
    cookie: String,
    csrf: String,
}

async fn login(http: &reqwest::Client, url: &str, token: &str) -> Session {
    let resp = post_login(http, url, token).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set = resp
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("Set-Cookie")
        .to_string();
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    let page = http
        .get(format!("{url}/ui"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    let marker = "name=\"concord-csrf\" content=\"";
    let start = html.find(marker).expect("the page carries a CSRF token") + marker.len();
    let csrf = html[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(csrf.len(), 64, "CSRF token: {csrf}");
    Session { cookie, csrf }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    s: &Session,
    csrf: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method, url).header(COOKIE, &s.cookie);
    if let Some(c) = csrf {
        req = req.header("x-concord-csrf", c);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn sessions_cookies_csrf_and_who_may_do_what() {
    let hub = Hub::start();
    let url = hub.url.clone();
    let admin = hub.admin();
    let http = browser();
    let (p, _pc) = register(&admin, reg("alpha", Role::Primary, Some("main"))).await;
    let (s, _sc) = register(&admin, reg("alpha", Role::Secondary, Some("standby"))).await;
    let (victim, _vc) = register(&admin, reg("alpha", Role::Secondary, Some("victim"))).await;
    let (reader_id, reader_token) = token(&admin, TokenKind::Reader, None).await;
    let (_, agent_token) = token(&admin, TokenKind::Agent, Some("alpha")).await;

    // No session: pages send the browser to the login page; the API says 401.
    let resp = http.get(format!("{url}/ui")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(header(resp.headers(), "location"), "/ui/login");
    let h = resp.headers();
    assert!(header(h, "content-security-policy").contains("default-src 'self'"));
    assert!(header(h, "content-security-policy").contains("frame-ancestors 'none'"));
    assert_eq!(header(h, "x-frame-options"), "DENY");
    assert_eq!(header(h, "x-content-type-options"), "nosniff");
    let resp = http.get(format!("{url}/ui/login")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(html.contains("<label for=\"token\">Token</label>"));
    assert!(!html.contains("<script"), "the login page runs no script");
    let resp = http
        .get(format!("{url}/ui/assets/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(resp.headers(), "content-type").starts_with("text/javascript"));
    let resp = http
        .get(format!("{url}/ui/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Who may log in: reader and admin tokens only, from this site only.
    let resp = post_login(&http, &url, "cnc_wrong").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get(SET_COOKIE).is_none());
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("token: unknown or revoked"));
    let resp = post_login(&http, &url, &agent_token).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("token: agent tokens cannot open the dashboard"));
    let resp = post_login(&http, &url, &s.session_token).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(SET_COOKIE).is_none());
    let resp = http
        .post(format!("{url}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "http://evil.example")
        .body(format!("token={}", concord_client::pct(&hub.admin)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(SET_COOKIE).is_none());

    // The cookie: HttpOnly, SameSite=Strict, Path=/, a random id, not the token.
    let resp = post_login(&http, &url, &reader_token).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(header(resp.headers(), "location"), "/ui");
    let set = header(resp.headers(), "set-cookie").to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.split("; ").any(|f| f == flag), "{flag} in {set}");
    }
    assert!(!set.contains(&reader_token) && !set.contains(&reader_token[4..]));
    let id = set
        .split(';')
        .next()
        .and_then(|kv| kv.strip_prefix("concord_ui="))
        .expect("cookie concord_ui");
    assert_eq!(id.len(), 64);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));

    let reader = login(&http, &url, &reader_token).await;
    let adm = login(&http, &url, &hub.admin).await;
    let transfer = format!("{url}/v1/entities/alpha/primary/transfer");
    let to_standby = json!({"to": s.instance.id});

    // A reader reads everything through the cookie, and may change nothing.
    let (st, body) = call(
        &http,
        reqwest::Method::GET,
        &format!("{url}/v1/entities"),
        &reader,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["entities"][0]["name"], "alpha");
    let (st, _) = call(
        &http,
        reqwest::Method::GET,
        &format!("{url}/v1/tokens"),
        &reader,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, body) = call(
        &http,
        reqwest::Method::POST,
        &transfer,
        &reader,
        Some(&reader.csrf),
        Some(to_standby.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("reader"),
        "{body}"
    );
    for (method, path) in [
        (
            reqwest::Method::DELETE,
            format!("/v1/instances/{}", victim.instance.id),
        ),
        (reqwest::Method::DELETE, format!("/v1/tokens/{reader_id}")),
        (
            reqwest::Method::DELETE,
            "/v1/leases/lse_01HZZZZZZZZZZZZZZZZZZZZZZZ?force=true".to_string(),
        ),
        (
            reqwest::Method::POST,
            "/v1/tasks/tsk_01HZZZZZZZZZZZZZZZZZZZZZZZ/cancel".to_string(),
        ),
        (
            reqwest::Method::DELETE,
            "/v1/memories/mem_01HZZZZZZZZZZZZZZZZZZZZZZZ?purge=true".to_string(),
        ),
    ] {
        let (st, body) = call(
            &http,
            method.clone(),
            &format!("{url}{path}"),
            &reader,
            Some(&reader.csrf),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "reader {method} {path}: {body}");
    }
    assert_eq!(
        admin.entity("alpha").await.unwrap().primary.map(|i| i.id),
        Some(p.instance.id.clone())
    );

    // An admin's cookie changes things only with the session's CSRF token.
    let (st, body) = call(
        &http,
        reqwest::Method::POST,
        &transfer,
        &adm,
        None,
        Some(to_standby.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("CSRF"),
        "{body}"
    );
    let (st, _) = call(
        &http,
        reqwest::Method::POST,
        &transfer,
        &adm,
        Some(&reader.csrf),
        Some(to_standby.clone()),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "another session's CSRF token does not do"
    );
    let (st, _) = call(
        &http,
        reqwest::Method::POST,
        &transfer,
        &adm,
        Some(""),
        Some(to_standby.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(
        admin.entity("alpha").await.unwrap().primary.map(|i| i.id),
        Some(p.instance.id.clone())
    );
    let (st, body) = call(
        &http,
        reqwest::Method::POST,
        &transfer,
        &adm,
        Some(&adm.csrf),
        Some(to_standby),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(
        admin.entity("alpha").await.unwrap().primary.map(|i| i.id),
        Some(s.instance.id.clone())
    );
    let (st, body) = call(
        &http,
        reqwest::Method::DELETE,
        &format!("{url}/v1/instances/{}", victim.instance.id),
        &adm,
        Some(&adm.csrf),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["instance"]["state"], "closed");

    // Only admins get the tokens page in the navigation; ids in paths are checked.
    let page = |s: &Session, path: &str| {
        http.get(format!("{url}{path}"))
            .header(COOKIE, &s.cookie)
            .send()
    };
    assert!(!page(&reader, "/ui")
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("/ui/tokens"));
    assert!(page(&adm, "/ui")
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("/ui/tokens"));
    assert_eq!(
        page(&adm, "/ui/instances/%3Cscript%3E")
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let html = page(&adm, &format!("/ui/instances/{}", p.instance.id))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(&format!("data-id=\"{}\"", p.instance.id)));

    // The dashboard is not part of the JSON API.
    let openapi: Value = http
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["paths"]
        .as_object()
        .unwrap()
        .keys()
        .all(|k| !k.starts_with("/ui")));

    // Logout needs the CSRF token, ends the session and clears the cookie.
    let resp = http
        .post(format!("{url}/ui/logout"))
        .header(COOKIE, &adm.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(page(&adm, "/ui").await.unwrap().status(), StatusCode::OK);
    let resp = http
        .post(format!("{url}/ui/logout"))
        .header(COOKIE, &adm.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={}", adm.csrf))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers().get(LOCATION).unwrap(), "/ui/login");
    assert!(header(resp.headers(), "set-cookie").contains("Max-Age=0"));
    assert_eq!(
        page(&adm, "/ui").await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    let (st, _) = call(
        &http,
        reqwest::Method::GET,
        &format!("{url}/v1/entities"),
        &adm,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // Revoking the token ends the sessions opened with it.
    admin.revoke_token(&reader_id).await.unwrap();
    let (st, _) = call(
        &http,
        reqwest::Method::GET,
        &format!("{url}/v1/entities"),
        &reader,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(
        page(&reader, "/ui").await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
}

/// Node, Playwright and Chromium, or `None` after saying which is missing.
fn browser_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let chromium = std::env::var_os("CONCORD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let dir = repo_root().join("tests/ui");
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!("no Chromium at {}", chromium.display()));
    }
    if !dir.join("node_modules/playwright-core").exists() {
        missing.push("no tests/ui/node_modules (run `npm ci` in tests/ui)".to_string());
    }
    if Command::new("node")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("no `node` on PATH".to_string());
    }
    if missing.is_empty() {
        return Some((chromium, dir));
    }
    let msg = format!(
        "{test}: SKIPPED: {} (`.ci/run` installs them: apt-get install chromium; npm ci in tests/ui)",
        missing.join("; ")
    );
    if require_all() {
        panic!("CONCORD_REQUIRE_ALL=1 but {msg}");
    }
    let _ = writeln!(std::io::stderr(), "!!! {msg} !!!");
    None
}

/// Keeps the seeded instances alive while the browser looks at them.
fn heartbeat_forever(clients: Vec<(String, Client)>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (id, c) in &clients {
                let _ = c.heartbeat(id).await;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    })
}

#[tokio::test]
async fn the_dashboard_in_a_browser() {
    let Some((chromium, dir)) = browser_tools("the_dashboard_in_a_browser") else {
        return;
    };
    let hub = Hub::start();
    let admin = hub.admin();
    let (_, reader_token) = token(&admin, TokenKind::Reader, None).await;

    // Two entities: alpha with a primary, a persistent labelled secondary and a
    // fork; beta with a primary and a ghost (an unlabelled secondary).
    let (ap, apc) = register(&admin, reg("alpha", Role::Primary, Some("alpha-main"))).await;
    let mut sec = reg("alpha", Role::Secondary, Some("reviewer"));
    sec.persistent = true;
    sec.capabilities = vec!["review".into()];
    sec.meta = json!({"state_detail": "process up, endpoint up", "process": {"state": "running", "pid": 4242, "restarts": 1, "port": 8100, "home": "/srv/alpha", "last_exit": null}});
    let (asec, asc) = register(&admin, sec).await;
    let mut fork = reg("alpha", Role::Fork, Some("what-if experiment"));
    fork.forked_from = Some(ap.instance.id.clone());
    let (af, afc) = register(&admin, fork).await;
    let (bp, bpc) = register(&admin, reg("beta", Role::Primary, Some("beta-main"))).await;
    let (bg, bgc) = register(&admin, reg("beta", Role::Secondary, None)).await;
    let beat = heartbeat_forever(vec![
        (ap.instance.id.clone(), apc.clone()),
        (asec.instance.id.clone(), asc.clone()),
        (af.instance.id.clone(), afc),
        (bp.instance.id.clone(), bpc),
        (bg.instance.id.clone(), bgc),
    ]);

    // Tasks: some done (the sparkline), some waiting, one dead with its error; a schedule.
    let task = |q: &str| EnqueueRequest {
        queue: q.into(),
        payload: json!({}),
        ..Default::default()
    };
    for _ in 0..5 {
        admin.enqueue(&task("build")).await.unwrap();
    }
    for c in asc.claim(&["build"], 3, None, 0).await.unwrap() {
        asc.complete_task(&c.task.id, &c.claim, json!({"ok": true}))
            .await
            .unwrap();
    }
    admin.enqueue(&task("deploy")).await.unwrap();
    let c = asc.claim(&["deploy"], 1, None, 0).await.unwrap().remove(0);
    asc.fail_task(&c.task.id, &c.claim, "fatal: disk full", false)
        .await
        .unwrap();
    admin
        .put_schedule(
            "nightly-report",
            &PutScheduleRequest {
                queue: "reports".into(),
                payload: json!({}),
                every_ms: Some(3_600_000),
                cron: None,
                priority: 0,
                requires: vec![],
                max_attempts: None,
            },
        )
        .await
        .unwrap();

    // A canonical memory by alpha's primary, trusted by beta.
    let mut m = memory("entity:alpha", "the deploy freeze starts friday at noon");
    m.fence = ap.fence;
    m.visibility = Some("public".into());
    apc.remember(&m).await.unwrap();
    admin
        .call::<_, Value>(
            reqwest::Method::PUT,
            "/v1/trust/beta",
            Some(&json!({"trusts": ["entity:alpha"]})),
        )
        .await
        .unwrap();

    let shots = repo_root().join("target");
    std::fs::create_dir_all(&shots).unwrap();
    let started = Instant::now();
    let out = Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .current_dir(&dir)
        .env("CONCORD_URL", &hub.url)
        .env("ADMIN_TOKEN", &hub.admin)
        .env("READER_TOKEN", &reader_token)
        .env("ALPHA_PRIMARY", &ap.instance.id)
        .env("ALPHA_SECONDARY", &asec.instance.id)
        .env("BETA_PRIMARY", &bp.instance.id)
        .env("GHOST", &bg.instance.id)
        .env("MEMORY_QUERY", "deploy freeze")
        .env("MEMORY_TEXT", "the deploy freeze starts friday at noon")
        .env("MEMORY_WRITER", &ap.instance.id)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    beat.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "OK"),
        "dashboard.mjs failed ({}) after {:?}:\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- hub log\n{}",
        out.status,
        started.elapsed(),
        hub.log()
    );
    eprintln!("dashboard.mjs ({:?}):\n{stdout}", started.elapsed());
    assert!(shots.join("ui-overview.png").exists());
}
