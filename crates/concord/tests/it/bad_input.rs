use crate::harness::*;
use concord_core::api::Role;
use serde_json::{json, Value};

async fn raw(hub: &Hub, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .request(method, format!("{}{path}", hub.url))
        .bearer_auth(&hub.admin)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn bad_requests_name_the_field_and_change_nothing() {
    let hub = Hub::start();
    let admin = hub.admin();
    let post = reqwest::Method::POST;
    let cases: &[(&str, &str)] = &[
        ("{not json", ""),
        (r#"{"entity": "", "label": "x"}"#, "entity"),
        (r#"{"entity": "has space", "label": "x"}"#, "entity"),
        (r#"{"entity": "e", "ttl_ms": 10}"#, "ttl_ms"),
        (r#"{"entity": "e", "ttl_ms": 86400001}"#, "ttl_ms"),
        (r#"{"entity": "e", "ttl_ms": "fast"}"#, "ttl_ms"),
        (r#"{"entity": "e", "role": "boss"}"#, "role"),
        (r#"{"entity": "e", "fence": 3}"#, "fence"),
        (
            r#"{"entity": "e", "capabilities": ["ok", "not ok"]}"#,
            "capabilities[1]",
        ),
        (r#"{"entity": "e", "meta": [1]}"#, "meta"),
        (r#"{"entity": "e", "label": "   "}"#, "label"),
        (r#"{"entity": "e", "forked_from": "nope"}"#, "forked_from"),
        (r#"{"label": "x"}"#, "entity"),
        ("[]", ""),
    ];
    for (body, field) in cases {
        let (status, resp) = raw(&hub, post.clone(), "/v1/instances", body).await;
        assert_eq!(status, 400, "{body} -> {resp}");
        assert_eq!(resp["error"]["code"], "bad_request", "{body}");
        if !field.is_empty() {
            assert_eq!(
                resp["error"]["details"]["field"], *field,
                "{body} -> {resp}"
            );
        }
    }
    // Oversized bodies are 413 in the same shape.
    let big = format!(
        r#"{{"entity":"e","label":"x","meta":{{"blob":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let (status, resp) = raw(&hub, post.clone(), "/v1/instances", &big).await;
    assert_eq!(status, 413);
    assert_eq!(resp["error"]["code"], "payload_too_large");
    let (status, _) = raw(
        &hub,
        post.clone(),
        "/v1/instances",
        &format!(
            r#"{{"entity":"e","label":"x","meta":{{"blob":"{}"}}}}"#,
            "x".repeat(20_000)
        ),
    )
    .await;
    assert_eq!(status, 413, "meta over its own limit");
    // Nothing was registered by any of them.
    assert!(admin
        .list_instances(None, None, Some("all"))
        .await
        .unwrap()
        .instances
        .is_empty());
    assert!(admin.entities().await.unwrap().entities.is_empty());

    // State: bad keys, unknown fields, missing value.
    let (p, _) = register(&admin, reg("e", Role::Primary, Some("p"))).await;
    for (path, body, field) in [
        ("/v1/entities/e/state/a%20b", r#"{"value": 1}"#, "key"),
        (
            "/v1/entities/e/state/k",
            r#"{"value": 1, "fense": 1}"#,
            "fense",
        ),
        ("/v1/entities/e/state/k", r#"{"fence": 1}"#, "value"),
        (
            "/v1/entities/e/state/k",
            r#"{"value": 1, "fence": -1}"#,
            "fence",
        ),
    ] {
        let (status, resp) = raw(&hub, reqwest::Method::PUT, path, body).await;
        assert_eq!(status, 400, "{path} {body} -> {resp}");
        assert_eq!(resp["error"]["details"]["field"], field, "{resp}");
    }
    assert!(admin.list_state("e").await.unwrap().entries.is_empty());
    // Unknown routes and methods answer in the error shape, not plain text.
    let (status, resp) = raw(&hub, reqwest::Method::GET, "/v1/nope", "").await;
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, resp) = raw(&hub, reqwest::Method::PUT, "/v1/entities", "{}").await;
    assert!(status == 405 || status == 400, "{status}");
    assert!(resp["error"]["code"].is_string());
    // Campaign for an instance of another entity, and wait_ms out of range.
    let (status, resp) = raw(
        &hub,
        post.clone(),
        "/v1/entities/other/primary",
        &json!({"instance": p.instance.id}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{resp}");
    let (status, _) = raw(
        &hub,
        post.clone(),
        "/v1/entities/e/primary",
        &json!({"instance": p.instance.id, "wait_ms": 999999999}).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    // The hub is still fine.
    admin.status().await.unwrap();
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let hub = Hub::start();
    let http = reqwest::Client::new();
    let h: Value = http
        .get(format!("{}/healthz", hub.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let r = http
        .get(format!("{}/readyz", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    hub.admin().entities().await.unwrap();
    let m = http
        .get(format!("{}/metrics", hub.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(
            "concord_http_requests_total{method=\"GET\",route=\"/v1/entities\",status=\"200\"}"
        ),
        "{m}"
    );
    // The hub wrote (its admin token, at least): the store's counters say so.
    let counter = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{m}"))
    };
    assert!(counter("concord_store_commits_total") >= 1.0);
    assert!(counter("concord_store_committed_operations_total") >= 1.0);
    assert!(counter("concord_store_busy_seconds_total") > 0.0);
    assert!(
        counter("concord_store_commit_seconds_total")
            <= counter("concord_store_busy_seconds_total")
    );
    let doc: Value = http
        .get(format!("{}/openapi.json", hub.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/instances",
        "/v1/instances/{id}/heartbeat",
        "/v1/entities/{entity}/primary/transfer",
        "/v1/tokens",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["RegisterInstanceRequest"].is_object());
}
