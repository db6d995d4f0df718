//! Tokens: create, list, revoke, authenticate, bootstrap.

use crate::harness::*;
use concord_core::api::Role;
use concord_core::ids;
use concord_core::token::TokenKind;
use concord_store::{topics, DynStore, NewToken};

conformance!(
    tokens_create_list_revoke_authenticate,
    bootstrap_admin_only_if_none,
    session_tokens_resolve_to_their_instance
);

fn token(kind: TokenKind, entity: Option<&str>, name: &str) -> NewToken {
    let id = ids::new_id(ids::TOKEN);
    NewToken {
        secret_hash: format!("hash:{id}"),
        id,
        kind,
        entity: entity.map(str::to_string),
        name: Some(name.into()),
        instance: None,
    }
}

async fn tokens_create_list_revoke_authenticate(store: DynStore) {
    let before = store.last_event_seq().await.unwrap();
    let admin = token(TokenKind::Admin, None, "ops");
    let agent = token(TokenKind::Agent, Some("sisters"), "sisters agent");
    let reader = token(TokenKind::Reader, None, "dashboard");
    let mut infos = Vec::new();
    for t in [&admin, &agent, &reader] {
        let info = store.create_token(t.clone()).await.unwrap();
        assert_eq!(info.id, t.id);
        assert_eq!(info.kind, t.kind);
        assert_eq!(info.entity, t.entity);
        assert_eq!(info.name, t.name);
        assert!(info.created_at.millis() > 0);
        infos.push(info);
    }
    let mut expected = infos.clone();
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        store.list_tokens().await.unwrap(),
        expected,
        "listed by id, with their creation data"
    );

    let p = store
        .authenticate(&agent.secret_hash)
        .await
        .unwrap()
        .expect("agent authenticates");
    assert_eq!(
        (
            p.token_id.as_str(),
            p.kind,
            p.entity.as_deref(),
            p.instance.as_deref()
        ),
        (agent.id.as_str(), TokenKind::Agent, Some("sisters"), None)
    );
    let p = store
        .authenticate(&admin.secret_hash)
        .await
        .unwrap()
        .expect("admin authenticates");
    assert!(p.is_admin());
    assert_eq!(store.authenticate("hash:nobody").await.unwrap(), None);

    assert!(store.revoke_token(&reader.id).await.unwrap());
    assert!(
        !store.revoke_token(&reader.id).await.unwrap(),
        "a second revoke finds no live token"
    );
    assert!(!store.revoke_token("tok_unknown").await.unwrap());
    assert_eq!(
        store.authenticate(&reader.secret_hash).await.unwrap(),
        None,
        "revoked tokens do not authenticate"
    );
    let listed: Vec<String> = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert!(!listed.contains(&reader.id));
    assert_eq!(listed.len(), 2);

    let events = events_after(&store, before).await;
    assert_eq!(
        topics_of(&events),
        [
            topics::TOKEN_CREATED,
            topics::TOKEN_CREATED,
            topics::TOKEN_CREATED,
            topics::TOKEN_REVOKED
        ]
    );
    assert_eq!(events[1].data["id"], agent.id.as_str());
    assert_eq!(events[1].data["kind"], "agent");
    assert_eq!(events[1].data["entity"], "sisters");
    assert_eq!(events[3].data["id"], reader.id.as_str());
}

async fn bootstrap_admin_only_if_none(store: DynStore) {
    assert!(
        store.bootstrap_admin("hash:first", true).await.unwrap(),
        "empty store: created"
    );
    assert!(
        !store.bootstrap_admin("hash:first", true).await.unwrap(),
        "same secret: already there"
    );
    assert!(
        !store.bootstrap_admin("hash:second", true).await.unwrap(),
        "an admin exists: only_if_none declines"
    );
    assert_eq!(store.authenticate("hash:second").await.unwrap(), None);
    assert!(
        store.bootstrap_admin("hash:second", false).await.unwrap(),
        "without only_if_none: installed"
    );
    assert!(
        !store.bootstrap_admin("hash:second", false).await.unwrap(),
        "installed once"
    );
    for h in ["hash:first", "hash:second"] {
        let p = store
            .authenticate(h)
            .await
            .unwrap()
            .expect("bootstrap admin authenticates");
        assert!(p.is_admin());
    }
    let admins: Vec<_> = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.kind == TokenKind::Admin)
        .collect();
    assert_eq!(admins.len(), 2);
    assert!(admins
        .iter()
        .all(|t| t.name.as_deref() == Some("bootstrap")));

    // With every admin revoked, the store counts as having none again.
    for t in &admins {
        assert!(store.revoke_token(&t.id).await.unwrap());
    }
    assert!(store.bootstrap_admin("hash:third", true).await.unwrap());
}

async fn session_tokens_resolve_to_their_instance(store: DynStore) {
    let reg = register(&store, "sisters", Role::Secondary, Some("test pane")).await;
    let p = store
        .authenticate(&format!("hash:{}", reg.instance.id))
        .await
        .unwrap()
        .expect("session authenticates");
    assert_eq!(p.kind, TokenKind::Session);
    assert_eq!(p.instance.as_deref(), Some(reg.instance.id.as_str()));
    assert_eq!(p.entity.as_deref(), Some("sisters"));
    assert!(
        store.list_tokens().await.unwrap().is_empty(),
        "session tokens are not listed"
    );
}
