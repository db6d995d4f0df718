use crate::harness::*;
use concord_core::api::{CreateTokenRequest, Role};
use concord_core::token::TokenKind;
use concord_core::ErrorCode;

fn req(kind: TokenKind, entity: Option<&str>) -> CreateTokenRequest {
    CreateTokenRequest {
        kind,
        entity: entity.map(Into::into),
        name: Some("t".into()),
    }
}

#[tokio::test]
async fn tokens_are_created_listed_without_secrets_and_revoked_at_once() {
    let hub = Hub::start();
    let admin = hub.admin();
    let t = admin
        .create_token(&req(TokenKind::Agent, Some("sisters")))
        .await
        .unwrap();
    assert!(t.id.starts_with("tok_"));
    assert_eq!(t.entity.as_deref(), Some("sisters"));
    assert!(t.token.len() > 32);

    let listed = admin.list_tokens().await.unwrap();
    let raw = serde_json::to_string(&listed).unwrap();
    assert!(listed.tokens.iter().any(|x| x.id == t.id));
    assert!(
        !raw.contains(&t.token),
        "a secret leaked into the token list"
    );

    let agent = admin.with_token(t.token.clone());
    agent
        .list_instances(None, None, None)
        .await
        .expect("agent can read");
    admin.revoke_token(&t.id).await.unwrap();
    let err = agent.list_instances(None, None, None).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unauthorized);
    // Revoking twice is a 404, not a silent success.
    assert_eq!(
        admin.revoke_token(&t.id).await.unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn every_route_needs_a_token_and_scopes_hold() {
    let hub = Hub::start();
    let admin = hub.admin();
    assert_eq!(
        hub.anon().entities().await.unwrap_err().code,
        ErrorCode::Unauthorized
    );
    assert_eq!(
        admin
            .with_token("cnc_not_a_real_token")
            .entities()
            .await
            .unwrap_err()
            .code,
        ErrorCode::Unauthorized
    );

    let agent = admin.with_token(
        admin
            .create_token(&req(TokenKind::Agent, Some("sisters")))
            .await
            .unwrap()
            .token,
    );
    let reader = admin.with_token(
        admin
            .create_token(&req(TokenKind::Reader, None))
            .await
            .unwrap()
            .token,
    );

    // An agent registers its own entity only.
    let (own, session) = register(&agent, reg("sisters", Role::Primary, Some("main"))).await;
    let err = agent
        .register(&reg("anvil", Role::Secondary, Some("x")))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    // Agents cannot mint tokens or write state directly.
    assert_eq!(
        agent
            .create_token(&req(TokenKind::Admin, None))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    let err = agent
        .put_state("sisters", "k", serde_json::json!(1), own.fence, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);

    // Readers read everything and write nothing.
    reader.entity("sisters").await.unwrap();
    reader
        .list_instances(Some("sisters"), None, None)
        .await
        .unwrap();
    for code in [
        reader
            .register(&reg("sisters", Role::Secondary, Some("r")))
            .await
            .unwrap_err()
            .code,
        reader
            .put_state("sisters", "k", serde_json::json!(1), Some(1), None)
            .await
            .unwrap_err()
            .code,
        reader
            .close_instance(&own.instance.id)
            .await
            .unwrap_err()
            .code,
        reader
            .create_token(&req(TokenKind::Reader, None))
            .await
            .unwrap_err()
            .code,
        reader
            .transfer("sisters", &own.instance.id)
            .await
            .unwrap_err()
            .code,
    ] {
        assert_eq!(code, ErrorCode::Forbidden);
    }

    // A session of one entity cannot act on another entity.
    let (_, other) = register(&admin, reg("anvil", Role::Primary, Some("a"))).await;
    let err = other
        .put_state("sisters", "k", serde_json::json!(1), own.fence, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    // Nor heartbeat for another instance.
    assert_eq!(
        other.heartbeat(&own.instance.id).await.unwrap_err().code,
        ErrorCode::Forbidden
    );
    // The primary's own session writes fine.
    session
        .put_state("sisters", "k", serde_json::json!(1), own.fence, None)
        .await
        .unwrap();
}
