//! concord-client with several hub URLs: it skips a hub it cannot reach and
//! fails over when the hub it was using dies.

use crate::harness::*;
use concord_client::Client;
use concord_core::api::Role;
use concord_core::ErrorCode;

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_two_urls_skips_a_dead_hub_and_fails_over() {
    let token = concord_core::token::generate_secret();
    let env = [("CONCORD_ADMIN_TOKEN", token.as_str())];
    let dead = free_port();
    let dead_url = format!("http://127.0.0.1:{dead}");
    let mut first = Hub::configure(&[], &env);
    first.spawn();

    // The first URL refuses connections: the client moves on to the live hub.
    let client = Client::new(
        vec![dead_url.clone(), first.url.clone()],
        Some(token.clone()),
    )
    .expect("client");
    let status = client.status().await.unwrap();
    let first_id = status.hub_id.clone();
    let (r, _) = register(&client, reg("fleet", Role::Secondary, Some("pane"))).await;
    assert_eq!(
        first.admin().get_instance(&r.instance.id).await.unwrap().id,
        r.instance.id
    );
    // An answer from a hub, even an error, is final: no failover on a 404.
    assert_eq!(
        client.get_instance("ins_missing").await.unwrap_err().code,
        ErrorCode::NotFound
    );

    // The live hub dies and another comes up on the other URL: the same client
    // carries on there.
    first.kill9();
    let mut second = Hub::configure(&[], &env);
    second.listen = format!("127.0.0.1:{dead}");
    second.spawn();
    assert_eq!(second.url, dead_url);
    let status = client.status().await.unwrap();
    assert_ne!(status.hub_id, first_id, "answered by the second hub");
    let (r2, session) = register(&client, reg("fleet", Role::Secondary, Some("again"))).await;
    session.heartbeat(&r2.instance.id).await.unwrap();

    // With no hub left, the error says so.
    second.kill9();
    let err = client.status().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(err.message.contains("hub unreachable"), "{}", err.message);
}
