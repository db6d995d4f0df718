//! The authorization matrix: every route × every kind of caller, checked against
//! the one authorization table in code (`concord_core::authz`) as listed by
//! `concord_server::ROUTES`. A route missing from that list fails
//! `every_route_has_a_rule`.

use crate::harness::*;
use concord_core::api::{CreateTokenRequest, EnqueueRequest, Role};
use concord_core::authz::{authorize, Principal, Target};
use concord_core::token::TokenKind;
use concord_server::{Subject, ROUTES};
use serde_json::Value;
use std::collections::BTreeSet;

struct Caller {
    name: &'static str,
    token: Option<String>,
    /// None: not authenticated (no token, or revoked).
    principal: Option<Principal>,
    ghost: bool,
}

#[tokio::test]
async fn every_route_has_a_rule() {
    let hub = Hub::start();
    let doc: Value = reqwest::get(format!("{}/openapi.json", hub.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in ["get", "post", "put", "delete", "patch"] {
            if item.get(m).is_some() {
                documented.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let missing_rule: Vec<_> = documented.difference(&listed).collect();
    let undocumented: Vec<_> = listed.difference(&documented).collect();
    assert!(
        missing_rule.is_empty(),
        "routes without an entry in concord_server::ROUTES: {missing_rule:?}"
    );
    assert!(
        undocumented.is_empty(),
        "ROUTES entries that /openapi.json does not know: {undocumented:?}"
    );
}

#[tokio::test]
async fn authorization_matrix() {
    let hub = Hub::start();
    let admin = hub.admin();
    let token = |kind, entity: Option<&str>| CreateTokenRequest {
        kind,
        entity: entity.map(Into::into),
        name: Some("m".into()),
    };
    let agent_same = admin
        .create_token(&token(TokenKind::Agent, Some("sisters")))
        .await
        .unwrap();
    let agent_other = admin
        .create_token(&token(TokenKind::Agent, Some("anvil")))
        .await
        .unwrap();
    let reader = admin
        .create_token(&token(TokenKind::Reader, None))
        .await
        .unwrap();
    let revoked = admin
        .create_token(&token(TokenKind::Reader, None))
        .await
        .unwrap();
    admin.revoke_token(&revoked.id).await.unwrap();
    let mk = |role, label: Option<&str>| {
        let mut r = reg("sisters", role, label);
        r.ttl_ms = Some(120_000);
        r
    };
    let (p, _) = register(&admin, mk(Role::Primary, Some("primary"))).await;
    let (s, _) = register(&admin, mk(Role::Secondary, Some("secondary"))).await;
    let (f, _) = register(&admin, mk(Role::Fork, Some("fork"))).await;
    let (u, _) = register(&admin, mk(Role::Secondary, None)).await;
    let task = admin
        .enqueue(&EnqueueRequest {
            queue: "matrix".into(),
            payload: 1.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .task;
    let session = |r: &concord_core::api::Registered, ghost: bool, name: &'static str| Caller {
        name,
        token: Some(r.session_token.clone()),
        principal: Some(Principal {
            token_id: String::new(),
            kind: TokenKind::Session,
            entity: Some("sisters".into()),
            instance: Some(r.instance.id.clone()),
        }),
        ghost,
    };
    let plain = |name, t: &concord_core::api::CreatedToken| Caller {
        name,
        token: Some(t.token.clone()),
        principal: Some(Principal {
            token_id: t.id.clone(),
            kind: t.kind,
            entity: t.entity.clone(),
            instance: None,
        }),
        ghost: false,
    };
    let callers = vec![
        Caller {
            name: "admin",
            token: Some(hub.admin.clone()),
            principal: Some(Principal {
                token_id: String::new(),
                kind: TokenKind::Admin,
                entity: None,
                instance: None,
            }),
            ghost: false,
        },
        plain("agent of sisters", &agent_same),
        plain("agent of anvil", &agent_other),
        plain("reader", &reader),
        session(&p, false, "session of the primary"),
        session(&s, false, "session of a secondary"),
        session(&f, false, "session of a fork"),
        session(&u, true, "session of an unlabelled secondary"),
        Caller {
            name: "revoked",
            token: Some(revoked.token.clone()),
            principal: None,
            ghost: false,
        },
        Caller {
            name: "no token",
            token: None,
            principal: None,
            ghost: false,
        },
    ];
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for rule in ROUTES {
        for c in &callers {
            // A fresh victim for routes that change an instance.
            let victim = if rule.subject == Subject::Victim {
                register(&admin, mk(Role::Secondary, Some("victim")))
                    .await
                    .0
                    .instance
                    .id
            } else {
                String::new()
            };
            let id = if rule.path.starts_with("/v1/tokens/") {
                "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string()
            } else if rule.path.starts_with("/v1/instances/") {
                if rule.subject == Subject::Victim {
                    victim.clone()
                } else {
                    p.instance.id.clone()
                }
            } else if rule.path.starts_with("/v1/tasks/") {
                task.id.clone()
            } else if rule.path.starts_with("/v1/inbox/") {
                "msg_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string()
            } else if rule.path.starts_with("/v1/memories/") {
                "mem_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string()
            } else if rule.path.starts_with("/v1/forks/") {
                f.instance.id.clone()
            } else if rule.path.starts_with("/v1/leases/") {
                "lse_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string()
            } else {
                "dsp_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string()
            };
            let fill = |s: &str| {
                s.replace("{id}", &id)
                    .replace("{entity}", "sisters")
                    .replace("{target}", "sisters")
                    .replace("{key}", "k1")
                    .replace("{name}", "sched1")
                    .replace("{instance}", &p.instance.id)
                    .replace("{task}", &task.id)
                    .replace("{subject}", "provider:matrix")
                    .replace("{caller}", c.name)
            };
            let url = format!("{}{}", hub.url, fill(rule.path));
            let mut req = http.request(rule.method.parse().unwrap(), &url);
            if let Some(t) = &c.token {
                req = req.bearer_auth(t);
            }
            if !rule.body.is_empty() {
                req = req
                    .header("content-type", "application/json")
                    .body(fill(rule.body));
            }
            let status = req.send().await.unwrap().status().as_u16();
            checked += 1;
            let expected = match (rule.action, &c.principal) {
                (None, _) => "public",
                (Some(_), None) => "401",
                (Some(action), Some(pr)) => {
                    let target = match rule.subject {
                        Subject::Public | Subject::None => Target::default(),
                        Subject::Entity => Target {
                            entity: Some("sisters"),
                            instance: None,
                        },
                        Subject::Instance => Target {
                            entity: Some("sisters"),
                            instance: Some(&p.instance.id),
                        },
                        Subject::Victim => Target {
                            entity: Some("sisters"),
                            instance: Some(&victim),
                        },
                        Subject::Caller => Target {
                            entity: pr.entity.as_deref(),
                            instance: pr.instance.as_deref(),
                        },
                    };
                    let primary_only_denied = rule.primary_only
                        && pr.kind == TokenKind::Session
                        && pr.instance.as_deref() != Some(p.instance.id.as_str());
                    let allowed = authorize(pr, action, target).is_ok()
                        && !(c.ghost && (action.denies_ghosts() || rule.ghost_denied))
                        && !primary_only_denied;
                    if allowed {
                        "allowed"
                    } else {
                        "403"
                    }
                }
            };
            let ok = match expected {
                "public" => status < 400 || status == 503,
                "401" => status == 401,
                "403" => status == 403,
                _ => status != 401 && status != 403 && status < 500,
            };
            if !ok {
                failures.push(format!(
                    "{} {} as {}: expected {expected}, got {status}",
                    rule.method, rule.path, c.name
                ));
            }
        }
    }
    eprintln!("authorization matrix: {checked} route × caller pairs checked");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
