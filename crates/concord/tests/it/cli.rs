use crate::harness::*;
use serde_json::Value;

fn ok_json(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn cli_tokens_state_and_listings() {
    let hub = Hub::start();
    let t = ok_json(hub.cli(&[
        "token", "create", "--kind", "agent", "--entity", "sisters", "--name", "laptop", "--json",
    ]));
    assert_eq!(t["kind"], "agent");
    let id = t["id"].as_str().unwrap().to_string();
    let list = ok_json(hub.cli(&["token", "list", "--json"]));
    assert!(list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == id.as_str()));

    let set = ok_json(hub.cli(&[
        "state",
        "set",
        "sisters",
        "config/model",
        r#"{"name":"k2"}"#,
        "--json",
    ]));
    assert_eq!(set["value"]["name"], "k2");
    let got = ok_json(hub.cli(&["state", "get", "sisters", "config/model", "--json"]));
    assert_eq!(got["revision"], set["revision"]);

    let status = ok_json(hub.cli(&["status", "--json"]));
    assert_eq!(status["backend"], "sqlite");
    assert_eq!(status["entities"], 1);

    // Human output is a table.
    let out = hub.cli(&["instances"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ID"));
    let out = hub.cli(&["entity", "sisters"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 0"));

    assert!(hub.cli(&["token", "revoke", &id]).status.success());
    // Errors go to stderr with the hub's code, and a failing exit status.
    let out = hub.cli(&["token", "revoke", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
}

/// Benchmarks are not tests; this only keeps every suite and baseline compiling
/// and running (a baseline whose server is missing skips with a reason).
#[tokio::test]
async fn bench_suites_smoke() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("b.md");
    let pg = std::env::var("CONCORD_TEST_DATABASE_URL").ok();
    let mut bench = tokio::process::Command::new(BIN);
    bench
        .args([
            "bench",
            "all",
            "--duration",
            "1",
            "--instances",
            "50",
            "--concurrency",
            "4",
            "--memories",
            "300",
            "--markdown",
        ])
        .arg(&md)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(url) = &pg {
        bench.args(["--baseline-postgres", url]);
    }
    let child = bench.spawn().unwrap();
    let pid = child.id().unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for suite in [
        "idle",
        "heartbeat",
        "queue ",
        "queue-batch-100",
        "events",
        "dispatch-multi-10",
        "ingest",
        "recall",
        "http-ceiling",
        "disk-fsync",
    ] {
        assert!(text.contains(suite), "no {suite} line in:\n{text}");
    }
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("Budget (DESIGN §10)"));
    assert!(report.contains("## idle"), "no idle section in:\n{report}");
    assert!(
        report.contains("## disk-fsync"),
        "no disk section in:\n{report}"
    );
    assert!(md.with_extension("svg").exists());
    // The PostgreSQL queue baseline drops the schema it filled.
    if let Some(url) = pg.filter(|_| text.contains("postgres-skip-locked")) {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let left = schemas_like(&client, &format!("bench\\_pgq\\_{pid}")).await;
        assert_eq!(left, 0, "the queue baseline left bench_pgq_{pid} behind");
        // Concord itself on PostgreSQL runs beside it, and drops its schemas too.
        assert!(
            text.contains("concord-postgres"),
            "no concord-postgres line in:\n{text}"
        );
        let left = schemas_like(&client, &format!("bench\\_{pid}\\_%")).await;
        assert_eq!(
            left, 0,
            "concord-postgres left a bench_{pid}_* schema behind"
        );
    }
}

/// How many schemas match a LIKE pattern.
async fn schemas_like(client: &tokio_postgres::Client, pattern: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap()
        .get(0)
}
